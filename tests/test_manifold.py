"""fedtwin.manifold: precision, recall, density and coverage on constructed sets."""

import numpy as np
import pytest

from fedtwin.manifold import manifold_report, prdc


def blob(n, seed, centre=0.0, dim=8):
    return np.random.default_rng(seed).normal(centre, 1.0, size=(n, dim))


def test_identical_sets_score_one():
    real = blob(300, 0)
    scores = prdc(real, real.copy(), k=5)
    assert scores["precision"] == 1.0
    assert scores["recall"] == 1.0
    assert scores["coverage"] == 1.0
    # every real point lies in its own ball and in about k others': density near 1
    assert scores["density"] == pytest.approx(1.2, abs=0.25)


def test_disjoint_sets_score_zero():
    scores = prdc(blob(300, 0), blob(300, 1, centre=50.0), k=5)
    assert scores == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_a_fresh_sample_of_the_same_distribution_scores_high():
    scores = prdc(blob(500, 0), blob(500, 1), k=5)
    assert scores["precision"] > 0.6
    assert scores["recall"] > 0.6
    assert scores["coverage"] > 0.8
    assert 0.6 < scores["density"] < 1.4


def test_a_collapsed_twin_is_precise_but_covers_little():
    real = blob(500, 0)
    # the twin repeats (with tiny jitter) three of the real images: each looks real
    collapsed = np.repeat(real[:3], 200, axis=0) + 1e-3 * blob(600, 2)
    scores = prdc(real, collapsed, k=5)
    assert scores["precision"] == 1.0
    assert scores["coverage"] < 0.05
    assert scores["recall"] < 0.05
    assert scores["density"] > 1.2  # each twin image sits on a real one, inside many balls


def test_report_gives_overall_and_per_class_figures_with_the_ceiling():
    real = np.concatenate([blob(100, 0), blob(100, 1, centre=10.0)])
    real_labels = np.repeat([0, 1], 100)
    ceiling = (np.concatenate([blob(300, 3), blob(300, 4, centre=10.0)]), np.repeat([0, 1], 300))
    # the twin only makes class 0, and puts it where class 0 is
    twin = (blob(400, 5), np.zeros(400, dtype=int))
    report = manifold_report((real, real_labels), twin, ceiling, n_classes=2, k=5)
    assert report["compared_size"] == 400
    assert report["twin"]["coverage"] < 0.55  # half of the real images are class 1
    assert report["twin"]["per_class"]["0"]["coverage"] > 0.8
    assert "1" not in report["twin"]["per_class"]  # no twin images of class 1 to score
    assert report["real_ceiling"]["coverage"] > 0.9
    assert set(report["real_ceiling"]["per_class"]) == {"0", "1"}


def test_too_few_images_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="more than k=5"):
        prdc(blob(5, 0), blob(100, 1), k=5)
