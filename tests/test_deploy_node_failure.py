"""Deployment when a hospital fails, with real Flower processes on 127.0.0.1
(``fedtwin.localnet``, as in ``test_deploy``): a hospital's SuperNode killed mid-round. The
operator's crash is ``test_deploy_operator_crash``; each file builds its own consortium
(and runs on a pytest-xdist worker of its own)."""

from __future__ import annotations

import json

import pytest

from fedtwin.ledger import Ledger
from fedtwin.localnet import build, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

HOSPITALS = ("hospital-0", "hospital-1", "hospital-2")
TINY = "+experiment=tiny twin.size=200 twin.dicom=false"
TRAINING_ONLY = " model.features=null eval.hybrid=false"  # these tests: training rounds only


def test_a_hospital_node_killed_mid_round_does_not_stop_the_run(tmp_path, data_path):
    """3 hospitals under SecAgg+; hospital-2's SuperNode is killed (SIGKILL, its ClientApp
    with it) once round 1's first message has reached it. Round 1 goes on with the other
    two once the SuperLink reports the node offline; hospital-2 restarts with the same key
    and ledger, rejoins in round 2 (min_hospitals=3 makes round 2 wait for it), and its
    ledger holds exactly the round it finished."""
    names = HOSPITALS
    c = build(tmp_path, data_path, names)
    out = tmp_path / "out"
    try:
        run_id = c.start_run(out, TINY + TRAINING_ONLY + " federation.hospitals=3 "
                             "federation.min_hospitals=3 "
                             "federation.rounds=2 "
                             "audit.override=node-failure-test")  # fmt: skip

        def rounds_done() -> int:
            try:
                return len(json.loads((out / "history.json").read_text())["rounds"])
            except (OSError, json.JSONDecodeError):
                return 0

        wait_for("round 1 at hospital-2", lambda: "Receiving: train" in c.log("hospital-2"), 300)
        c.kill(c.nodes["hospital-2"])  # the node and its ClientApp, mid-round
        wait_for("round 1 without hospital-2", lambda: rounds_done() >= 1, 300)
        c.start_supernode("hospital-2")  # it comes back, same key, same ledger
        run = c.wait_run(run_id, 600)
        assert run["status"] == "finished:completed", run["logs"][-4000:]
    finally:
        c.stop()

    history = json.loads((out / "history.json").read_text())["rounds"]
    trained = [sorted(e["hospitals"]) for e in history]
    assert trained == [list(names[:2]), list(names)], trained
    assert history[0]["secure_aggregation"] == {"summed": 2, "dropped": 1}
    assert history[0]["refused"], history[0]  # the SuperLink's "node unavailable"
    ledger = Ledger(tmp_path / "hospital-2" / "ledger.sqlite", delta=1e-5)
    rounds = [e.round for e in ledger.entries() if e.kind == "train"]
    assert rounds == [2]  # what it finished; round 1 was never paid for
    for name in names[:2]:
        rows = Ledger(tmp_path / name / "ledger.sqlite", delta=1e-5).entries()
        assert [e.round for e in rows if e.kind == "train"] == [1, 2]
    assert (out / "twin" / "manifest.json").is_file()
