"""Realism measures on constructed cases: two sets of real images cannot be told apart; a
blurred or noisy copy of them can, and its spectrum says where it differs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score

from fedtwin.quality import evaluation_quality, federated_quality
from fedtwin.realism import (
    auc_interval,
    radial_spectrum,
    realism_report,
    spectral_distance,
    two_sample_test,
)

RECIPE = {"epochs": 5, "batch_size": 64, "lr": 1e-3, "seed": 0}
EVAL = {"c2st_images": 300, "c2st_epochs": 5, "batch_size": 64, "lr": 1e-3,
        "min_class_auc": 0.6, "max_c2st_auc": 0.75}  # fmt: skip


@pytest.fixture(scope="module")
def real(data_path) -> np.ndarray:
    """1,200 real chest X-rays."""
    with np.load(data_path) as d:
        return d["train_images"][:1200].copy()


def blurred(images: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    return np.stack([gaussian_filter(x.astype(float), sigma) for x in images]).astype(np.uint8)


def noisy(images: np.ndarray, std: float = 20.0) -> np.ndarray:
    noise = np.random.default_rng(0).normal(0, std, images.shape)
    return (images + noise).clip(0, 255).astype(np.uint8)


def test_auc_matches_sklearn_and_its_interval_covers_the_truth() -> None:
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 80), np.r_[rng.normal(0, 1, 60), [0.5, 0.5]]  # ties too
    result = auc_interval(pos, neg)
    labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    assert result["auc"] == pytest.approx(roc_auc_score(labels, np.r_[pos, neg]))
    assert result["low"] < result["auc"] < result["high"]
    # binormal scores with a shift of 1: the true AUC is Phi(1 / sqrt 2) = 0.7602
    covered = 0
    for _ in range(300):
        r = auc_interval(rng.normal(1, 1, 100), rng.normal(0, 1, 100))
        covered += r["low"] <= 0.7602 <= r["high"]
    assert 0.90 <= covered / 300 <= 0.99
    separated = auc_interval([3.0, 4.0, 5.0], [0.0, 1.0, 2.0])
    assert separated["auc"] == separated["low"] == separated["high"] == 1.0
    with pytest.raises(ValueError, match="2 scores a side"):
        auc_interval([1.0], [0.0, 1.0])


def test_spectrum_sees_blur_and_noise(real) -> None:
    a, b = real[:600], real[600:]
    floor = spectral_distance(radial_spectrum(a), radial_spectrum(b))
    assert spectral_distance(radial_spectrum(a), radial_spectrum(a)) == 0.0
    assert len(radial_spectrum(a)) == 14
    soft, grainy = radial_spectrum(blurred(a)), radial_spectrum(noisy(a))
    high = slice(7, None)  # the finer half of the rings
    ref = radial_spectrum(b)[high]
    assert (soft[high] < ref).all() and (ref - soft[high]).mean() > 0.25  # blur loses detail
    assert (grainy[high] > ref).all() and (grainy[high] - ref).mean() > 0.25  # noise adds it
    assert spectral_distance(soft, radial_spectrum(b)) > 5 * floor
    colour = np.repeat(a[..., None], 3, axis=3)  # colour: the mean of the channels
    assert np.allclose(radial_spectrum(colour), radial_spectrum(a))


def test_two_sample_test_cannot_tell_real_from_real_but_sees_blur_and_noise(real) -> None:
    fit, other, test, unseen = real[:300], real[300:600], real[600:900], real[900:1200]
    same, _ = two_sample_test(fit, other, test, unseen, **RECIPE)
    assert same["low"] < 0.5 + 0.1 and abs(same["auc"] - 0.5) < 0.1, same
    for changed in (blurred, noisy):
        result, scores = two_sample_test(fit, changed(other), test, changed(unseen), **RECIPE)
        assert result["low"] > 0.8, (changed.__name__, result)
        assert scores.shape == (300,) and result["n_fit"] == 600


def test_realism_report_keeps_its_sets_apart_and_names_the_extremes(real) -> None:
    twin = blurred(real[:400])
    report = realism_report(twin, real[400:1100], real[1100:], EVAL)
    ts = report["two_sample"]
    assert ts["test_per_side"] == 100 and ts["fit_per_side"] == 300  # val has 100 images
    assert ts["twin_vs_real"]["low"] > 0.8 and abs(ts["real_vs_real_floor"]["auc"] - 0.5) < 0.15
    most, least = set(ts["most_real"]), set(ts["least_real"])
    assert len(most) == len(least) == 16 and not most & least
    sp = report["spectrum"]
    assert sp["distance_twin_val"] > 5 * sp["distance_floor_train_val"]
    assert sp["distance_over_floor"] == sp["distance_twin_val"] / sp["distance_floor_train_val"]
    with pytest.raises(ValueError, match="at least 10 images"):
        realism_report(twin[:15], real[400:1100], real[1100:], EVAL)


def test_quality_gate_says_what_failed() -> None:
    good = {"tstr": {"auc_mean": 0.9},
            "realism": {"two_sample": {"twin_vs_real": {"auc": 0.6}}}}  # fmt: skip
    assert evaluation_quality(good, EVAL) == {
        "passed": True,
        "checks": evaluation_quality(good, EVAL)["checks"],
        "warnings": [],
    }
    bad = {"tstr": {"auc_mean": 0.52},
           "realism": {"two_sample": {"twin_vs_real": {"auc": 0.99}}}}  # fmt: skip
    verdict = evaluation_quality(bad, EVAL)
    assert not verdict["passed"] and len(verdict["warnings"]) == 2
    assert "NO USABLE CLASS SIGNAL" in verdict["warnings"][0] and "0.520" in verdict["warnings"][0]
    assert "FAILS THE REALISM TEST" in verdict["warnings"][1]
    server = federated_quality({"auc": 0.5}, EVAL)
    assert not server["passed"] and "holdouts" in server["warnings"][0]
    assert "not measured at the hospitals" in server["realism"]
