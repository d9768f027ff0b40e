"""fedtwin.metrics: Fréchet distance, scores, classifier training, TSTR/TRTR."""

import numpy as np
import pytest

from fedtwin.metrics import (
    classification_scores,
    evaluate_twin,
    frechet_distance,
    hybrid_classifier,
    predict_proba,
    train_classifier,
)

EVAL = {"seeds": [0], "epochs": 3, "batch_size": 64, "lr": 1e-3, "feature_epochs": 2,
        "c2st_images": 200, "c2st_epochs": 3, "max_train_images": 10_000}  # fmt: skip


def test_frechet_is_zero_for_same_set_and_analytic_for_shifted_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, 2.0, 0.0])
    # same covariance, means differ by `shift`: distance = |shift|^2
    assert frechet_distance(a, a + shift) == pytest.approx(5.0, rel=1e-6)
    b = rng.normal(size=(4000, 3)) * 2.0  # cov 4I vs I: trace term = 3 * (1 + 4 - 4) = 3
    assert frechet_distance(a, b) == pytest.approx(3.0, rel=0.1)


def test_scores_on_known_probabilities():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 0])
    s = classification_scores(probs, labels)
    assert s["acc"] == pytest.approx(0.5)
    assert s["auc"] == pytest.approx(0.75)  # 3 of the 4 (pos, neg) pairs ranked right


def test_classifier_learns_and_is_deterministic(small_real):
    images, labels = small_real
    train, test = slice(0, 220), slice(220, 300)
    kw = dict(epochs=10, batch_size=32, lr=2e-3, seed=1)
    m1 = train_classifier(images[train], labels[train], 2, **kw)
    m2 = train_classifier(images[train], labels[train], 2, **kw)
    p1, p2 = predict_proba(m1, images[test]), predict_proba(m2, images[test])
    assert np.array_equal(p1, p2)
    assert classification_scores(p1, labels[test])["auc"] > 0.75


def test_the_hybrid_classifier_fine_tunes_a_copy_of_the_twins_on_own_and_as_many_twin_images(
    small_real, monkeypatch
):
    """It starts from the twin's classifier (at learning rate 0 it predicts exactly as that
    one), leaves that classifier untouched, and trains on the hospital's images plus as many
    distinct twin images, whatever the twin's size; at most ``eval.max_train_images`` in all."""
    import fedtwin.metrics as metrics

    images, labels = small_real
    own, twin, test = (images[:40], labels[:40]), (images[100:300], labels[100:300]), images[40:100]
    start = train_classifier(*twin, 2, epochs=2, batch_size=32, lr=2e-3, seed=0)
    before = predict_proba(start, test)
    still = hybrid_classifier(start, own, twin, 2, {**EVAL, "lr": 0.0}, seed=0)
    assert np.array_equal(predict_proba(still, test), before)
    tuned = hybrid_classifier(start, own, twin, 2, EVAL, seed=0)
    assert np.array_equal(predict_proba(start, test), before)  # the twin's classifier as it was
    assert not np.allclose(predict_proba(tuned, test), before)
    seen = {}
    monkeypatch.setattr(metrics, "train_classifier", lambda x, y, *a, **k: seen.update(x=x, y=y))
    hybrid_classifier(start, own, twin, 2, EVAL, seed=3)
    assert len(seen["x"]) == 80 and np.array_equal(seen["x"][:40], own[0])
    mixed = {img.tobytes() for img in seen["x"][40:]}
    assert len(mixed) == 40 and mixed <= {img.tobytes() for img in twin[0]}
    hybrid_classifier(start, own, twin, 2, {**EVAL, "max_train_images": 30}, seed=3)
    assert len(seen["x"]) == 30  # 15 of the hospital's, 15 of the twin's
    assert {img.tobytes() for img in seen["x"][:15]} <= {img.tobytes() for img in own[0]}


def test_noise_twin_scores_worse_than_real_and_sits_above_the_floor(small_real):
    images, labels = small_real
    real_train, val = (images[:200], labels[:200]), (images[200:], labels[200:])
    noise = np.random.default_rng(0).integers(0, 256, size=(200, 28, 28), dtype=np.uint8)
    result = evaluate_twin((noise, labels[:200]), real_train, val, EVAL, n_classes=2)
    assert result["tstr"]["auc_mean"] < result["trtr"]["auc_mean"]
    assert result["trtr"]["auc_mean"] > 0.75
    fr = result["frechet"]
    assert fr["twin_vs_val"] > 3 * fr["train_vs_val_floor"]
    assert "not Inception" in fr["feature_space"]
    realism = result["realism"]  # noise is told from real at once, and its spectrum is flat
    assert realism["two_sample"]["twin_vs_real"]["low"] > 0.9
    spectrum = realism["spectrum"]
    assert spectrum["distance_twin_val"] > 5 * spectrum["distance_floor_train_val"]


def test_twin_missing_a_class_does_not_crash(small_real):
    images, labels = small_real
    only_pneumonia = labels[:200] == 1
    twin = (images[:200][only_pneumonia], labels[:200][only_pneumonia])
    result = evaluate_twin(
        twin, (images[:200], labels[:200]), (images[200:], labels[200:]), EVAL, n_classes=2
    )
    assert 0.0 <= result["tstr"]["auc_mean"] <= 1.0
    assert "1" in result["frechet"]["per_class_twin_vs_val"]
    assert "0" not in result["frechet"]["per_class_twin_vs_val"]
