"""Secure aggregation (SecAgg+, on by default): the server-side code never holds one
hospital's update. Every message the ServerApp receives is recorded; none carries weights,
the masked vectors it does get are unrelated to each hospital's update (taken from the
hospital's own ledger), and what it ends with is their example-weighted average. A round
survives hospitals that leave before sharing keys and hospitals that refuse to send."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp import ServerApp

from fedtwin.config import load_config
from fedtwin.data import Split, make_hospitals
from fedtwin.server import messages
from fedtwin.server.server_app import train_and_audit

pytestmark = pytest.mark.slow


class RecordingGrid:
    """The Grid the ServerApp is given, keeping a copy of every reply it hands over."""

    def __init__(self, grid):
        self.grid, self.replies = grid, []

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.replies += replies
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)


def tiny(hospitals: int, *more: str) -> dict:
    return load_config(
        ["+experiment=tiny", f"federation.hospitals={hospitals}", "federation.rounds=1",
         "twin.size=40", "twin.dicom=false", "audit.override=secure-aggregation-test",
         "model.features=null", "eval.hybrid=false", *more]  # the training round alone
    )  # fmt: skip


def test_the_server_only_ever_holds_the_sum(small_real, tmp_path, federate, sent_update):
    images, labels = small_real
    hospitals = make_hospitals(Split(images, labels), 3, "dirichlet", 1.0, 0.2, seed=0)
    cfg = tiny(3)
    assert cfg["federation"]["secure_aggregation"]  # the default
    grids = []
    server = ServerApp()

    @server.main()
    def main(grid, context):
        grids.append(RecordingGrid(grid))
        train_and_audit(grids[0], context, cfg, tmp_path)

    (entry,) = federate(cfg, hospitals, tmp_path, server)
    assert entry["secure_aggregation"] == {"summed": 3, "dropped": 0}
    names = list(entry["hospitals"])
    assert len(names) == 3

    # What each hospital really sent into the protocol: its ledger's committed reply.
    updates = {name: sent_update(tmp_path, name) for name in names}
    counts = {name: n for name, (_, n) in updates.items()}

    train_replies = [m for m in grids[0].replies if m.metadata.message_type == "train"]
    assert len(train_replies) == 4 * 3  # four SecAgg+ stages, three hospitals
    for msg in train_replies:  # no training reply carries an array of floats
        assert all(len(record) == 0 for record in msg.content.array_records.values())

    masked = {}
    for msg in train_replies:
        configs = msg.content.config_records[RECORD_KEY_CONFIGS]
        if Key.MASKED_PARAMETERS in configs:
            hospital = str(msg.content.config_records["fitres.metrics"]["hospital"])
            arrays = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]
            masked[hospital] = np.concatenate([a.ravel() for a in arrays[1:]])  # [0]: weight
    assert set(masked) == set(names)
    secagg = cfg["federation"]["secagg"]
    clip, levels = float(secagg["clipping_range"]), 2**22
    for name in names:  # the masked vector says nothing about the update it hides
        ratio = counts[name] / float(secagg["max_examples"])
        flat = np.concatenate([w.ravel() for w in updates[name][0].values()]).astype(np.float64)
        quantized = (flat * ratio + clip) * levels / (2 * clip)
        corr = np.corrcoef(masked[name].astype(np.float64), quantized)[0, 1]
        assert abs(corr) < 0.05, (name, corr)
    total = sum(m.astype(np.int64) for m in masked.values()) % 2**32
    assert np.std(total / 2**32) > 0.25  # their sum still hides the private masks: noise

    # What the server ends with: the example-weighted average of what was sent.
    saved = torch.load(tmp_path / "checkpoints" / "round-001.pt")["weights"]
    keys = list(saved)
    final = np.concatenate([saved[k].numpy().ravel() for k in keys]).astype(np.float64)
    own = {
        n: np.concatenate([updates[n][0][k].ravel() for k in keys]).astype(np.float64)
        for n in names
    }
    average = sum(own[n] * counts[n] for n in names) / sum(counts.values())
    error = np.abs(final - average).max()
    print(f"largest difference from the weighted average: {error:.2e}")
    assert error < 1e-3  # SecAgg+ quantization
    for n in names:  # and it is none of the hospitals' own updates
        assert np.abs(final - own[n]).max() > 100 * error
    assert (tmp_path / "twin" / "manifest.json").is_file()


def leaves_at_setup(msg, context, call_next):
    """Outer client mod: partition 3's node is gone before it shares any key."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    setup = configs is not None and configs.get(Key.STAGE) == Stage.SETUP
    if setup and int(context.node_config["partition-id"]) == 3:
        raise ConnectionError("hospital-3 went offline")
    return call_next(msg, context)


def refuses(msg, context, call_next):
    """Inner client mod: partition 2 breaks its update, so its own check refuses it."""
    reply = call_next(msg, context)
    if int(context.node_config["partition-id"]) == 2 and not reply.has_error():
        weights = messages.from_record(reply.content[messages.ARRAYS])
        name = next(iter(weights))
        weights[name] = np.full_like(weights[name], np.inf)
        reply.content[messages.ARRAYS] = messages.to_record(weights)
    return reply


def test_a_round_survives_hospitals_leaving_before_and_after_sharing_keys(
    small_real, tmp_path, federate, sent_update
):
    images, labels = small_real
    hospitals = make_hospitals(Split(images, labels), 4, "iid", 0.5, 0.2, seed=0)
    (entry,) = federate(tiny(4), hospitals, tmp_path, mods=[refuses], outer_mods=[leaves_at_setup])
    assert sorted(entry["hospitals"]) == ["hospital-0", "hospital-1"]
    assert entry["secure_aggregation"] == {"summed": 2, "dropped": 2}
    reasons = " | ".join(r["reason"] for r in entry["refused"])
    assert "hospital-3 went offline" in reasons and "hospital-2: own update failed" in reasons
    saved = torch.load(tmp_path / "checkpoints" / "round-001.pt")["weights"]
    (w0, n0), (w1, n1) = sent_update(tmp_path, "hospital-0"), sent_update(tmp_path, "hospital-1")
    for key in w0:
        expected = (w0[key].astype(np.float64) * n0 + w1[key] * n1) / (n0 + n1)
        np.testing.assert_allclose(saved[key].numpy(), expected, atol=1e-3)
