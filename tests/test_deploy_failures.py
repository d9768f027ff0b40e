"""Deployment when things fail, with real Flower processes on 127.0.0.1
(``fedtwin.localnet``, as in ``test_deploy``): first a hospital's SuperNode is killed
mid-round, then the operator's SuperLink. One consortium goes through both, one after the
other, as a real one could (and the Flower processes are started once, not twice)."""

from __future__ import annotations

import json

import pytest

from fedtwin.ledger import Ledger
from fedtwin.localnet import FLWR_POLL, build, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

HOSPITALS = ("hospital-0", "hospital-1", "hospital-2")
TINY = "+experiment=tiny twin.size=200 twin.dicom=false"
TRAINING_ONLY = " model.features=null eval.hybrid=false"  # these tests: training rounds only


def test_a_hospital_then_the_operator_fail_and_no_round_is_lost_or_paid_twice(tmp_path, data_path):
    """Three hospitals under SecAgg+, two rounds.

    1. A hospital fails: hospital-2's SuperNode is killed (SIGKILL, its ClientApp with it)
       once round 1's first message has reached it. Round 1 goes on with the other two once
       the SuperLink reports the node offline; hospital-2 restarts with the same key and
       ledger and rejoins in round 2 (min_hospitals=3 makes round 2 wait for it).
    2. The operator fails: the SuperLink and its ServerApp are SIGKILLed in round 2, after
       the three hospitals have trained and committed it to their ledgers but before the
       sum is applied. Restarted on the same state database, the operator stops the dead
       run and starts the same app again: it resumes after round 1, and the hospitals
       answer round 2 from their ledgers.

    Every ledger ends as a run without the failures leaves it: one entry per round a
    hospital finished (hospital-2: round 2; round 1 was never paid for)."""
    names = HOSPITALS
    c = build(tmp_path, data_path, names)
    out = tmp_path / "out"
    overrides = TINY + TRAINING_ONLY + " federation.hospitals=3 federation.min_hospitals=3"
    overrides += " federation.rounds=2 audit.override=failure-test"
    finished = {"hospital-0": [1, 2], "hospital-1": [1, 2], "hospital-2": [2]}

    def trained(name: str) -> list[int]:
        try:
            rows = Ledger(tmp_path / name / "ledger.sqlite", delta=1e-5).entries()
        except Exception:  # not there yet
            return []
        return [e.round for e in rows if e.kind == "train"]

    def rounds_done() -> int:
        try:
            return len(json.loads((out / "history.json").read_text())["rounds"])
        except (OSError, json.JSONDecodeError):
            return 0

    try:
        first = c.start_run(out, overrides)
        # 1. the hospital
        wait_for("round 1 at hospital-2", lambda: "Receiving: train" in c.log("hospital-2"), 300)
        c.kill(c.nodes["hospital-2"])  # the node and its ClientApp, mid-round
        wait_for("round 1 without hospital-2", lambda: rounds_done() >= 1, 300)
        c.start_supernode("hospital-2")  # it comes back, same key, same ledger
        # 2. the operator
        wait_for("round 2 committed at every hospital",
                 lambda: all(trained(n) == finished[n] for n in names), 400)  # fmt: skip
        c.kill(c.link)  # the operator's machine goes down
        history = json.loads((out / "history.json").read_text())["rounds"]
        assert [e["round"] for e in history] == [1]  # round 2 was not applied
        c.start_superlink()  # restarted on the same state database and port
        wait_for(
            "the SuperNodes back online", lambda: c.online() == len(names), 180, every=FLWR_POLL
        )
        c.flwr("stop", first, "consortium")  # the dead run (or it times out on its own)
        run = c.wait_run(c.start_run(out, overrides), 600)
        assert run["status"] == "finished:completed", run["logs"][-4000:]
    finally:
        c.stop()

    assert "resuming after round 1 of 2" in run["logs"]
    history = json.loads((out / "history.json").read_text())["rounds"]
    assert [e["round"] for e in history] == [1, 2]
    assert [sorted(e["hospitals"]) for e in history] == [list(names[:2]), list(names)]
    assert history[0]["secure_aggregation"] == {"summed": 2, "dropped": 1}
    assert history[0]["refused"], history[0]  # the SuperLink's "node unavailable"
    for name in names:
        ledger = Ledger(tmp_path / name / "ledger.sqlite", delta=1e-5)
        assert trained(name) == finished[name]  # round 2 answered again from the ledger, unpaid
        assert [e.kind for e in ledger.entries()] == ["labels"] + ["train"] * len(finished[name])
        assert ledger.epsilon() == pytest.approx(history[-1]["hospitals"][name]["epsilon"])
    assert (out / "twin" / "manifest.json").is_file()
