"""fedtwin.baseline: FedAvg and the federated DP-SGD classifier baseline."""

import math

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from fedtwin.baseline import train_federated_dp_classifier
from fedtwin.data import Split, make_hospitals
from fedtwin.inprocess import fedavg
from fedtwin.metrics import predict_proba
from fedtwin.privacy import plan_privacy


def test_fedavg_is_example_weighted():
    a = {"w": np.array([0.0, 2.0])}
    b = {"w": np.array([4.0, 6.0])}
    assert fedavg([a, b], [3, 1])["w"].tolist() == [1.0, 3.0]


def cfg(enabled=True):
    return {
        "seed": 0,
        "data": {"classes": ["normal", "pneumonia"]},
        "privacy": {
            "enabled": enabled,
            "epsilon": 5.0,
            "delta": 1e-4,
            "max_grad_norm": 20.0,
            "accountant": "rdp",
            "label_noise": 10.0,
        },
    }


@pytest.fixture(scope="module")
def hospitals(small_real):
    return make_hospitals(Split(*small_real), 2, "iid", 0.5, 0.2, seed=0)


def test_dp_baseline_reports_the_accountants_epsilon(hospitals):
    model, eps = train_federated_dp_classifier(
        hospitals, cfg(), rounds=2, local_steps=3, batch_size=32
    )
    probs = predict_proba(model, hospitals[0].holdout.images)
    assert np.isfinite(probs).all() and probs.shape == (len(hospitals[0].holdout), 2)
    for h in hospitals:
        plan = plan_privacy(
            enabled=True,
            epsilon=5.0,
            delta=1e-4,
            max_grad_norm=1.0,
            accountant="rdp",
            n_train=len(h.train),
            batch_size=32,
            total_steps=6,
            label_noise=10.0,
        )
        acc = RDPAccountant()
        for _ in range(6):
            acc.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
        assert eps[h.name] == pytest.approx(acc.get_epsilon(1e-4), rel=1e-9)
        assert eps[h.name] <= 5.0


def test_baseline_without_dp_is_infinite(hospitals):
    _, eps = train_federated_dp_classifier(
        hospitals, cfg(enabled=False), rounds=1, local_steps=2, batch_size=32
    )
    assert all(math.isinf(e) for e in eps.values())
