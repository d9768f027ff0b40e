"""A crash of the ServerApp loses no completed round and no ledger entry: the next run
resumes after the last checkpoint with the same round numbers, the hospitals answer the
repeated round from their ledgers, and the ledgers end as those of a run without crash."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedtwin.checkpoints import recent_global_models, save_checkpoint
from fedtwin.config import load_config
from fedtwin.data import Split, make_hospitals
from fedtwin.ledger import Ledger
from fedtwin.privacy import epsilon_spent, plan_from_config
from fedtwin.server.server_app import make_server_app
from fedtwin.server.strategy import TwinFedAvg

pytestmark = pytest.mark.slow


class CrashInRound3(TwinFedAvg):
    """The operator's machine goes down once round 3's replies are in, before they count."""

    def aggregate_train(self, server_round, replies):
        if server_round + self.offset == 3:
            raise SystemExit("the operator's machine went down")
        return super().aggregate_train(server_round, replies)


def accounting(out, name):
    ledger = Ledger(out / "ledgers" / f"{name}.sqlite", delta=1e-5)
    rows = [(e.kind, e.round, e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.entries()]
    return rows, ledger.epsilon()


def test_restart_resumes_and_no_ledger_entry_counts_twice(small_real, tmp_path, federate):
    images, labels = small_real
    hospitals = make_hospitals(Split(images, labels), 2, "iid", 0.5, 0.2, seed=0)
    # training rounds only (the release round and the hybrid figures have tests of their own)
    cfg = load_config(
        ["+experiment=tiny", "federation.rounds=3", "twin.size=40", "twin.dicom=false",
         "audit.override=resume-test", "federation.secure_aggregation=false",
         "model.features=null", "eval.hybrid=false"]
    )  # fmt: skip
    crashed = tmp_path / "crashed"
    try:
        federate(cfg, hospitals, crashed, make_server_app(cfg, crashed, CrashInRound3))
    except (SystemExit, Exception):
        pass  # however the engine reports the dead ServerApp
    assert sorted(p.name for p in (crashed / "checkpoints").glob("*.pt")) == [
        "round-001.pt",
        "round-002.pt",
    ]
    assert not (crashed / "twin").exists()
    before = {h.name: accounting(crashed, h.name) for h in hospitals}
    assert all(sum(k == "train" for k, *_ in rows) == 3 for rows, _ in before.values())

    federate(cfg, hospitals, crashed)  # restarted: resumes after round 2
    history = json.loads((crashed / "history.json").read_text())["rounds"]
    assert [r["round"] for r in history] == [1, 2, 3]
    assert (crashed / "checkpoints" / "round-003.pt").is_file()
    assert (crashed / "twin" / "manifest.json").is_file()
    fed = cfg["federation"]
    for h in hospitals:
        assert accounting(crashed, h.name) == before[h.name]  # round 3 answered, not re-paid
        # as a run without the crash leaves it: the class counts, then one entry per round,
        # each at the noise the hospital planned for the whole federation
        plan = plan_from_config(cfg["privacy"], n_train=len(h.train),
                                batch_size=fed["batch_size"],
                                total_steps=fed["rounds"] * fed["local_steps"])  # fmt: skip
        rows, eps = accounting(crashed, h.name)
        assert [row[0] for row in rows] == ["labels", "train", "train", "train"]
        assert rows[0][2:] == plan.label_release()
        step = (plan.noise_multiplier, plan.sample_rate, fed["local_steps"])
        assert rows[1:] == [("train", r, *step) for r in (1, 2, 3)]
        assert eps == pytest.approx(epsilon_spent([row[2:] for row in rows], 1e-5), rel=1e-12)
        assert eps <= cfg["privacy"]["epsilon"]


class CrashInRound1(TwinFedAvg):
    """The operator's machine goes down in round 1, after the feature release (round 0)."""

    def aggregate_train(self, server_round, replies):
        if server_round + self.offset == 1:
            raise SystemExit("the operator's machine went down")
        return super().aggregate_train(server_round, replies)


def test_a_crash_after_the_feature_release_neither_repeats_nor_repays_it(
    small_real, tmp_path, federate
):
    images, labels = small_real
    hospitals = make_hospitals(Split(images, labels), 2, "iid", 0.5, 0.2, seed=0)
    cfg = load_config(
        ["+experiment=tiny", "federation.rounds=2", "twin.size=40", "twin.dicom=false",
         "audit.override=resume-test", "federation.secure_aggregation=false",
         "eval.hybrid=false"]
    )  # fmt: skip
    out = tmp_path / "crashed"
    try:
        federate(cfg, hospitals, out, make_server_app(cfg, out, CrashInRound1))
    except (SystemExit, Exception):
        pass
    assert [p.name for p in (out / "checkpoints").glob("*.pt")] == ["round-000.pt"]
    released = torch.load(out / "checkpoints" / "round-000.pt")["weights"]
    history = json.loads((out / "history.json").read_text())["rounds"]
    assert [r["round"] for r in history] == [0] and "loss" in history[0]["warm_start"]

    federate(cfg, hospitals, out)  # restarted: goes on with round 1 from the fitted model
    history = json.loads((out / "history.json").read_text())["rounds"]
    assert [r["round"] for r in history] == [0, 1, 2]
    again = torch.load(out / "checkpoints" / "round-000.pt")["weights"]
    assert all(torch.equal(released[k], again[k]) for k in released)  # not fitted twice
    for h in hospitals:
        rows, _ = accounting(out, h.name)
        assert [kind for kind, *_ in rows] == ["labels", "features", "train", "train"]
    manifest = json.loads((out / "twin" / "manifest.json").read_text())
    assert manifest["generator_rounds"] == [1, 2]  # the release round made no generator


def test_the_twin_reads_the_last_rounds_that_made_a_global_model(tmp_path):
    history = [{"round": r, "hospitals": {"h0": {}} if r != 3 else {}} for r in (1, 2, 3, 4)]
    for r in (1, 2, 4, 9):  # round 3 made no model; round 9 is another run's leftover
        weights = {"w": np.full(2, float(r), dtype=np.float32)}
        save_checkpoint(tmp_path, r, weights, history)
    models = recent_global_models(tmp_path, history, 2)
    assert [r for r, _ in models] == [2, 4]
    assert [float(w["w"][0]) for _, w in models] == [2.0, 4.0]
    assert [r for r, _ in recent_global_models(tmp_path, history, 10)] == [1, 2, 4]
    with pytest.raises(ValueError, match="twin.checkpoints"):
        recent_global_models(tmp_path, history, 0)
    (tmp_path / "checkpoints" / "round-002.pt").unlink()
    with pytest.raises(FileNotFoundError, match="round-002.pt is missing"):
        recent_global_models(tmp_path, history, 2)
