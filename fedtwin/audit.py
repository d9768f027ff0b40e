"""Privacy audit of a synthetic twin, computed where the real images are.

Each hospital calls :func:`site_audit` with the candidate twin, its own training images
(members) and its holdout (non-members, never trained on). It returns aggregates only:
counts, sample sizes and histograms on bins fixed in advance (``Bins``), the same at every
hospital. The server's ``fedtwin.audit_pool.pool`` adds them up, so the pooled figures are
exactly what the same statistics give with all hospitals' data in one place (a test
checks this).

What is computed (references in docs/audit.md):

- **near copies**: a twin image ``s`` copies its nearest training image ``x`` when it is
  much closer to ``x`` than any other real image at the hospital is:
  ``d(s, x) / d(x, nearest other training image) < copy_margin`` (0.25), in pixel space
  or in a coarse ``copy_coarse`` x ``copy_coarse`` average-pooled space (where pixel noise
  added to a copy averages out). This is the authenticity test of Alaa et al. 2022 with a
  margin; the margin is set so that real images the generator never saw (other
  hospitals' images, val) are not flagged. The holdout images, scored by the same rule,
  are the hospital's own false-positive baseline. A spacing is floored at the 5th
  percentile of the hospital's spacings, so that a training image with a near-duplicate
  (the same patient twice) does not shelter copies of itself.
- **close to one record**: the same ratio below ``record_ratio`` (0.5) catches what the
  margin lets through, such as a blend that is 70 % one patient. Real images fall there
  too, so it is a rate: the twin's share (lower 95 % bound) must not exceed the
  holdout's (upper 95 % bound).
- **distance to closest record** (DCR): median nearest-training distance of twin images
  over that of holdout images (pixel and feature space); < 1 means the twin sits closer
  to the training images than unseen real images do.
- **structural similarity** (SSIM) of each twin image to its nearest training image (pixel
  space), beside the same for holdout images: how alike in structure, not only in pixel
  distance, a twin image is to the real image it is closest to. Reported (quantiles and
  the share of twin images above the holdout's 99th percentile), not a gate check.
- **closer to train**: share of twin images nearer to a size-matched training subsample
  than to the holdout (0.5 for a generator that does not favour its training data).
- **membership inference**: every training and holdout image is scored by its distance
  to the nearest twin image (GAN-Leaks, pixel and feature space) and by a density ratio
  in the spirit of DOMIAS, ``log(r_real / r_twin)`` with ``r`` the distance to the k-th
  nearest real (other) / twin image; AUC of members vs non-members, with a negative
  control (two random halves of the holdout as members vs non-members).

Above ``max_records`` images at a hospital, the holdout, the members the attacks score
and the spacings behind the copy-ratio floor are random samples of that many; every
training image stays the reference each twin image is searched against, so the cost
grows with the archive, not with its square.

Exact duplicates in the real data are not blamed on the generator: duplicate training
images count once, and holdout images identical to a training image are dropped from the
non-members (they are members in all but name). Images are uint8 ``(N, H, W)`` or, in
colour, ``(N, H, W, C)``; the pixel space is ``x / 255`` flattened, the feature space
unit-length embeddings.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from fedtwin.histograms import (
    Bins,
    hist,
)
from fedtwin.manifold import subsample
from fedtwin.neighbours import closest, nearest
from fedtwin.seeds import derive_seed
from fedtwin.ssim import ssim
from fedtwin.tensors import to_planes

Embed = Callable[[np.ndarray], np.ndarray]  # uint8 (N, H, W) -> features (N, D)

ATTACKS = ("gan_leaks_pixel", "gan_leaks_feature", "density_ratio")


class AuditError(ValueError):
    """The audit cannot run on this hospital's data; the message says why."""


def pixels(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float64) / 255.0


def unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _digests(images: np.ndarray) -> list[bytes]:
    return [hashlib.sha256(img.tobytes()).digest() for img in images]


def deduplicate(train: np.ndarray, holdout: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """Training images once each; holdout without images that are also training images."""
    seen: set[bytes] = set()
    keep_train = []
    for i, d in enumerate(_digests(train)):
        if d not in seen:
            seen.add(d)
            keep_train.append(i)
    keep_holdout, in_train, repeated = [], 0, 0
    held: set[bytes] = set()
    for i, d in enumerate(_digests(holdout)):
        if d in seen:
            in_train += 1
        elif d in held:
            repeated += 1
        else:
            held.add(d)
            keep_holdout.append(i)
    counts = {
        "train_duplicates_removed": len(train) - len(keep_train),
        "holdout_in_train_removed": in_train,
        "holdout_duplicates_removed": repeated,
    }
    return train[keep_train], holdout[keep_holdout], counts


def coarse(images: np.ndarray, size: int) -> np.ndarray:
    """Images averaged down to ``size`` x ``size`` (values in [0, 1]; each colour channel
    on its own), flattened."""
    x = to_planes(images).to(torch.float64) / 255.0
    return torch.nn.functional.adaptive_avg_pool2d(x, size).flatten(1).numpy()


def copy_ratios(
    train: np.ndarray,
    candidates: tuple[np.ndarray, ...],
    coarse_size: int,
    floor_rows: np.ndarray | None = None,
) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """Per image of each candidate set (uint8): its distance to its nearest training image
    ``x`` over ``x``'s distance to its nearest other training image (floored at the 5th
    percentile of the spacings of the training images ``floor_rows``, all by default), the
    smaller of pixel space and the coarse space. Below 1: closer to ``x`` than any other
    training image is; near 0: a copy. ``train`` must be free of exact duplicates and hold
    at least 2 images. Also returns, per set, each image's distance to its nearest training
    image in pixel space (the distance to closest record) and that image's index.

    Spacings are computed only for the training images some candidate is nearest to, and
    for ``floor_rows``: the cost grows with ``len(train)`` times the candidates, not with
    its square."""
    if len(train) < 2:
        raise AuditError("copy ratios need at least 2 distinct training images")
    floor_rows = np.arange(len(train)) if floor_rows is None else np.asarray(floor_rows)
    ratios: list[list[np.ndarray]] = [[] for _ in candidates]
    pixel_nearest: list[tuple[np.ndarray, np.ndarray]] = []
    for space in (pixels, lambda x: coarse(x, coarse_size)):
        t = space(train)
        found = [closest(space(images), t) for images in candidates]
        rows = np.union1d(floor_rows, np.concatenate([j for _, j in found]))
        spacing = np.zeros(len(t))
        spacing[rows] = nearest(t[rows], t, 2)[:, 1]  # the first neighbour is itself
        floor = max(float(np.quantile(spacing[floor_rows], 0.05)), 1e-12)
        for out, (d, j) in zip(ratios, found, strict=True):
            out.append(d / np.maximum(spacing[j], floor))
            if space is pixels:
                pixel_nearest.append((d, j))
    return [np.minimum(*r) for r in ratios], pixel_nearest


def density_score(real: np.ndarray, twin: np.ndarray, k: int) -> np.ndarray:
    """``log(r_real / r_twin)`` per real row: its k-th nearest other real image over its
    k-th nearest twin image. High when the twin is dense where this image is (member-like)."""
    r_real = nearest(real, real, k + 1)[:, -1]  # the first neighbour is the image itself
    r_twin = nearest(real, twin, k)[:, -1]
    return np.log(np.maximum(r_real, 1e-12) / np.maximum(r_twin, 1e-12))


def site_audit(
    twin: np.ndarray,
    train: np.ndarray,
    holdout: np.ndarray,
    cfg: Mapping[str, Any],
    *,
    embed: Embed | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """One hospital's audit aggregates (see the module docstring); nothing per image.

    ``cfg`` is the ``audit`` config group (``copy_margin``, ``copy_coarse``,
    ``density_k``, ``bins``), as the server sends it: checked here.
    """
    if len(twin) == 0:
        raise AuditError("the twin is empty: nothing to audit")
    train_u, holdout_u, counts = deduplicate(train, holdout)
    if len(train_u) < 2 or len(holdout_u) < 4:
        raise AuditError(
            f"the audit needs at least 2 training and 4 holdout images, this hospital has "
            f"{len(train_u)} and {len(holdout_u)} (after removing duplicates); "
            f"raise federation.holdout_fraction or leave this hospital out of the audit"
        )
    bins = Bins.for_images(twin.shape[1], int(cfg["bins"]))
    rng = np.random.default_rng(seed)
    # A large archive: every training image stays the reference a twin image is searched
    # against, but the holdout, the members the attacks score and the spacings that set
    # the copy-ratio floor are random samples of at most max_records (0: all). An older
    # server sends no max_records: every record, as it expects.
    cap = int(cfg.get("max_records", 0))
    n_held = len(holdout_u)
    holdout_u = holdout_u[subsample(n_held, cap or n_held, derive_seed(seed, "holdout"))]
    members = subsample(len(train_u), cap or len(train_u), derive_seed(seed, "members"))
    counts["holdout_sampled_out"] = n_held - len(holdout_u)
    counts["members_sampled_out"] = len(train_u) - len(members)
    px_twin, px_train, px_hold = pixels(twin), pixels(train_u), pixels(holdout_u)
    out: dict[str, Any] = {
        "n_twin": len(twin),
        "n_train": len(train_u),
        "n_holdout": len(holdout_u),
        **counts,
    }

    # Near copies: much closer to one training image than any other training image is.
    limit, size = float(cfg["copy_margin"]), int(cfg["copy_coarse"])
    if not (0.0 < limit <= 0.5 and 1 <= size <= twin.shape[1]):
        raise AuditError(
            f"audit.copy_margin must be in (0, 0.5] and audit.copy_coarse in [1, "
            f"{twin.shape[1]}]; got {limit} and {size}"
        )
    (r_twin, r_hold), pixel_nearest = copy_ratios(train_u, (twin, holdout_u), size, members)
    (d_twin, j_twin), (d_hold, j_hold) = pixel_nearest
    out["copies"] = {
        "near_copies": int(np.sum(r_twin < limit)),
        "holdout_flagged": int(np.sum(r_hold < limit)),
    }
    out["record"] = {"twin": hist(r_twin, bins.record), "holdout": hist(r_hold, bins.record)}

    # Structural similarity to that nearest training image (pixel space), holdout alike.
    out["ssim"] = {
        "twin": hist(ssim(twin, train_u[j_twin]), bins.ssim),
        "holdout": hist(ssim(holdout_u, train_u[j_hold]), bins.ssim),
    }

    # Closer to a size-matched training subsample than to the holdout.
    m = min(len(train_u), len(holdout_u))
    sub_train = px_train[rng.choice(len(train_u), m, replace=False)]
    sub_hold = px_hold[rng.choice(len(holdout_u), m, replace=False)]
    closer = nearest(px_twin, sub_train, 1)[:, 0] < nearest(px_twin, sub_hold, 1)[:, 0]
    out["closer_to_train"] = {"count": int(closer.sum()), "n": len(twin)}

    # Distance to closest record and membership scores, per space.
    spaces = {"pixel": (px_twin, px_train, px_hold, d_twin, d_hold)}
    if embed is not None:
        f_twin, f_train, f_hold = (unit(embed(x)) for x in (twin, train_u, holdout_u))
        spaces["feature"] = (
            f_twin,
            f_train,
            f_hold,
            nearest(f_twin, f_train, 1)[:, 0],
            nearest(f_hold, f_train, 1)[:, 0],
        )
    half = rng.permutation(len(holdout_u)) < len(holdout_u) // 2  # negative control split
    out["dcr"], out["mia"] = {}, {}
    for name, (s, tr, ho, d_twin, d_hold) in spaces.items():
        edges = getattr(bins, name)
        out["dcr"][name] = {"twin": hist(d_twin, edges), "holdout": hist(d_hold, edges)}
        # GAN-Leaks: a real image's distance to its nearest twin image, small = member-like.
        member, non = nearest(tr[members], s, 1)[:, 0], nearest(ho, s, 1)[:, 0]
        out["mia"][f"gan_leaks_{name}"] = _mia_hists(-member, -non, half, -edges[::-1])
    real = spaces.get("feature", spaces["pixel"])
    score = density_score(
        np.concatenate([real[1][members], real[2]]), real[0], int(cfg["density_k"])
    )
    n_tr = len(members)
    out["mia"]["density_ratio"] = _mia_hists(score[:n_tr], score[n_tr:], half, bins.score)
    return out


def _mia_hists(members, nonmembers, half, edges) -> dict[str, Any]:
    """Histograms of attack scores (higher = more member-like) and the negative control."""
    return {
        "members": hist(members, edges),
        "nonmembers": hist(nonmembers, edges),
        "control_a": hist(nonmembers[half], edges),
        "control_b": hist(nonmembers[~half], edges),
    }
