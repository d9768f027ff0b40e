"""Canaries and the one-run epsilon lower bound (fedtwin.canaries), and what the hospital
sends with them: only counts, the same training metrics whatever its secret coins."""

from __future__ import annotations

import math
import os
import stat
import time
from fractions import Fraction

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from fedtwin.canaries import (
    coins,
    epsilon_lower_bound,
    guess,
    hospital_secret,
    loader_batch,
    make_canaries,
    p_value,
    pool_canaries,
    tally,
)
from fedtwin.client.client_app import make_client_app
from fedtwin.config import load_config
from fedtwin.data import Split, make_hospitals
from fedtwin.ledger import Ledger
from fedtwin.metrics import train_classifier
from fedtwin.privacy import sample_rate_for
from fedtwin.server import messages
from fedtwin.server.audited_twin import AUDIT_PARAMETERS
from fedtwin.server.server_app import initial_weights
from fedtwin.tensors import get_weights
from fedtwin.training import local_round


def brute_tail(r: int, v: int, epsilon: float) -> float:
    """P[Binomial(r, q) >= v], q = e^ε / (1 + e^ε), summed term by term."""
    q = Fraction(1 / (1 + math.exp(-epsilon)))
    return float(sum(math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(v, r + 1)))


def brute_delta_term(r: int, v: int, epsilon: float) -> float:
    """max over i = 1..v of P[v - i <= Binomial(r, q) < v] / i, term by term."""
    q = Fraction(1 / (1 + math.exp(-epsilon)))
    pmf = [math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(r + 1)]
    return float(max(sum(pmf[v - i : v]) / i for i in range(1, v + 1)))


@pytest.mark.parametrize("r, v, epsilon", [(10, 10, 1.0), (50, 40, 0.5), (120, 80, 2.0)])
def test_the_p_value_is_the_binomial_tail_plus_the_papers_delta_term(r, v, epsilon):
    assert p_value(400, r, v, epsilon) == pytest.approx(brute_tail(r, v, epsilon), rel=1e-9)
    delta = 1e-5
    expected = brute_tail(r, v, epsilon) + 2 * 400 * delta * brute_delta_term(r, v, epsilon)
    assert p_value(400, r, v, epsilon, delta) == pytest.approx(min(1.0, expected), rel=1e-9)


@pytest.mark.parametrize("r, v", [(20, 20), (100, 90), (400, 260), (1000, 1000)])
def test_the_lower_bound_is_where_the_brute_force_tail_crosses_five_percent(r, v):
    eps = epsilon_lower_bound(2 * r, r, v)
    assert eps > 0
    assert brute_tail(r, v, eps) < 0.05 <= brute_tail(r, v, eps + 1e-6)


def test_a_perfect_attack_proves_the_closed_form_and_a_coin_flip_proves_nothing():
    for r in (10, 100):  # all right: q^r = 0.05, so ε = log(q / (1 - q)) with q = 0.05^(1/r)
        q = 0.05 ** (1 / r)
        assert epsilon_lower_bound(r, r, r) == pytest.approx(math.log(q / (1 - q)), rel=1e-6)
    assert epsilon_lower_bound(200, 100, 50) == 0.0
    assert epsilon_lower_bound(200, 0, 0) == 0.0
    # δ only weakens the bound
    assert epsilon_lower_bound(200, 100, 95, 1e-3) < epsilon_lower_bound(200, 100, 95)


def test_pooled_counts_are_summed_over_hospitals():
    sites = [{"canaries": 50, "guessed": 10, "correct": 10}] * 3
    pooled = pool_canaries(sites, 1e-5, 10.0)
    assert (pooled["canaries"], pooled["guessed"], pooled["correct"]) == (150, 30, 30)
    assert pooled["epsilon_lower_bound"] == pytest.approx(epsilon_lower_bound(150, 30, 30, 1e-5))
    assert pooled["epsilon_accounted"] == 10.0 and pooled["hospitals"] == 3


def test_guesses_take_the_named_end_and_abstain_in_the_middle():
    scores = np.arange(10.0)
    assert list(guess(scores, 0.4, "out")) == [-1, -1, -1, -1, 0, 0, 0, 0, 0, 0]
    assert list(guess(scores, 0.4, "in")) == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    g = guess(scores, 0.4, "both")
    assert list(g) == [-1, -1, 0, 0, 0, 0, 0, 0, 1, 1]
    taken = np.array([False, True, *[False] * 6, True, True])
    assert tally(g, taken) == {"canaries": 10, "guessed": 4, "correct": 3}
    with pytest.raises(ValueError, match="audit.canary_side"):
        guess(scores, 0.4, "middle")


def test_canaries_are_public_and_distinct_the_coins_secret(tmp_path):
    a = make_canaries(30, (28, 28), 2, seed=0, hospital="hospital-0")
    assert a.images.shape == (30, 28, 28) and set(np.unique(a.images)) == {0, 255}
    again = make_canaries(30, (28, 28), 2, seed=0, hospital="hospital-0")
    assert np.array_equal(a.images, again.images)  # anyone can re-make them
    other = make_canaries(30, (28, 28), 2, seed=0, hospital="hospital-1")
    assert not np.array_equal(a.images, other.images)
    assert len({img.tobytes() for img in a.images}) == 30
    colour = make_canaries(3, (28, 28, 3), 5, seed=0, hospital="h")
    assert colour.images.shape == (3, 28, 28, 3) and colour.labels.max() < 5

    path = tmp_path / "hospital-0.canary-secret"
    secret = hospital_secret(path)
    assert hospital_secret(path) == secret  # made once, the same ever after
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    mine = coins(secret, "hospital-0", 400)
    assert 150 < mine.sum() < 250  # about half
    assert not np.array_equal(mine, coins(hospital_secret(tmp_path / "x"), "hospital-0", 400))


@pytest.mark.parametrize("n, taken, batch", [(900, 0, 64), (900, 37, 64), (187, 60, 128)])
def test_canaries_are_sampled_at_the_rate_in_the_ledger(n, taken, batch):
    rate = sample_rate_for(n, batch)
    assert sample_rate_for(n + taken, loader_batch(n + taken, rate)) == rate


# ---- the real ClientApp: what a hospital with canaries sends -----------------------------


def _meta(kind: str, server_round: int) -> Metadata:
    return Metadata(
        run_id=1, message_id=f"{kind}-{server_round}-{time.time()}", src_node_id=0,
        dst_node_id=1, reply_to_message_id="", group_id=str(server_round),
        created_at=time.time(), ttl=600.0, message_type=kind,
    )  # fmt: skip


def _ask(cfg, hospital, ledger, content: RecordDict, kind: str) -> Message:
    app = make_client_app(cfg, lambda ctx: hospital, lambda ctx, h: ledger)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    return app(Message(content=content, metadata=_meta(kind, 1)), context)


def _train_and_audit(cfg, hospital, ledger):
    train = RecordDict(
        {
            messages.ARRAYS: messages.to_record(initial_weights(cfg)),
            messages.CONFIG: ConfigRecord({"local-steps": 2, "server-round": 1}),
        }
    )
    trained = _ask(cfg, hospital, ledger, train, "train")
    twin = np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    twin_labels = np.arange(40) % 2
    clf = train_classifier(twin, twin_labels, 2, epochs=1, batch_size=32, lr=1e-3, seed=0)
    query = RecordDict(
        {
            messages.TWIN: messages.to_record({"images": twin, "labels": twin_labels}),
            messages.CLASSIFIER: messages.to_record(get_weights(clf)),
            messages.AUDIT: ConfigRecord({k: cfg["audit"][k] for k in AUDIT_PARAMETERS}),
        }
    )
    return trained, _ask(cfg, hospital, ledger, query, messages.AUDIT_QUERY)


def test_the_coins_never_leave_the_hospital(small_real, tmp_path, monkeypatch):
    """Two hospitals alike but for their secrets train on different canaries; what they
    send is the same metrics as without canaries, and three counts."""
    from fedtwin.client import hospital as handler

    trained_on = []  # the records each round trained on: its images and the canaries taken

    def spy(model, images, *args, **kwargs):
        trained_on.append(len(images))
        return local_round(model, images, *args, **kwargs)

    monkeypatch.setattr(handler, "local_round", spy)
    hospital = make_hospitals(Split(*small_real), 1, "iid", 0.5, 0.2, seed=0)[0]
    base = ["federation.rounds=1", "federation.local_steps=2", "eval.hybrid=false"]
    cfg = load_config([*base, "audit.canaries=20", "audit.canary_guesses=0.5"])
    plain = load_config(base)
    replies = {
        name: _train_and_audit(c, hospital, tmp_path / name / "hospital-0.sqlite")
        for name, c in (("a", cfg), ("b", cfg), ("none", plain))
    }
    secrets = [hospital_secret(tmp_path / n / "hospital-0.canary-secret") for n in "ab"]
    taken = [coins(s, hospital.name, 20) for s in secrets]
    assert not np.array_equal(*taken)
    n = len(hospital.train)
    assert trained_on == [n + taken[0].sum(), n + taken[1].sum(), n]

    sent = {n: dict(t.content[messages.METRICS]) for n, (t, _) in replies.items()}
    for key in ("num-examples", "epsilon", "steps"):
        assert sent["a"][key] == sent["b"][key] == sent["none"][key], key
    assert sent["a"]["num-examples"] == len(hospital.train)
    rates = {n: Ledger(tmp_path / n / "hospital-0.sqlite", 1e-5).entries()[-1].sample_rate
             for n in replies}  # fmt: skip
    assert rates["a"] == rates["b"] == rates["none"]  # the plan's rate, canaries or not

    for name in "ab":
        audit = dict(replies[name][1].content[messages.AUDIT])
        counts = {k: v for k, v in audit.items() if k.startswith("canaries")}
        assert set(counts) == {"canaries/canaries", "canaries/guessed", "canaries/correct"}
        assert counts["canaries/canaries"] == 20 and counts["canaries/guessed"] == 10
        assert all(isinstance(v, int) for v in counts.values())
    audit = dict(replies["none"][1].content[messages.AUDIT])
    assert not any(k.startswith("canaries") for k in audit)
