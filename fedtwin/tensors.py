"""Conversions between fedtwin's numpy conventions and torch: images (uint8 ``(N, H, W)``,
or ``(N, H, W, C)`` for colour as MedMNIST stores it, <-> float ``(N, C, H, W)`` in
[-1, 1]) and model weights (what hospitals and the server exchange: named numpy arrays)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch


def to_planes(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W)`` or ``(N, H, W, C)`` -> a uint8 tensor ``(N, C, H, W)``."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)


def from_planes(x: torch.Tensor) -> np.ndarray:
    """A tensor ``(N, C, H, W)`` -> numpy ``(N, H, W)`` (one channel) or ``(N, H, W, C)``."""
    x = x.squeeze(1) if x.shape[1] == 1 else x.permute(0, 2, 3, 1)
    return np.ascontiguousarray(x.cpu().numpy())


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W)`` or ``(N, H, W, C)`` -> float ``(N, C, H, W)`` in [-1, 1]."""
    return to_planes(images).float().div(127.5).sub(1.0).contiguous()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float ``(N, C, H, W)`` in [-1, 1] -> uint8 ``(N, H, W)`` (one channel) or
    ``(N, H, W, C)``."""
    return from_planes(images.detach().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8))


def channels_of(images: np.ndarray) -> int:
    """Channels of uint8 images ``(N, H, W)`` (1) or ``(N, H, W, C)``."""
    return 1 if images.ndim == 3 else int(images.shape[3])


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
