"""Image data for fedtwin: MedMNIST-style npz files and hospital splits (the downloader of
the official files is ``fedtwin.medmnist``).

Conventions used everywhere in fedtwin: images are ``uint8`` arrays ``(N, H, W)`` (bright =
dense, as in MONOCHROME2), or ``(N, H, W, 3)`` RGB for colour datasets (``data.channels``,
as MedMNIST stores them), and labels are ``int64`` arrays ``(N,)``.

A simulated consortium is made in two seeded steps, both reproducible from the config:
``partition`` deals the rows of one dataset out to hospitals (iid or Dirichlet label skew),
then ``holdout_split`` keeps a fixed share of each hospital's images out of training (for
the privacy audit and the utility evaluation).
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedtwin.tensors import from_planes, to_planes

# A Dirichlet partition is redrawn until every hospital holds at least this many images, so
# that no hospital is left with too few images to train, hold out and audit.
MIN_HOSPITAL_IMAGES = 10
_MAX_DIRICHLET_DRAWS = 1000
# ITU-R BT.601 luma weights: the usual RGB -> grey conversion.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])
_RESIZE_PIXELS = 64 << 20  # source pixels resized at a time (256 MiB as float32)


class DataError(ValueError):
    """A data file or folder cannot be used; the message names it and says what to do."""


@dataclass(frozen=True)
class Split:
    """Images ``(N, H, W)`` uint8 (colour ``(N, H, W, C)``) with their labels ``(N,)`` int64."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim not in (3, 4) or self.labels.shape != (len(self.images),):
            raise ValueError(
                f"Split needs images (N, H, W) or (N, H, W, C) and labels (N,); got "
                f"{self.images.shape} and {self.labels.shape}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Split:
        """The rows ``index`` (an index array ``(M,)``) as a new Split."""
        return Split(self.images[index], self.labels[index])

    def class_counts(self, n_classes: int) -> np.ndarray:
        """Images per class, ``(n_classes,)`` int64."""
        if len(self) and (self.labels.min() < 0 or self.labels.max() >= n_classes):
            raise ValueError(f"labels must lie in 0..{n_classes - 1} for {n_classes} classes")
        return np.bincount(self.labels, minlength=n_classes).astype(np.int64)


def empty_split(image_size: int, channels: int = 1) -> Split:
    """A Split with no rows: images ``(0, image_size, image_size)`` (colour: ``(..., C)``)."""
    shape = (0, image_size, image_size, *((channels,) if channels > 1 else ()))
    return Split(np.zeros(shape, np.uint8), np.zeros((0,), np.int64))


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Make ``(N, H, W)`` uint8 images ``(N, size, size)`` (colour ``(N, H, W, C)``:
    ``(N, size, size, C)``); untouched when already that size.

    Non-square images are centre-cropped to a square first, as MedMNIST did, so anatomy is
    not stretched. Resizing is bilinear with antialiasing (no aliasing when shrinking).
    """
    n, h, w = images.shape[:3]
    if (h, w) == (size, size):
        return images
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = images[:, top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(square)
    out = np.empty((n, size, size, *images.shape[3:]), np.uint8)
    step = max(1, _RESIZE_PIXELS // (side * side))  # bounds the float copies torch makes
    for start in range(0, n, step):
        x = to_planes(np.ascontiguousarray(square[start : start + step])).float()
        y = F.interpolate(x, (size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + step] = from_planes(y.round().clamp(0, 255).to(torch.uint8))
    return out


def load_npz(path: str | Path, split: str = "train", channels: int | None = 1) -> Split:
    """Read one split of a MedMNIST-format npz (``{split}_images``, ``{split}_labels``).

    Images may be ``(N, H, W)`` or ``(N, H, W, 1)`` uint8, or RGB ``(N, H, W, 3)``. With
    ``channels=1`` (``data.channels``) they come back ``(N, H, W)``, RGB converted to grey
    (ITU-R 601 luma); with ``channels=3`` ``(N, H, W, 3)``, and grey images are refused
    (a colour model would learn three equal channels); ``None`` keeps them as stored.
    Labels ``(N,)`` or ``(N, 1)`` of any integer type come back as int64 ``(N,)``.
    """
    path = Path(path)
    if not path.is_file():
        what = "not a regular file" if path.exists() else "no such file"
        raise DataError(f"{path}: {what}; pass data.path=/path/to/a MedMNIST .npz")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not an .npz (zip) file; expected a MedMNIST-format .npz")
    wanted = (f"{split}_images", f"{split}_labels")
    try:
        _check_array_sizes(path, wanted)
        with np.load(path, allow_pickle=False) as npz:
            keys = sorted(npz.files)
            arrays = {k: npz[k] for k in wanted if k in keys}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, MemoryError) as e:
        if isinstance(e, DataError):
            raise
        reason = str(e) or type(e).__name__
        raise DataError(f"{path}: cannot read the .npz ({reason}); check or re-create it") from e
    missing = [k for k in wanted if k not in arrays]
    if missing:
        raise DataError(
            f"{path}: missing key(s) {missing}; a MedMNIST npz has {list(wanted)} "
            f"(keys found: {keys})"
        )
    images, labels = arrays[wanted[0]], arrays[wanted[1]]
    images = _check_images(path, split, images, channels)
    return Split(images, _check_labels(path, split, labels, images))


def _check_array_sizes(path: Path, keys: tuple[str, ...]) -> None:
    """Refuse, before reading, an array whose header declares more bytes than its zip member
    holds, or more than half this machine's memory (numpy allocates what it declares)."""
    limit = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: info for info in archive.infolist()}
        for key in keys:
            info = members.get(f"{key}.npy")
            if info is None:
                continue
            with archive.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                header = f.tell()
            declared = math.prod(shape) * dtype.itemsize
            if declared > limit:
                raise DataError(
                    f"{path}: {key} declares an array of shape {shape} ({declared / 2**30:.1f} "
                    f"GiB), more than half of this machine's memory; use a smaller file"
                )
            if not dtype.hasobject and declared != info.file_size - header:
                raise DataError(
                    f"{path}: {key} declares {declared} bytes of data but holds "
                    f"{info.file_size - header}; the file is damaged, re-create it"
                )


def _check_images(path: Path, split: str, images: np.ndarray, channels: int | None) -> np.ndarray:
    key = f"{split}_images"
    if images.dtype != np.uint8:
        raise DataError(
            f"{path}: {key} has dtype {images.dtype}; expected uint8 0..255 "
            "(convert with np.clip(x, 0, 255).astype(np.uint8))"
        )
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    rgb = images.ndim == 4 and images.shape[-1] == 3
    if not (images.ndim == 3 or rgb) or min(images.shape[1:3], default=0) < 1:
        raise DataError(
            f"{path}: {key} has shape {images.shape}; expected (N, H, W), (N, H, W, 1) "
            "or RGB (N, H, W, 3)"
        )
    if rgb and channels == 1:
        grey = images.astype(np.float64) @ LUMA_WEIGHTS
        images = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    elif not rgb and channels == 3:
        raise DataError(
            f"{path}: {key} holds grey images {images.shape}, but data.channels=3 (colour); "
            "use a grey dataset's config (data.channels=1) or a colour file"
        )
    elif channels not in (None, 1, 3):
        raise DataError(f"data.channels={channels}: expected 1 (grey) or 3 (colour)")
    return np.ascontiguousarray(images)


def _check_labels(path: Path, split: str, labels: np.ndarray, images: np.ndarray) -> np.ndarray:
    key = f"{split}_labels"
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {key} has dtype {labels.dtype}; expected integer class ids")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(
            f"{path}: {key} has shape {labels.shape}: {labels.shape[1]} labels per image "
            "(multi-label data, such as ChestMNIST's 14 findings); fedtwin trains single-label "
            "class-conditional generators and needs one class id per image, (N,) or (N, 1); "
            "choose a single-label dataset, e.g. data=pneumoniamnist"
        )
    if labels.shape != (len(images),):
        raise DataError(
            f"{path}: {key} has shape {labels.shape}; expected ({len(images)},) or "
            f"({len(images)}, 1) to match {split}_images (multi-label data is not supported)"
        )
    if len(labels) and labels.min() < 0:
        raise DataError(f"{path}: {key} has negative values; expected class ids 0, 1, ...")
    return labels.astype(np.int64)


# --- hospitals --------------------------------------------------------------------------


def partition(
    labels: np.ndarray,
    n_hospitals: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """Deal rows out to hospitals; returns one sorted index array ``(N_h,)`` per hospital.

    The arrays are disjoint and together cover ``range(len(labels))``.

    - ``iid``: a seeded shuffle cut into near-equal parts.
    - ``dirichlet``: label skew. For each class, the shares of its images per hospital are
      drawn from Dirichlet(alpha); smaller alpha = more skewed mixes. The whole draw is
      repeated until every hospital holds at least ``min(MIN_HOSPITAL_IMAGES, N //
      n_hospitals)`` images (up to 1000 draws, then ValueError).
    """
    labels = np.asarray(labels).reshape(-1)
    n = len(labels)
    if n_hospitals < 1 or n < n_hospitals:
        raise ValueError(
            f"federation.hospitals={n_hospitals}: need 1 to {n} hospitals for {n} images"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(n), n_hospitals)]
    if scheme != "dirichlet":
        raise ValueError(f"federation.partition={scheme!r}: expected 'iid' or 'dirichlet'")
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        alpha = float("nan")  # reported just below, naming the config field
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"federation.alpha={alpha}: must be a positive number, e.g. 0.5")
    min_size = min(MIN_HOSPITAL_IMAGES, n // n_hospitals)
    for _ in range(_MAX_DIRICHLET_DRAWS):
        parts = _dirichlet_draw(labels, n_hospitals, alpha, rng)
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise ValueError(
        f"federation.alpha={alpha}: no Dirichlet draw in {_MAX_DIRICHLET_DRAWS} gave every one "
        f"of {n_hospitals} hospitals {min_size} images; raise federation.alpha or lower "
        "federation.hospitals"
    )


def _dirichlet_draw(
    labels: np.ndarray, n_hospitals: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    chunks: list[list[np.ndarray]] = [[] for _ in range(n_hospitals)]
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet(np.full(n_hospitals, alpha))
        cuts = np.floor(np.cumsum(shares)[:-1] * len(rows)).astype(int)
        for h, piece in enumerate(np.split(rows, cuts)):
            chunks[h].append(piece)
    return [np.sort(np.concatenate(c)) for c in chunks]


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into sorted ``(train_idx, holdout_idx)``.

    The holdout has ``round(n * fraction)`` rows (at most ``n - 1``, so training always has
    data); ``fraction=0`` gives an empty holdout.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"federation.holdout_fraction={fraction}: must be in [0, 1)")
    n_holdout = min(int(round(n * fraction)), max(n - 1, 0))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_holdout:]), np.sort(order[:n_holdout])


def hospital_seed(seed: int, index: int) -> int:
    """The holdout seed of hospital ``index``: fixed by (run seed, index), so a hospital
    that restarts, or re-ingests its archive, gets the same holdout."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


@dataclass
class Hospital:
    """One hospital's images: ``train`` is used for training, ``holdout`` never is.

    ``rows`` are the rows of the source split the hospital holds (ascending, train and
    holdout together) when the hospital was simulated from one dataset; ``holdout_seed``
    is the seed ``holdout_split`` used.
    """

    name: str
    train: Split
    holdout: Split
    rows: np.ndarray | None = None
    holdout_seed: int | None = None


def split_hospital(name: str, data: Split, holdout_fraction: float, holdout_seed: int) -> Hospital:
    """A hospital from all its images ``data`` (in archive order) and its holdout seed.

    The client calls this after ingesting its archive, the simulation via make_hospitals:
    one function, so both get the same holdout.
    """
    train_idx, holdout_idx = holdout_split(len(data), holdout_fraction, holdout_seed)
    return Hospital(
        name, data.subset(train_idx), data.subset(holdout_idx), holdout_seed=holdout_seed
    )


def make_hospitals(
    data: Split,
    n_hospitals: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    holdout_fraction: float = 0.2,
    seed: int = 0,
) -> list[Hospital]:
    """Simulate a consortium from one dataset: ``hospital-0``, ``hospital-1``, ..."""
    hospitals = []
    for i, rows in enumerate(partition(data.labels, n_hospitals, scheme, alpha, seed)):
        h = split_hospital(
            f"hospital-{i}", data.subset(rows), holdout_fraction, hospital_seed(seed, i)
        )
        h.rows = rows
        hospitals.append(h)
    return hospitals


def pooled_train(hospitals: list[Hospital]) -> Split:
    """All hospitals' training images in one Split (what central training would see)."""
    return Split(
        np.concatenate([h.train.images for h in hospitals]),
        np.concatenate([h.train.labels for h in hospitals]),
    )


def label_shares(hospitals: list[Hospital]) -> np.ndarray:
    """Class proportions ``(n_classes,)`` over all hospitals' training images."""
    labels = np.concatenate([h.train.labels for h in hospitals])
    if len(labels) == 0:
        raise ValueError("label_shares: the hospitals have no training images")
    counts = np.bincount(labels)
    return counts / counts.sum()
