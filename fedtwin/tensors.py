"""Conversions between fedtwin's numpy conventions and torch: images (uint8 ``(N, H, W)``
<-> float ``(N, 1, H, W)`` in [-1, 1]) and model weights (what hospitals and the server
exchange: named numpy arrays)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W)`` -> float ``(N, 1, H, W)`` in [-1, 1]."""
    return torch.tensor(images, dtype=torch.float32).div(127.5).sub(1.0).unsqueeze(1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float ``(N, 1, H, W)`` in [-1, 1] -> uint8 ``(N, H, W)``."""
    x = images.detach().squeeze(1).clamp(-1, 1).add(1).mul(127.5).round()
    return x.to(torch.uint8).cpu().numpy()


def get_weights(model: torch.nn.Module) -> OrderedDict[str, np.ndarray]:
    """Floating-point state (parameters and running statistics) as numpy arrays.

    Integer buffers such as BatchNorm's ``num_batches_tracked`` are not exchanged:
    averaging counters means nothing.
    """
    return OrderedDict(
        (k, v.detach().cpu().numpy().copy())
        for k, v in model.state_dict().items()
        if v.is_floating_point()
    )


def set_weights(model: torch.nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Load arrays from ``get_weights``; names and shapes must match exactly."""
    own = model.state_dict()
    expected = {k for k, v in own.items() if v.is_floating_point()}
    if set(weights) != expected:
        missing, extra = expected - set(weights), set(weights) - expected
        raise ValueError(
            f"weights do not fit the model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(extra)[:3]}"
        )
    for k, arr in weights.items():
        if tuple(arr.shape) != tuple(own[k].shape):
            raise ValueError(
                f"weights[{k!r}]: shape {arr.shape}, model expects {tuple(own[k].shape)}"
            )
        own[k] = torch.as_tensor(arr, dtype=own[k].dtype)
    model.load_state_dict(own)
