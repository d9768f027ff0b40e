"""Updates are checked before they are averaged: a NaN update and a wrong-shape update,
made by a deliberately faulty client mod at two simulated hospitals, are rejected and the
round goes on with the good ones. Without secure aggregation the server rejects them with
their node ids; under SecAgg+ (the server never sees one update) each hospital's own check
refuses to send them, and the round sums the others."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtwin.checks import secagg_clip_problem, update_problem
from fedtwin.config import load_config
from fedtwin.data import Split, make_hospitals
from fedtwin.server import messages
from fedtwin.server.server_app import initial_weights


def test_update_problems_are_named():
    ref = {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)}
    assert update_problem({k: v + 0.1 for k, v in ref.items()}, ref, 10.0) is None
    nan = {**ref, "b": np.array([1, np.nan, 1, np.inf], np.float32)}
    assert "b: 2 values are not finite" in update_problem(nan, ref, 10.0)
    assert "a: shape (3, 2)" in update_problem({**ref, "a": np.zeros((3, 2), np.float32)}, ref, 1)
    assert "dtype float64" in update_problem({**ref, "a": np.zeros((2, 3))}, ref, 10.0)
    assert "missing ['b']" in update_problem({"a": ref["a"]}, ref, 10.0)
    far = {**ref, "a": np.full((2, 3), 100.0, np.float32)}
    assert "exceeds federation.max_update_norm=10" in update_problem(far, ref, 10.0)


def test_the_secagg_clip_check_uses_the_weights_as_secagg_scales_them():
    """SecAgg+ clips weights x examples / max_examples: a running variance of 14 at a
    hospital of 760 images (x 0.076 = 1.06) fits a clipping range of 8; 120 does not."""
    weights = {"bn.running_var": np.array([1.0, 14.0], np.float32)}
    assert secagg_clip_problem(weights, 8.0, 760 / 10000) is None
    assert secagg_clip_problem(weights, 8.0, 1.0) is not None  # a hospital at max_examples
    big = {"bn.running_var": np.array([120.0], np.float32)}
    assert "bn.running_var: |weight| 120 x examples/max_examples 0.076 exceeds" in (
        secagg_clip_problem(big, 8.0, 760 / 10000)
    )


def faulty(msg, context, call_next):
    """A client mod that breaks the training replies of partitions 1 (NaN) and 2 (shape)."""
    reply = call_next(msg, context)
    part = int(context.node_config["partition-id"])
    if msg.metadata.message_type != "train" or reply.has_error() or part not in (1, 2):
        return reply
    weights = messages.from_record(reply.content[messages.ARRAYS])
    name = next(iter(weights))
    if part == 1:
        weights[name] = np.full_like(weights[name], np.nan)
    else:
        weights[name] = weights[name][:-1]
    reply.content[messages.ARRAYS] = messages.to_record(weights)
    return reply


def tiny(hospitals, *more):
    return load_config(
        ["+experiment=tiny", f"federation.hospitals={len(hospitals)}", "federation.rounds=1",
         "twin.size=40", "twin.dicom=false", "audit.override=update-check-test",
         "model.features=null", "eval.hybrid=false", *more]  # the training round alone
    )  # fmt: skip


@pytest.mark.slow
def test_nan_and_wrong_shape_updates_are_rejected_and_the_round_goes_on(
    small_real, tmp_path, federate, sent_update
):
    images, labels = small_real
    hospitals = make_hospitals(Split(images, labels), 3, "iid", 0.5, 0.2, seed=0)
    cfg = tiny(hospitals, "federation.secure_aggregation=false")
    (entry,) = federate(cfg, hospitals, tmp_path, mods=[faulty])
    assert list(entry["hospitals"]) == ["hospital-0"]
    reasons = {r["hospital"]: r["reason"] for r in entry["rejected"]}
    assert "not finite" in reasons["hospital-1"] and "shape" in reasons["hospital-2"]
    assert all(r["node"] > 0 for r in entry["rejected"])
    # the global model is hospital-0's update alone, as its ledger recorded sending it
    saved = torch.load(tmp_path / "checkpoints" / "round-001.pt")["weights"]
    weights, _ = sent_update(tmp_path, "hospital-0")
    assert set(saved) == set(weights) == set(initial_weights(cfg))
    for name, value in weights.items():
        np.testing.assert_allclose(saved[name].numpy(), value, rtol=1e-6, atol=1e-7)
    assert (tmp_path / "twin" / "manifest.json").is_file()


@pytest.mark.slow
def test_under_secure_aggregation_each_hospital_refuses_its_own_bad_update(
    small_real, tmp_path, federate, sent_update
):
    images, labels = small_real
    hospitals = make_hospitals(Split(images, labels), 4, "iid", 0.5, 0.2, seed=0)
    cfg = tiny(hospitals)
    (entry,) = federate(cfg, hospitals, tmp_path, mods=[faulty])
    assert cfg["federation"]["secure_aggregation"]
    assert sorted(entry["hospitals"]) == ["hospital-0", "hospital-3"]
    assert entry["secure_aggregation"] == {"summed": 2, "dropped": 2}
    reasons = " | ".join(r["reason"] for r in entry["refused"])
    assert "hospital-1: own update failed its check" in reasons and "not finite" in reasons
    assert "hospital-2: own update failed its check" in reasons and "shape" in reasons
    # the global model is the weighted average of the two good updates (SecAgg+ quantized)
    saved = torch.load(tmp_path / "checkpoints" / "round-001.pt")["weights"]
    (w0, n0), (w3, n3) = sent_update(tmp_path, "hospital-0"), sent_update(tmp_path, "hospital-3")
    for name in w0:
        expected = (w0[name].astype(np.float64) * n0 + w3[name] * n3) / (n0 + n3)
        np.testing.assert_allclose(saved[name].numpy(), expected, atol=1e-3)
    assert (tmp_path / "twin" / "manifest.json").is_file()
