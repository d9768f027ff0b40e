"""fedtwin.training: the DP local round (Opacus) and its accounting."""

import math

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from fedtwin.models import build_model
from fedtwin.privacy import BudgetExceeded, plan_privacy
from fedtwin.tensors import get_weights, set_weights
from fedtwin.training import local_round

MODEL = {"name": "dcgan", "latent_dim": 16, "g_width": 8, "d_width": 8, "d_steps": 1}


def make_plan(n, enabled=True, total_steps=6, epsilon=5.0, delta=1e-4, batch_size=32):
    return plan_privacy(
        enabled=enabled,
        epsilon=epsilon,
        delta=delta,
        max_grad_norm=1.0,
        accountant="rdp",
        n_train=n,
        batch_size=batch_size,
        total_steps=total_steps,
        label_noise=10.0,
    )


def test_two_rounds_accumulate_history_and_match_independent_accountant(small_real):
    images, labels = small_real
    plan = make_plan(len(images))
    model = build_model(MODEL, 2, 28)
    before = get_weights(model)
    r1 = local_round(model, images, labels, plan, steps=3, batch_size=32, history=[], seed=1)
    # A fresh model per round, as a rebuilt ClientApp would have: only the history carries.
    model2 = build_model(MODEL, 2, 28)
    set_weights(model2, r1.weights)
    r2 = local_round(
        model2, images, labels, plan, steps=3, batch_size=32, history=r1.history, seed=2
    )
    acc = RDPAccountant()
    for _ in range(6):
        acc.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
    assert r2.epsilon == pytest.approx(acc.get_epsilon(plan.delta), rel=1e-9)
    assert r1.epsilon < r2.epsilon <= plan.target_epsilon
    assert sum(h[2] for h in r2.history) == 6
    changed = [k for k in before if not np.array_equal(before[k], r2.weights[k])]
    assert any(k.startswith("discriminator") for k in changed)
    assert any(k.startswith("generator") for k in changed)
    assert r2.num_examples == len(images)


def test_round_beyond_budget_is_refused_before_training(small_real):
    images, labels = small_real
    plan = make_plan(len(images), total_steps=3)
    model = build_model(MODEL, 2, 28)
    history = [(plan.noise_multiplier, plan.sample_rate, 3)]
    before = get_weights(model)
    with pytest.raises(BudgetExceeded):
        local_round(model, images, labels, plan, steps=3, batch_size=32, history=history, seed=0)
    assert all(np.array_equal(before[k], v) for k, v in get_weights(model).items())


def test_dp_off_reports_infinite_epsilon(small_real):
    images, labels = small_real
    plan = make_plan(len(images), enabled=False)
    r = local_round(
        build_model(MODEL, 2, 28), images, labels, plan, steps=2, batch_size=32, history=[], seed=0
    )
    assert math.isinf(r.epsilon) and r.history == []


def test_set_weights_rejects_wrong_shape():
    model = build_model(MODEL, 2, 28)
    w = get_weights(model)
    name = next(iter(w))
    w[name] = np.zeros((1, 2, 3), np.float32)
    with pytest.raises(ValueError, match="shape"):
        set_weights(model, w)


def test_tiny_hospital_with_empty_poisson_batches_trains(small_real):
    """8 images at sample rate 1/8: many batches are empty; weights stay finite."""
    images, labels = small_real[0][:8], small_real[1][:8]
    model = build_model(MODEL, 2, 28)
    plan = make_plan(8, total_steps=30, epsilon=50.0, delta=1e-3, batch_size=1)
    result = local_round(model, images, labels, plan, steps=30, batch_size=1, history=[], seed=0)
    assert result.steps == 30 and result.epsilon <= 50.0
    assert all(np.isfinite(w).all() for w in result.weights.values())


def test_optimizer_moments_carry_over_between_rounds(small_real):
    import io

    import torch

    images, labels = small_real
    model = build_model(MODEL, 2, 28)
    plan = make_plan(len(images), total_steps=6)
    first = local_round(model, images, labels, plan, steps=3, batch_size=32, history=[], seed=0)
    second = local_round(
        model,
        images,
        labels,
        plan,
        steps=3,
        batch_size=32,
        history=first.history,
        seed=1,
        optimizer_state=first.optimizer_state,
    )
    d_state = torch.load(io.BytesIO(second.optimizer_state), weights_only=True)[0]["state"]
    assert int(next(iter(d_state.values()))["step"]) == 6  # 3 + 3 Adam steps on D
