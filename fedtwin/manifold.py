"""Precision, recall, density and coverage of a twin against real images, in a feature space.

Each real feature vector gets a ball reaching its k-th nearest real neighbour; the union of
the balls is the estimated real manifold (Kynkäänniemi et al. 2019). Then, with the twin's
own k-NN balls for recall (Naeem et al. 2020 for density and coverage):

- precision: share of twin images inside the real manifold (do they look real?);
- recall: share of real images inside the twin's manifold (is the real variety produced?);
- density: how many real balls hold a twin image, on average, divided by k (about 1 when
  twin and real are alike; above 1 when the twin crowds the dense parts);
- coverage: share of real images with a twin image inside their own ball. It is the figure
  that exposes collapse: a twin that repeats a few images covers only their neighbourhood.

Features are float arrays ``(N, D)``; nothing here knows where they come from.
"""

from __future__ import annotations

import numpy as np
import torch

K_DEFAULT = 5


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances ``(len(a), len(b))`` in float64."""
    ta, tb = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return torch.cdist(ta, tb).numpy()


def _kth_neighbour_radius(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row of ``x`` to its k-th nearest other row."""
    d = _distances(x, x)
    np.fill_diagonal(d, np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def prdc(real: np.ndarray, twin: np.ndarray, k: int = K_DEFAULT) -> dict[str, float]:
    """Precision, recall, density and coverage of ``twin (M, D)`` against ``real (N, D)``.

    Both sets need more than ``k`` rows. Identical sets score 1 for precision, recall and
    coverage; disjoint ones 0.
    """
    real, twin = np.asarray(real, np.float64), np.asarray(twin, np.float64)
    if len(real) <= k or len(twin) <= k:
        raise ValueError(
            f"prdc needs more than k={k} images in each set, got {len(real)} real "
            f"and {len(twin)} twin"
        )
    real_radius = _kth_neighbour_radius(real, k)
    twin_radius = _kth_neighbour_radius(twin, k)
    d = _distances(real, twin)  # (N, M)
    inside_real = d <= real_radius[:, None]  # twin j inside real i's ball
    return {
        "precision": float(inside_real.any(axis=0).mean()),
        "recall": float((d <= twin_radius[None, :]).any(axis=1).mean()),
        "density": float(inside_real.sum() / (k * len(twin))),
        "coverage": float((d.min(axis=1) <= real_radius).mean()),
    }


def subsample(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of ``size`` of ``n`` rows (all of them when ``size >= n``)."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def manifold_report(
    real: tuple[np.ndarray, np.ndarray],
    twin: tuple[np.ndarray, np.ndarray],
    ceiling: tuple[np.ndarray, np.ndarray],
    *,
    n_classes: int,
    k: int = K_DEFAULT,
    seed: int = 0,
) -> dict:
    """PRDC of the twin against ``real`` (features, labels) overall and per class, beside
    the same figures for ``ceiling`` (real images the generator never had to imitate: the
    real train split against val) as what real data scores.

    The twin and the ceiling set are subsampled to the same size, so their figures compare
    (more samples alone raise coverage and recall).
    """
    size = min(len(twin[0]), len(ceiling[0]))
    out: dict = {"k": k, "compared_size": int(size)}
    for name, (feats, labels) in (("twin", twin), ("real_ceiling", ceiling)):
        idx = subsample(len(feats), size, seed)
        feats, labels = feats[idx], labels[idx]
        out[name] = prdc(real[0], feats, k)
        per_class = {}
        for c in range(n_classes):
            r, t = real[0][real[1] == c], feats[labels == c]
            if len(r) > k and len(t) > k:
                per_class[str(c)] = prdc(r, t, k)
        out[name]["per_class"] = per_class
    return out
