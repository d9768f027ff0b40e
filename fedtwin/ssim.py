"""Structural similarity (SSIM, Wang et al. 2004) of image pairs, batched on torch.

The audit scores each twin image against its nearest training image at the hospital, and
each holdout image the same way (the baseline): a measure clinicians know from the
synthetic-imaging literature, beside the pixel distances. Gaussian window (sigma 1.5, 11 px,
or the largest odd size that fits a smaller image), the constants ``K1 = 0.01`` and
``K2 = 0.03`` on intensities in [0, 1], population (co)variances, the mean over the
positions where the window fits whole; a colour image's SSIM is the mean of its channels'.
These are the paper's settings (``skimage.metrics.structural_similarity`` with
``gaussian_weights=True, use_sample_covariance=False, data_range=255``).

Hand-written rather than a dependency: it is the formula below and a separable blur, and
it scores thousands of pairs in one batched call.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fedtwin.tensors import to_planes

K1, K2, SIGMA = 0.01, 0.03, 1.5


def window(size: int, sigma: float = SIGMA) -> torch.Tensor:
    """The normalized 1-D Gaussian of ``size`` (odd) taps."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def ssim(a: np.ndarray, b: np.ndarray, *, chunk: int = 1024) -> np.ndarray:
    """SSIM of each pair ``(a[i], b[i])``: uint8 images ``(N, H, W)`` or ``(N, H, W, C)``.
    Returns ``(N,)`` float64 in [-1, 1]; 1 for identical images."""
    if a.shape != b.shape:
        raise ValueError(f"SSIM compares images of one shape; got {a.shape} and {b.shape}")
    if a.ndim not in (3, 4):
        raise ValueError(f"SSIM takes (N, H, W) or (N, H, W, C) images; got shape {a.shape}")
    size = min(11, *(s - (s + 1) % 2 for s in a.shape[1:3]))  # odd, at most the image
    g = window(size)
    out = [_ssim(a[i : i + chunk], b[i : i + chunk], g) for i in range(0, len(a), chunk)]
    return np.concatenate(out) if out else np.zeros(0)


def _ssim(a: np.ndarray, b: np.ndarray, g: torch.Tensor) -> np.ndarray:
    def planes(x: np.ndarray) -> torch.Tensor:  # each channel an image: (N*C, 1, H, W) in [0, 1]
        t = to_planes(x).to(torch.float64) / 255.0
        return t.reshape(-1, 1, *t.shape[2:])

    def blur(t: torch.Tensor) -> torch.Tensor:  # the Gaussian mean over each whole window
        t = F.conv2d(t, g.view(1, 1, -1, 1))
        return F.conv2d(t, g.view(1, 1, 1, -1))

    x, y = planes(a), planes(b)
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = K1**2, K2**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    channels = 1 if a.ndim == 3 else a.shape[3]
    return s.flatten(1).mean(1).view(len(a), channels).mean(1).numpy()
