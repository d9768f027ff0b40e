"""fedtwin.report: the self-contained HTML report."""

import base64
import math
import re

import numpy as np

from fedtwin.report import image_grid, write_report

EVALUATION = {
    "tstr": {
        "auc_mean": 0.912,
        "auc_std": 0.01,
        "acc_mean": 0.85,
        "acc_std": 0.02,
        "per_seed": [{}, {}, {}],
    },
    "trtr": {"auc_mean": 0.97, "auc_std": 0.0, "acc_mean": 0.9, "acc_std": 0.0, "per_seed": [{}]},
    "frechet": {
        "feature_space": "CNN features; not Inception FID",
        "twin_vs_val": 12.5,
        "twin_vs_train": 11.0,
        "train_vs_val_floor": 1.25,
    },
}


def report(tmp_path, **kw):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(40, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1] * 20)
    args = dict(
        real_val=(imgs, labels),
        twin=(imgs[::-1], labels),
        class_names=["normal", "pneumonia"],
        epsilons={"hospital-0": 9.87654, "hospital-1": 4.5},
        delta=1e-5,
        dp_enabled=True,
        losses=[{"round": 1, "loss_d": 1.3, "loss_g": 0.9}, {"round": 2, "loss_d": math.nan}],
        evaluation=EVALUATION,
        config={"seed": 0},
        wall_time_s=125.0,
        notes=["a note"],
    )
    args.update(kw)
    return write_report(tmp_path / "report.html", **args).read_text()


def test_report_shows_privacy_and_utility(tmp_path):
    page = report(tmp_path)
    for text in ("hospital-0", "9.877", "4.500", "0.912", "0.970", "12.500", "1.250", "2 min 5 s"):
        assert text in page
    assert "DP off" not in page
    assert "not Inception FID" in page


def test_dp_off_is_flagged(tmp_path):
    page = report(tmp_path, dp_enabled=False, epsilons={"hospital-0": math.inf})
    assert "DP off" in page and "ε = ∞" in page
    assert "inf" not in page.split("<h2>Utility")[0].split("<h2>Privacy")[1]


def test_user_strings_are_escaped_and_images_are_png(tmp_path):
    page = report(tmp_path, class_names=["<script>x</script>", "b"])
    assert "<script>x" not in page and "&lt;script&gt;" in page
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(uris) == 5  # 2 classes x (real, twin) + the loss plot
    assert all(base64.b64decode(u)[:8] == b"\x89PNG\r\n\x1a\n" for u in uris)


def test_missing_evaluation_keys_show_na(tmp_path):
    page = report(tmp_path, evaluation={"tstr": {}})
    assert "n/a" in page


def test_image_grid_tiles_row_major_and_pads():
    imgs = np.stack([np.full((2, 3), i + 1, np.uint8) for i in range(5)])
    grid = image_grid(imgs, cols=2)
    assert grid.shape == (6, 6)
    assert grid[0, 0] == 1 and grid[0, 3] == 2 and grid[2, 0] == 3 and grid[4, 0] == 5
    assert (grid[4:, 3:] == 0).all()


def test_report_shows_coverage_beside_the_real_ceiling_and_per_class(tmp_path):
    per_class = {
        "0": {"precision": 0.91, "recall": 0.2, "density": 2.5, "coverage": 0.123},
        "1": {"precision": 0.8, "recall": 0.6, "density": 0.9, "coverage": 0.654},
    }
    manifold = {
        "k": 5,
        "compared_size": 40,
        "twin": {
            "precision": 0.85,
            "recall": 0.4,
            "density": 1.7,
            "coverage": 0.377,
            "per_class": per_class,
        },  # fmt: skip
        "real_ceiling": {
            "precision": 0.94,
            "recall": 0.93,
            "density": 1.01,
            "coverage": 0.911,
            "per_class": {},
        },  # fmt: skip
    }
    page = report(tmp_path, evaluation={**EVALUATION, "manifold": manifold})
    assert "coverage" in page and "real train (ceiling)" in page
    for text in ("0.377", "0.911", "1.700"):
        assert text in page
    # each class's grid is headed by its coverage: a collapsed class shows its low figure
    assert "normal — twin coverage 0.123" in page
    assert "pneumonia — twin coverage 0.654" in page


def test_per_hospital_table_shows_label_mix_and_each_classs_accuracy(tmp_path):
    """A skewed hospital's failure on its rare class shows per class, not in the pooled AUC."""
    from fedtwin.utility import pool_utility

    def site(n_per_class, correct_per_class):
        pairs = enumerate(zip(n_per_class, correct_per_class, strict=True))
        empty = np.zeros(4000)
        return {"per_class": {str(c): {"positive": empty, "negative": empty, "n": n, "correct": k}
                              for c, (n, k) in pairs}}  # fmt: skip

    utility = pool_utility({"hospital-0": site([50, 150], [40, 140]),
                            "hospital-1": site([228, 4], [228, 0])})  # fmt: skip
    assert utility["per_hospital"]["hospital-1"]["per_class"]["1"] == {"n": 4, "acc": 0.0}
    assert utility["per_class"]["0"] == {"n": 278, "acc": 268 / 278}
    page = report(tmp_path, audit={"verdict": "pass", "checks": []}, gate={},
                  federated_utility=utility)  # fmt: skip
    table = page.split("Per hospital, on its own holdout")[1]
    assert "(normal / pneumonia)" in table
    assert "<td>hospital-1</td><td>232 (228 / 4)</td>" in table
    assert "<small>1.000 / 0.000</small>" in table  # hospital-1: every normal, no pneumonia
    assert "<td>432 (278 / 154)</td>" in table  # all hospitals


def test_an_over_sampled_class_and_colour_grids_are_shown(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, size=(30, 28, 28, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2] * 10)
    page = report(
        tmp_path,
        real_val=(imgs, labels),
        twin=(imgs[::-1], np.array([0] * 5 + [1] * 5 + [2] * 20)),
        class_names=["grade_0", "grade_1", "grade_4"],
        config={"twin": {"label_mix": "federation", "class_weights": {"grade_4": 3.0}}},
    )
    assert "<b>over-sampled</b>: grade_4 ×3" in page
    assert "grade_0 5, grade_1 5, grade_4 20" in page
    assert page.count("<h3>grade_") == 3  # one row of grids per class
    plain = report(tmp_path, config={"twin": {"label_mix": "balanced"}})
    assert "Labels: equal shares. Images per class: normal 20, pneumonia 20." in plain


def test_colour_images_tile_into_a_colour_grid():
    images = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3)
    grid = image_grid(images, cols=2)
    assert grid.shape == (2, 4, 3)
    assert np.array_equal(grid[:, 2:], images[1])


def test_a_sampled_audit_says_what_it_left_out():
    from fedtwin.report import _audit_section

    sizes = {"train": 44000, "holdout": 5000, "train_duplicates_removed": 0}
    exact = {**sizes, "members_sampled_out": 0, "holdout_sampled_out": 0}
    page = _audit_section({"verdict": "pass", "sample_sizes": exact}, {}, {}, ["a", "b"])
    assert "max_records" not in page
    sampled = {**sizes, "members_sampled_out": 39000, "holdout_sampled_out": 6000}
    page = _audit_section({"verdict": "pass", "sample_sizes": sampled}, {}, {}, ["a", "b"])
    assert "39000 training images were left out of the membership scores" in page
    assert "6000 holdout images out of the audit" in page
