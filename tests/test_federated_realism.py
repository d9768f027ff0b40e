"""The two-sample test federated at the hospitals (``fedtwin.realism.site_two_sample`` and
``pool_two_sample``): pooled, it equals the central computation on the same scores; at one
site it cannot tell real from real and sees blur; a hospital sends aggregates only."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score

from fedtwin.quality import federated_quality
from fedtwin.realism import auc_interval, pool_two_sample, score_record, site_two_sample
from fedtwin.server import messages
from fedtwin.utility import SCORE_BINS

EVAL = {"c2st_images": 200, "c2st_epochs": 5, "batch_size": 64, "lr": 1e-3,
        "min_class_auc": 0.6, "max_c2st_auc": 0.75}  # fmt: skip
KEYS = {"real", "twin", "n_real", "n_twin", "n_fit", "auc"}  # docs/privacy.md names them


@pytest.fixture(scope="module")
def real(data_path) -> np.ndarray:
    """1,000 real chest X-rays."""
    with np.load(data_path) as d:
        return d["train_images"][:1000].copy()


@pytest.fixture(scope="module")
def sites(real) -> dict[str, dict]:
    """One hospital's test with a twin of other real images, and with a blurred twin."""
    train, holdout, twin = real[:400], real[400:600], real[600:]
    soft = np.stack([gaussian_filter(x.astype(float), 1.5) for x in twin]).astype(np.uint8)
    return {
        "same": site_two_sample(twin, train, holdout, EVAL, seed=0),
        "blurred": site_two_sample(soft, train, holdout, EVAL, seed=0),
    }


def bin_centre_scores(rng: np.random.Generator, n: int, shift: float) -> np.ndarray:
    """Scores that sit at the centres of ``SCORE_BINS``: two scores tie exactly when they
    share a bin, so the histograms lose nothing of their ranking."""
    width = SCORE_BINS[1] - SCORE_BINS[0]
    k = np.clip(np.rint(rng.normal(2000 + 50 * shift, 60, n)), 0, len(SCORE_BINS) - 2)
    return SCORE_BINS[0] + (k + 0.5) * width


def test_pooled_auc_equals_the_central_auc_of_every_hospitals_scores() -> None:
    rng = np.random.default_rng(0)
    scores = {  # hospital -> (real holdout scores, unseen twin scores), unequal sizes
        f"hospital-{i}": (bin_centre_scores(rng, n, 0.0), bin_centre_scores(rng, m, s))
        for i, (n, m, s) in enumerate([(300, 250, 1.0), (40, 60, 0.3), (120, 120, 2.0)])
    }
    records = {name: score_record(r, t, n_fit=100) for name, (r, t) in scores.items()}
    pooled = pool_two_sample(records)
    real = np.concatenate([r for r, _ in scores.values()])
    twin = np.concatenate([t for _, t in scores.values()])
    central = roc_auc_score(np.r_[np.zeros(len(real)), np.ones(len(twin))], np.r_[real, twin])
    assert len(np.unique(np.r_[real, twin])) < len(real) + len(twin)  # ties, counted half
    assert pooled["auc"] == pytest.approx(central, abs=1e-12)
    assert pooled["auc"] == pytest.approx(auc_interval(twin, real)["auc"], abs=1e-12)
    assert pooled["low"] < pooled["auc"] < pooled["high"]
    assert (pooled["n_real"], pooled["n_twin"], pooled["hospitals"]) == (460, 430, 3)
    for name, (r, t) in scores.items():
        own = pooled["per_hospital"][name]
        labels = np.r_[np.zeros(len(r)), np.ones(len(t))]
        assert own["auc"] == pytest.approx(roc_auc_score(labels, np.r_[r, t]), abs=1e-12)
        assert (own["n_real"], own["n_twin"], own["n_fit"]) == (len(r), len(t), 100)
    assert pooled["skipped"] == {}


def test_a_hospital_with_too_few_images_is_named_not_pooled(real) -> None:
    few = site_two_sample(real[:15], real[15:400], real[400:600], EVAL, seed=0)
    assert few == {"skipped": 1, "n_train": 385, "n_holdout": 200, "n_twin": 15}
    alone = pool_two_sample({"hospital-0": few})
    assert alone["auc"] is None and alone["hospitals"] == 0 and alone["per_hospital"] == {}
    assert "15 twin images" in alone["skipped"]["hospital-0"]
    rng = np.random.default_rng(1)
    tested = score_record(rng.normal(0, 1, 50), rng.normal(1, 1, 50), 50)
    both = pool_two_sample({"hospital-0": few, "hospital-1": tested})
    assert both["auc"] == pytest.approx(tested["auc"], abs=0.01)  # binned, same scores
    assert list(both["per_hospital"]) == ["hospital-1"] and list(both["skipped"]) == ["hospital-0"]


def test_site_test_cannot_tell_real_from_real_but_sees_blur(sites) -> None:
    same, blurred = sites["same"], sites["blurred"]
    assert (same["n_real"], same["n_twin"], same["n_fit"]) == (200, 200, 200)
    assert abs(same["auc"] - 0.5) < 0.15, same["auc"]
    assert blurred["auc"] > 0.8, blurred["auc"]
    pooled = pool_two_sample(sites)
    assert pooled["per_hospital"]["same"]["auc"] == same["auc"]
    assert 0.5 < pooled["auc"] < blurred["auc"] + 0.05


def test_site_record_holds_only_counts_fixed_size_histograms_and_an_auc(sites) -> None:
    for record in sites.values():
        assert set(record) == KEYS
        for side in ("real", "twin"):  # on the shared bins, whatever the hospital's size
            assert record[side].shape == (len(SCORE_BINS) - 1,)
            assert record[side].dtype == np.int64 and record[side].min() >= 0
            assert record[side].sum() == record[f"n_{side}"]
        assert all(type(record[k]) is int for k in ("n_real", "n_twin", "n_fit"))
        assert type(record["auc"]) is float and 0.0 <= record["auc"] <= 1.0
        flat = messages.flatten(record)  # what the MetricRecord carries
        lengths = {len(v) for v in flat.values() if isinstance(v, list)}
        assert lengths == {len(SCORE_BINS) - 1} and len(flat) == len(KEYS)


def test_server_quality_gate_warns_on_the_pooled_two_sample_auc() -> None:
    def utility(auc):
        return {"auc": 0.9, "two_sample": {"auc": auc}}

    fine = federated_quality(utility(0.6), EVAL)
    assert fine["passed"] and set(fine["checks"]) == {"class_signal", "realism"}
    assert "realism" not in {k for k in fine if k != "checks"}
    bad = federated_quality(utility(0.97), EVAL)
    assert not bad["passed"] and len(bad["warnings"]) == 1
    assert "FAILS THE REALISM TEST" in bad["warnings"][0]
    assert "0.970 on the hospitals' holdouts" in bad["warnings"][0]
    none_tested = federated_quality(utility(None), EVAL)  # every hospital skipped it
    assert none_tested["passed"] and "not measured at the hospitals" in none_tested["realism"]
