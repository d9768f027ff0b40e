"""Exact nearest-neighbour search between two sets of vectors, chunked so that memory stays
bounded whatever the sizes (float64 L2, on torch)."""

from __future__ import annotations

import numpy as np
import torch


def nearest(a: np.ndarray, b: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """Distances ``(len(a), k)`` from each row of ``a`` to its ``k`` nearest rows of ``b``,
    ascending (float64 L2)."""
    return _neighbours(a, b, k, chunk)[0]


def closest(a: np.ndarray, b: np.ndarray, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``a``: the distance to its nearest row of ``b`` and that row's index."""
    dist, index = _neighbours(a, b, 1, chunk)
    return dist[:, 0], index[:, 0]


def _neighbours(a: np.ndarray, b: np.ndarray, k: int, chunk: int) -> tuple[np.ndarray, ...]:
    """Distances and indices ``(len(a), k)`` of the ``k`` nearest rows of ``b``, chunked
    over ``a`` so that memory stays bounded."""
    k = min(k, len(b))
    tb = torch.as_tensor(b, dtype=torch.float64)
    b2 = (tb * tb).sum(1)
    dist, index = [], []
    for start in range(0, len(a), chunk):
        ta = torch.as_tensor(a[start : start + chunk], dtype=torch.float64)
        d2 = (ta * ta).sum(1, keepdim=True) + b2 - 2.0 * ta @ tb.T
        top = torch.topk(d2, k, dim=1, largest=False)
        dist.append(top.values.clamp(min=0).sqrt())
        index.append(top.indices)
    if not dist:
        return np.zeros((0, k)), np.zeros((0, k), dtype=np.int64)
    return torch.cat(dist).numpy(), torch.cat(index).numpy()
