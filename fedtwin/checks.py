"""Checks on a hospital's update before the server averages it (no Flower in here).

An update is rejected, with a reason naming the first problem, if its arrays are not the
model's (names, shapes, dtypes), if any value is not finite, or if it moved the weights
further than ``max_norm`` (L2 over all arrays) from the global model it started from: a
broken or malicious hospital must not drag the average anywhere it likes.

Under secure aggregation the hospital runs these checks on its own update (the server sees
only the sum), plus one more: SecAgg+ would silently clip weights it cannot quantize.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def update_problem(
    update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], max_norm: float
) -> str | None:
    """Why ``update`` cannot be averaged with ``reference``'s model, or None if it can."""
    if set(update) != set(reference):
        missing, extra = sorted(set(reference) - set(update)), sorted(set(update) - set(reference))
        return f"arrays do not match the model (missing {missing[:3]}, unexpected {extra[:3]})"
    squared = 0.0
    for name, ref in reference.items():
        arr = update[name]
        if arr.shape != ref.shape:
            return f"{name}: shape {arr.shape}, the model has {ref.shape}"
        if arr.dtype != ref.dtype:
            return f"{name}: dtype {arr.dtype}, the model has {ref.dtype}"
        if not np.all(np.isfinite(arr)):
            return f"{name}: {int(np.sum(~np.isfinite(arr)))} values are not finite"
        squared += float(np.sum((arr.astype(np.float64) - ref.astype(np.float64)) ** 2))
    norm = squared**0.5
    if norm > max_norm:
        return f"update norm {norm:.3g} exceeds federation.max_update_norm={max_norm:g}"
    return None


def secagg_clip_problem(weights: Mapping[str, np.ndarray], clip: float, scale: float) -> str | None:
    """Why SecAgg+ would clip ``weights``, or None if it would not.

    SecAgg+ multiplies a hospital's weights by ``scale`` (its examples / the workflow's
    max_weight) and clips them to +-``clip`` before quantizing; clipped weights would
    average to something nobody sent.
    """
    for name, arr in weights.items():
        largest = float(np.max(np.abs(arr))) if arr.size else 0.0
        if largest * scale > clip:
            return (
                f"{name}: |weight| {largest:.3g} x examples/max_examples {scale:.3g} exceeds "
                f"the secure aggregation's clipping range {clip:g} "
                "(federation.secagg.clipping_range, federation.secagg.max_examples)"
            )
    return None
