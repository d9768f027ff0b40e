"""Deployment when the operator fails, with real Flower processes on 127.0.0.1
(``fedtwin.localnet``, as in ``test_deploy``): the operator's SuperLink killed mid-round.
A hospital's failure is ``test_deploy_node_failure``."""

from __future__ import annotations

import json

import pytest

from fedtwin.ledger import Ledger
from fedtwin.localnet import FLWR_POLL, build, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

HOSPITALS = ("hospital-0", "hospital-1")  # two: the fewest that SecAgg+ sums
TINY = "+experiment=tiny twin.size=200 twin.dicom=false"
TRAINING_ONLY = " model.features=null eval.hybrid=false"  # these tests: training rounds only


def test_the_operator_crashes_and_training_resumes_from_the_last_completed_round(
    tmp_path, data_path
):
    """The SuperLink and its ServerApp are SIGKILLed in round 2, after the hospitals have
    trained and committed it to their ledgers but before the sum is applied. Restarted on
    the same state database, the operator stops the dead run and starts the same app
    again: it resumes after round 1, the hospitals answer round 2 from their ledgers, and
    every ledger ends as a run without the crash leaves it: one entry per round."""
    names = HOSPITALS
    c = build(tmp_path, data_path, names)
    out = tmp_path / "out"
    overrides = TINY + TRAINING_ONLY + " federation.hospitals=2 federation.min_hospitals=2"
    overrides += " federation.rounds=2"
    overrides += " audit.override=operator-crash-test"

    def trained(name: str) -> list[int]:
        try:
            rows = Ledger(tmp_path / name / "ledger.sqlite", delta=1e-5).entries()
        except Exception:  # not there yet
            return []
        return [e.round for e in rows if e.kind == "train"]

    try:
        first = c.start_run(out, overrides)
        wait_for("round 2 committed at every hospital",
                 lambda: all(trained(n) == [1, 2] for n in names), 400)  # fmt: skip
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
    assert all(sorted(e["hospitals"]) == list(names) for e in history)
    for name in names:
        ledger = Ledger(tmp_path / name / "ledger.sqlite", delta=1e-5)
        assert trained(name) == [1, 2]  # round 2 answered again from the ledger, unpaid
        assert [e.kind for e in ledger.entries()] == ["labels", "train", "train"]
        assert ledger.epsilon() == pytest.approx(history[-1]["hospitals"][name]["epsilon"])
    assert (out / "twin" / "manifest.json").is_file()
