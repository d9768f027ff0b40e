"""Tests for fedtwin.data: npz loading and hospital splits."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fedtwin import data
from fedtwin.cli import main
from fedtwin.data import DataError, Split

SHARED_NPZ = Path(__file__).resolve().parents[2] / "shared/data/pneumoniamnist_28_trainval.npz"


def balanced_labels(n_per_class: int = 500, n_classes: int = 2) -> np.ndarray:
    return np.repeat(np.arange(n_classes), n_per_class).astype(np.int64)


def random_split(n: int, size: int = 28, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    return Split(images, rng.integers(0, 2, n).astype(np.int64))


# --- Split and load_npz -----------------------------------------------------------------


def test_split_len_and_class_counts() -> None:
    split = Split(np.zeros((5, 4, 4), np.uint8), np.array([0, 1, 1, 2, 1]))
    assert len(split) == 5
    assert split.class_counts(3).tolist() == [1, 3, 1]
    assert split.class_counts(4).tolist() == [1, 3, 1, 0]
    with pytest.raises(ValueError, match="0..1"):
        split.class_counts(2)


def test_load_npz_flattens_labels_and_squeezes_channel(tmp_path: Path) -> None:
    images = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4, 1)
    path = tmp_path / "x.npz"
    np.savez(path, val_images=images, val_labels=np.array([[1], [0], [1]], np.uint8))
    split = data.load_npz(path, "val")
    assert split.images.shape == (3, 4, 4)
    assert split.labels.dtype == np.int64 and split.labels.tolist() == [1, 0, 1]
    assert np.array_equal(split.images, images[..., 0])


def test_load_npz_converts_rgb_to_grey(tmp_path: Path) -> None:
    rgb = np.zeros((2, 3, 3, 3), np.uint8)
    rgb[0] = 255
    rgb[1, ..., 1] = 100  # pure green
    path = tmp_path / "rgb.npz"
    np.savez(path, train_images=rgb, train_labels=np.array([0, 1]))
    grey = data.load_npz(path).images
    assert grey.shape == (2, 3, 3)
    assert (grey[0] == 255).all() and (grey[1] == round(0.587 * 100)).all()


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"val_images": np.zeros((2, 4, 4), np.uint8)}, r"missing key.*train_images"),
        (
            {"train_images": np.zeros((2, 4, 4)), "train_labels": np.zeros(2, int)},
            "dtype float64; expected uint8",
        ),
        (
            {"train_images": np.zeros((2, 16), np.uint8), "train_labels": np.zeros(2, int)},
            r"shape \(2, 16\)",
        ),
        (
            {"train_images": np.zeros((2, 4, 4), np.uint8), "train_labels": np.zeros(3, int)},
            r"train_labels has shape \(3,\)",
        ),
        (
            {"train_images": np.zeros((2, 4, 4), np.uint8), "train_labels": np.zeros(2)},
            "expected integer class ids",
        ),
    ],
)
def test_load_npz_errors_name_file_and_field(tmp_path: Path, arrays: dict, match: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=match) as info:
        data.load_npz(path)
    assert str(path) in str(info.value)


def test_load_npz_missing_or_not_npz(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        data.load_npz(tmp_path / "absent.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"definitely not a zip archive")
    with pytest.raises(DataError, match="not an .npz"):
        data.load_npz(junk)


def npz_declaring(path: Path, shape: tuple, data: bytes) -> None:
    """An npz whose ``train_images`` header declares uint8 ``shape`` but holds ``data``."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": shape}
    )
    labels = io.BytesIO()
    np.save(labels, np.zeros(2, np.int64))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("train_images.npy", header.getvalue() + data)
        z.writestr("train_labels.npy", labels.getvalue())


def test_npz_declaring_an_enormous_array_is_refused_before_it_is_read(tmp_path: Path, capsys):
    path = tmp_path / "huge.npz"
    npz_declaring(path, (10**12, 28, 28), bytes(100))
    with pytest.raises(DataError, match=r"train_images declares an array of shape \(10+, 28, 28\)"):
        data.load_npz(path)
    assert main(["ingest", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and err.count("\n") == 1 and "MemoryError" not in err


def test_npz_whose_header_does_not_match_its_data_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "short.npz"
    npz_declaring(path, (2, 4, 4), bytes(10))
    with pytest.raises(DataError, match="declares 32 bytes of data but holds 10"):
        data.load_npz(path)


def test_resize_images_crops_and_resizes_only_when_needed() -> None:
    images = np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    assert data.resize_images(images, 28) is images
    assert data.resize_images(images, 14).shape == (2, 14, 14)
    wide = np.zeros((1, 10, 30), np.uint8)
    wide[:, :, 10:20] = 200  # the centre square is uniformly 200
    assert (data.resize_images(wide, 5) == 200).all()


# --- partition, holdout, hospitals --------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "alpha"), [("iid", 0.5), ("dirichlet", 0.5), ("dirichlet", 0.1)]
)
def test_partition_disjoint_complete_deterministic(scheme: str, alpha: float) -> None:
    labels = balanced_labels()
    parts = data.partition(labels, 4, scheme, alpha, seed=3)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) and set(joined.tolist()) == set(range(len(labels)))
    assert all(len(p) >= data.MIN_HOSPITAL_IMAGES for p in parts)
    again = data.partition(labels, 4, scheme, alpha, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = data.partition(labels, 4, scheme, alpha, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def _max_share_gap(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    overall = labels.mean()
    return max(abs(labels[p].mean() - overall) for p in parts)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dirichlet_skews_label_mix_iid_does_not(seed: int) -> None:
    labels = balanced_labels()
    iid = data.partition(labels, 4, "iid", seed=seed)
    skewed = data.partition(labels, 4, "dirichlet", alpha=0.1, seed=seed)
    assert _max_share_gap(labels, iid) < 0.1
    assert _max_share_gap(labels, skewed) > 0.25
    sizes = [len(p) for p in iid]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"scheme": "random"}, "federation.partition"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "federation.alpha"),
        ({"scheme": "dirichlet", "alpha": float("nan")}, "federation.alpha"),
        ({"scheme": "dirichlet", "alpha": -1.0}, "federation.alpha"),
        ({"scheme": "dirichlet", "alpha": "high"}, "federation.alpha"),
        ({"n_hospitals": 0}, "federation.hospitals"),
        ({"n_hospitals": 5000}, "federation.hospitals"),
    ],
)
def test_partition_bad_args_name_the_field(kwargs: dict, field: str) -> None:
    args = {"n_hospitals": 4, "scheme": "iid", "alpha": 0.5, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=field):
        data.partition(balanced_labels(), **args)


def test_holdout_split_stable_and_sized() -> None:
    train, holdout = data.holdout_split(100, 0.2, seed=7)
    assert len(holdout) == 20 and len(train) == 80
    assert set(train.tolist()) | set(holdout.tolist()) == set(range(100))
    again = data.holdout_split(100, 0.2, seed=7)
    assert np.array_equal(train, again[0]) and np.array_equal(holdout, again[1])
    assert not np.array_equal(holdout, data.holdout_split(100, 0.2, seed=8)[1])
    train0, holdout0 = data.holdout_split(10, 0.0, seed=7)
    assert len(holdout0) == 0 and train0.tolist() == list(range(10))
    with pytest.raises(ValueError, match="federation.holdout_fraction"):
        data.holdout_split(10, 1.0, seed=0)


def test_make_hospitals_is_reproducible() -> None:
    split = random_split(300)
    first = data.make_hospitals(split, 3, "dirichlet", 0.5, 0.25, seed=11)
    second = data.make_hospitals(split, 3, "dirichlet", 0.5, 0.25, seed=11)
    assert [h.name for h in first] == ["hospital-0", "hospital-1", "hospital-2"]
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a.holdout.images, b.holdout.images)
        assert np.array_equal(a.holdout.labels, b.holdout.labels)
        assert np.array_equal(a.train.images, b.train.images)
        assert len(a.train) + len(a.holdout) == len(a.rows)
        assert len(a.holdout) == round(0.25 * len(a.rows))
    # The holdout depends on the hospital's index: hospitals do not share one pattern.
    assert first[0].holdout_seed != first[1].holdout_seed


def test_split_hospital_reproduces_make_hospitals() -> None:
    split = random_split(120)
    for i, h in enumerate(data.make_hospitals(split, 2, "iid", 0.5, 0.2, seed=5)):
        again = data.split_hospital(h.name, split.subset(h.rows), 0.2, data.hospital_seed(5, i))
        assert np.array_equal(again.holdout.images, h.holdout.images)
        assert np.array_equal(again.train.labels, h.train.labels)


def test_label_shares() -> None:
    split = Split(np.zeros((6, 2, 2), np.uint8), np.array([0, 0, 1, 1, 1, 1]))
    hospitals = data.make_hospitals(split, 2, "iid", holdout_fraction=0.0, seed=0)
    assert np.allclose(data.label_shares(hospitals), [2 / 6, 4 / 6])


def test_shared_pneumoniamnist_partitions() -> None:
    if not SHARED_NPZ.is_file():
        pytest.skip(f"shared data file not found at {SHARED_NPZ}")
    train = data.load_npz(SHARED_NPZ, "train")
    assert train.images.shape == (4708, 28, 28)
    assert train.class_counts(2).tolist() == [1214, 3494]
    hospitals = data.make_hospitals(train, 4, "dirichlet", 0.5, 0.2, seed=0)
    assert sum(len(h.train) + len(h.holdout) for h in hospitals) == len(train)
    assert np.isclose(data.label_shares(hospitals).sum(), 1.0)
