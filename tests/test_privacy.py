"""fedtwin.privacy: noise calibration, accounting from history, budget refusal."""

import math

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedtwin.privacy import (
    BudgetExceeded,
    check_budget,
    epsilon_spent,
    noisy_class_shares,
    plan_from_config,
    plan_privacy,
    sample_rate_for,
)


def plan(**kw):
    args = dict(
        enabled=True,
        epsilon=10.0,
        delta=1e-5,
        max_grad_norm=1.0,
        accountant="rdp",
        n_train=940,
        batch_size=128,
        total_steps=200,
        label_noise=10.0,
    )
    return plan_privacy(**{**args, **kw})


def test_sample_rate_matches_opacus_loader_rule():
    assert sample_rate_for(940, 128) == 1 / 8
    assert sample_rate_for(99, 128) == 1.0


@pytest.mark.parametrize("accountant,cls", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_full_plan_lands_at_or_under_target(accountant, cls):
    p = plan(accountant=accountant)
    acc = cls()
    acc.history = [p.label_release(), (p.noise_multiplier, p.sample_rate, p.total_steps)]
    eps = acc.get_epsilon(delta=p.delta)
    assert eps <= p.target_epsilon
    assert eps > 0.9 * p.target_epsilon  # calibrated, not simply over-noised
    # the smallest noise that fits, to 1e-3 (the RDP search skips full evaluations where
    # the integer orders' bound already fits; the answer must not change)
    acc.history = [p.label_release(), (p.noise_multiplier - 1e-3, p.sample_rate, p.total_steps)]
    assert acc.get_epsilon(delta=p.delta) > p.target_epsilon


def test_epsilon_spent_equals_step_by_step_accountant():
    p = plan()
    acc = RDPAccountant()
    for _ in range(73):
        acc.step(noise_multiplier=p.noise_multiplier, sample_rate=p.sample_rate)
    history = [(p.noise_multiplier, p.sample_rate, 50), (p.noise_multiplier, p.sample_rate, 23)]
    assert epsilon_spent(history, p.delta) == pytest.approx(acc.get_epsilon(p.delta), rel=1e-9)


def test_more_noise_for_more_steps():
    assert plan(total_steps=400).noise_multiplier > plan(total_steps=100).noise_multiplier


def test_budget_refuses_steps_beyond_the_plan():
    p = plan(total_steps=100)
    history = [p.label_release(), (p.noise_multiplier, p.sample_rate, 100)]
    with pytest.raises(BudgetExceeded, match="budget 10"):
        check_budget(p, history, 10)
    history = [p.label_release(), (p.noise_multiplier, p.sample_rate, 90)]
    assert check_budget(p, history, 10) <= 10.0


def test_dp_off_is_infinite_and_never_refused():
    p = plan(enabled=False)
    assert p.noise_multiplier == 0.0 and math.isinf(p.target_epsilon)
    assert math.isinf(check_budget(p, [], 10_000))
    assert "inf" in p.describe()


def test_delta_must_be_below_one_over_n():
    with pytest.raises(ValueError, match="privacy.delta"):
        plan(delta=0.01, n_train=940)


def test_label_noise_is_required_and_must_leave_budget():
    with pytest.raises(ValueError, match="label_noise"):
        plan(label_noise=0.0)
    with pytest.raises(ValueError, match="alone spends the whole budget"):
        plan(label_noise=0.1, epsilon=1.0)


def test_class_shares_exact_without_dp_noisy_with_dp():
    labels = np.array([0] * 300 + [1] * 100 + [2] * 0)
    exact = noisy_class_shares(labels, 3, plan(enabled=False))
    assert exact.tolist() == pytest.approx([300 / 401, 100 / 401, 1 / 401])
    draws = np.array([noisy_class_shares(labels, 3, plan(label_noise=10.0)) for _ in range(200)])
    assert np.allclose(draws.sum(axis=1), 1.0) and (draws > 0).all()
    assert not np.allclose(draws[0], draws[1])  # fresh noise each release
    assert draws.mean(axis=0)[0] == pytest.approx(0.75, abs=0.02)


def test_plan_from_config_reads_the_group_and_takes_overrides():
    group = {
        "enabled": True,
        "epsilon": 10.0,
        "delta": 1e-5,
        "max_grad_norm": 20.0,
        "accountant": "rdp",
        "label_noise": 10.0,
    }
    p = plan_from_config(group, n_train=940, batch_size=128, total_steps=200)
    assert p == plan(max_grad_norm=20.0)
    off = plan_from_config(group, n_train=940, batch_size=128, total_steps=200, enabled=False)
    assert not off.enabled and math.isinf(off.target_epsilon)


def test_a_later_federation_plans_for_what_the_ledger_left():
    """Budget 30, 10 spent in an earlier federation: the new plan's noise is calibrated so
    that the whole ledger lands at or under 30, not 30 on top of the 10."""
    earlier = [(10.0, 1.0, 1), (0.8, 0.05, 400)]
    spent = epsilon_spent(earlier, 1e-5)
    assert 5 < spent < 25
    fresh = plan(epsilon=30.0, total_steps=300)
    later = plan(epsilon=30.0, total_steps=300, prior=earlier)
    assert later.noise_multiplier > fresh.noise_multiplier
    whole = [*earlier, later.label_release(), (later.noise_multiplier, later.sample_rate, 300)]
    assert 29.0 < epsilon_spent(whole, 1e-5) <= 30.0
    naive = [*earlier, fresh.label_release(), (fresh.noise_multiplier, fresh.sample_rate, 300)]
    assert epsilon_spent(naive, 1e-5) > 30.0  # what planning without the ledger would do
    with pytest.raises(BudgetExceeded, match="earlier federations spent"):
        plan(epsilon=spent, total_steps=300, prior=earlier)


@pytest.mark.parametrize("accountant,cls", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_the_feature_release_is_planned_for_and_costs_dp_sgd_noise(accountant, cls):
    without = plan(accountant=accountant)
    p = plan(accountant=accountant, feature_noise=2.0)
    assert p.one_shot_releases() == [(10.0, 1.0, 1), (2.0, 1.0, 1)]
    acc = cls()
    acc.history = [*p.one_shot_releases(), (p.noise_multiplier, p.sample_rate, p.total_steps)]
    eps = acc.get_epsilon(delta=p.delta)
    assert 0.9 * p.target_epsilon < eps <= p.target_epsilon
    assert p.noise_multiplier > without.noise_multiplier  # the release is paid for
    assert without.one_shot_releases() == [(10.0, 1.0, 1)]


def test_a_feature_release_that_alone_spends_the_budget_is_refused():
    with pytest.raises(ValueError, match="feature_noise"):
        plan(feature_noise=0.2, epsilon=1.0)
    with pytest.raises(ValueError, match="feature_noise"):
        plan(feature_noise=-1.0)


@pytest.mark.parametrize("epsilon", [10.0, 1.0])
def test_the_feature_release_spends_its_share_of_what_the_class_counts_leave(epsilon):
    privacy = {"enabled": True, "epsilon": epsilon, "delta": 1e-5, "max_grad_norm": 1.0,
               "accountant": "rdp", "label_noise": 10.0, "feature_share": 0.5}  # fmt: skip
    kw = dict(n_train=940, batch_size=128, total_steps=200)
    p = plan_from_config(privacy, features=True, **kw)
    acc = RDPAccountant()
    acc.step(noise_multiplier=10.0, sample_rate=1.0)
    counts = acc.get_epsilon(delta=1e-5)
    acc.step(noise_multiplier=p.feature_noise, sample_rate=1.0)
    releases = acc.get_epsilon(delta=1e-5)
    half = counts + 0.5 * (epsilon - counts)
    assert 0.99 * half <= releases <= half  # calibrated to its share, not over it
    # the model without features releases none, and the DP-SGD steps get more of the budget
    assert plan_from_config(privacy, **kw).feature_noise == 0.0
    assert plan_from_config(privacy, **kw).noise_multiplier < p.noise_multiplier


def test_a_hospital_whose_ledger_is_spent_refuses_a_federation_with_features():
    """Refused (BudgetExceeded: on the ledger's record), not a configuration error."""
    privacy = {"enabled": True, "epsilon": 10.0, "delta": 1e-5, "max_grad_norm": 1.0,
               "accountant": "rdp", "label_noise": 10.0, "feature_share": 0.5}  # fmt: skip
    spent = [(0.5, 1.0, 100)]
    assert epsilon_spent(spent, 1e-5) > 10.0
    for features in (True, False):
        with pytest.raises(BudgetExceeded, match="earlier federations spent"):
            plan_from_config(privacy, n_train=940, batch_size=128, total_steps=200,
                             features=features, prior=spent)  # fmt: skip
