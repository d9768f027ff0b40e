"""Statistics on histograms with fixed, shared bins: what the audit and the federated
utility compute from counts that hospitals add up, and their confidence intervals."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Bins:
    """Histogram edges shared by every hospital (so that histograms add up)."""

    pixel: np.ndarray  # nearest-neighbour distances in pixel space
    feature: np.ndarray  # ... between unit-length features (at most 2)
    score: np.ndarray  # density log-ratio, clipped into the end bins
    record: np.ndarray  # copy ratio (distance to a training image over its spacing), 0..2
    ssim: np.ndarray  # structural similarity, -1..1

    @classmethod
    def for_images(cls, image_size: int, n: int = 512) -> Bins:
        """Log-spaced distance bins (2 % relative width at ``n = 512``) with a bin at 0."""
        top = math.sqrt(image_size * image_size)  # largest distance between [0, 1] images
        return cls(
            pixel=np.concatenate([[0.0], np.geomspace(1e-3, top, n)]),
            feature=np.concatenate([[0.0], np.geomspace(1e-4, 2.0, n)]),
            score=np.linspace(-4.0, 4.0, n + 1),
            record=np.linspace(0.0, 2.0, n + 1),
            ssim=np.linspace(-1.0, 1.0, n + 1),
        )


def hist(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bin; values beyond the ends go into the end bins."""
    clipped = np.clip(values, edges[0], edges[-1])
    return np.histogram(clipped, bins=edges)[0].astype(np.int64)


def auc_from_hists(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties (same bin) counted one half."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    total = pos.sum() * neg.sum()
    return float(np.sum(pos * (below + 0.5 * neg)) / total) if total else math.nan


def auc_interval(auc: float, n_pos: int, n_neg: int, z: float = 1.96) -> tuple[float, float]:
    """95 % interval of an AUC (Hanley and McNeil 1982)."""
    if not (n_pos and n_neg) or math.isnan(auc):
        return (math.nan, math.nan)
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (
        n_pos * n_neg
    )
    se = math.sqrt(max(var, 0.0))
    return (max(0.0, auc - z * se), min(1.0, auc + z * se))


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def hist_quantile(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    """Quantile of binned values, linear inside the bin."""
    counts = np.asarray(counts, float)
    total = counts.sum()
    if total == 0:
        return math.nan
    cum = np.cumsum(counts)
    i = int(np.searchsorted(cum, q * total))
    before = cum[i - 1] if i > 0 else 0.0
    inside = (q * total - before) / counts[i] if counts[i] else 0.0
    return float(edges[i] + inside * (edges[i + 1] - edges[i]))
