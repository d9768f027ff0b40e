"""The hospital's privacy ledger: it outlives the ClientApp and the node, a retried round is
not paid twice, the budget is enforced and refusals are on the record."""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from opacus.accountants import create_accountant

from fedtwin.cli import main
from fedtwin.client.client_app import make_client_app
from fedtwin.config import load_config
from fedtwin.data import Split, make_hospitals
from fedtwin.ledger import Ledger, digest
from fedtwin.privacy import BudgetExceeded
from fedtwin.server import messages
from fedtwin.server.server_app import initial_weights


def test_entries_survive_reopening_and_match_an_independent_accountant(tmp_path):
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path, delta=1e-5)
    ledger.commit("labels", digest("l"), (10.0, 1.0, 1), b"[0.5, 0.5]")
    for r in (1, 2, 3):
        entry = ledger.commit("train", digest(str(r)), (1.1, 0.02, 50), b"reply", run="7", round=r)
    reopened = Ledger(path, delta=1e-5)  # a restarted node
    assert reopened.history() == [(10.0, 1.0, 1)] + [(1.1, 0.02, 50)] * 3
    acc = create_accountant("rdp")
    acc.history = [(10.0, 1.0, 1), (1.1, 0.02, 150)]
    assert reopened.epsilon() == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert entry.epsilon == pytest.approx(reopened.epsilon())
    assert reopened.answered("train", digest("2")) == b"reply"
    assert reopened.answered("train", digest("4")) is None
    with pytest.raises(ValueError, match="already in the ledger"):
        reopened.commit("train", digest("2"), (1.1, 0.02, 50), b"again")
    assert len(reopened.entries()) == 4  # the refused duplicate left nothing behind


def test_dp_off_is_recorded_as_infinite(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite", delta=1e-5)
    ledger.commit("train", digest("a"), (1.0, 0.02, 10), b"")
    ledger.commit("train", digest("b"), (0.0, 0.02, 10), b"")  # a baseline without DP
    assert ledger.epsilon() == float("inf") and ledger.entries()[-1].epsilon < 0
    assert "inf (DP off in some entry)" in ledger.describe()


def test_old_replies_are_dropped_but_not_their_accounting(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite", delta=1e-5)
    for r in range(5):
        ledger.commit("train", digest(str(r)), (1.0, 0.02, 10), b"x" * 100)
    ledger.forget_old_replies(keep=2)
    assert len(ledger.history()) == 5
    assert [ledger.answered("train", digest(str(r))) for r in range(5)] == [
        b"",
        b"",
        b"",
        *[b"x" * 100] * 2,
    ]


# ---- the real ClientApp with its ledger ---------------------------------------------------


@pytest.fixture(scope="module")
def setting(small_real):
    images, labels = small_real
    hospitals = make_hospitals(Split(images, labels), 2, "iid", 0.5, 0.2, seed=0)
    # a budget that covers one planned round of 2 steps and nothing more
    cfg = load_config(["federation.rounds=1", "federation.local_steps=2", "privacy.epsilon=3"])
    return cfg, hospitals


def train_message(cfg, server_round: int, weights) -> Message:
    content = RecordDict(
        {
            messages.ARRAYS: messages.to_record(weights),
            messages.CONFIG: ConfigRecord({"local-steps": 2, "server-round": server_round}),
        }
    )
    meta = Metadata(
        run_id=1, message_id=f"train-{server_round}-{time.time()}", src_node_id=0,
        dst_node_id=1, reply_to_message_id="", group_id=str(server_round),
        created_at=time.time(), ttl=600.0, message_type="train",
    )  # fmt: skip
    return Message(content=content, metadata=meta)


def call(cfg, hospitals, ledger, msg) -> Message:
    """A fresh ClientApp and node state each time, as after a node restart."""
    app = make_client_app(cfg, lambda ctx: hospitals[0], lambda ctx, h: ledger)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    return app(msg, context)


def test_client_commits_before_replying_and_does_not_pay_a_retry_twice(setting, tmp_path):
    cfg, hospitals = setting
    path = tmp_path / "hospital-0.sqlite"
    weights = initial_weights(cfg)
    first = call(cfg, hospitals, path, train_message(cfg, 1, weights))
    ledger = Ledger(path, delta=cfg["privacy"]["delta"])
    kinds = [e.kind for e in ledger.entries()]
    assert kinds == ["labels", "train"]
    reported = messages.epsilon_from_metric(first.content[messages.METRICS]["epsilon"])
    acc = create_accountant("rdp")
    acc.history = ledger.history()
    assert reported == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9) and reported <= 3.0

    retried = call(cfg, hospitals, path, train_message(cfg, 1, weights))  # after a crash
    assert [e.kind for e in ledger.entries()] == kinds  # nothing spent again
    a = messages.from_record(first.content[messages.ARRAYS])
    b = messages.from_record(retried.content[messages.ARRAYS])
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert dict(retried.content[messages.METRICS]) == dict(first.content[messages.METRICS])

    # a second round does not fit the budget: refused, recorded, nothing spent
    second = train_message(cfg, 2, messages.from_record(first.content[messages.ARRAYS]))
    with pytest.raises(BudgetExceeded, match="budget"):  # Flower sends its text to the server
        call(cfg, hospitals, path, second)
    assert [e.kind for e in ledger.entries()] == kinds
    assert ledger.refusals()[0]["round"] == 2 and "budget" in ledger.refusals()[0]["reason"]


def test_ledger_show(tmp_path, capsys):
    path = tmp_path / "l.sqlite"
    Ledger(path, delta=1e-5).commit("train", digest("a"), (1.0, 0.02, 10), b"", run="5", round=1)
    assert main(["ledger", "show", str(path), "--budget", "10"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "spent: epsilon" in out and "of budget 10" in out
    assert main(["ledger", "show", str(tmp_path / "missing.sqlite")]) == 2


@pytest.mark.parametrize(
    "content", [b"", b"a text file, not a database\n", b"SQLite format 3\x00" + bytes(400)]
)
def test_ledger_show_refuses_a_file_that_is_not_a_ledger(tmp_path, capsys, content):
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(content)
    assert main(["ledger", "show", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: not a fedtwin privacy ledger" in err and err.count("\n") == 1
    assert path.read_bytes() == content and sorted(tmp_path.iterdir()) == [path]


def test_ledger_show_never_changes_another_applications_database(tmp_path, capsys):
    path = tmp_path / "app.db"
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE users (name TEXT)")
        db.execute("INSERT INTO users VALUES ('ada')")
    before = path.read_bytes()
    assert main(["ledger", "show", str(path)]) == 2
    assert "not a fedtwin privacy ledger (no table 'entries'" in capsys.readouterr().err
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


@pytest.mark.parametrize("delta", ["2", "0", "-1e-5", "nan"])
def test_ledger_show_refuses_a_delta_outside_zero_and_one(tmp_path, capsys, delta):
    path = tmp_path / "l.sqlite"
    Ledger(path, delta=1e-5).commit("train", digest("a"), (1.0, 0.02, 10), b"")
    assert main(["ledger", "show", str(path), f"--delta={delta}"]) == 2
    assert "--delta" in capsys.readouterr().err
    assert main(["ledger", "show", str(path), "--delta", "1e-6"]) == 0


def test_a_federations_starting_point_is_recorded_once(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite", delta=1e-5)
    ledger.commit("train", digest("earlier"), (1.0, 0.02, 10), b"")
    assert ledger.prior("federation-b") == [(1.0, 0.02, 10)]
    ledger.commit("train", digest("b round 1"), (2.0, 0.02, 10), b"")
    # resumed or asked again: the same starting point, not the ledger as it is now
    assert Ledger(tmp_path / "l.sqlite", delta=1e-5).prior("federation-b") == [(1.0, 0.02, 10)]
    assert ledger.prior("federation-c") == [(1.0, 0.02, 10), (2.0, 0.02, 10)]
