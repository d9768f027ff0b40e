"""Feature statistics a hospital releases once, and fitting a generator to them.

Each hospital sums a fixed feature map over its training images, per class, adds Gaussian
noise and sends the noisy sums once (DP-MERF, Harder et al. 2021; the "central images" of
DP-FETA carry the same idea). Sums add up exactly across hospitals, so under secure
aggregation the server learns only the consortium's pooled, noisy per-class mean
embedding: a small hospital's rare class is pooled with everyone's instead of drowned in
its own DP-SGD noise. The generator is fitted to that embedding at the server before
DP-GAN training (a warm start), and keeps it as an anchor against collapse while the
GAN refines it. Both are post-processing of the one release.

The feature map is random Fourier features of a Gaussian kernel (Rahimi and Recht 2007)
on the image at several scales (full, halved, quartered), fixed by a public seed. Every
feature vector has norm exactly 1, and one image adds to one class's sum only, so the
release's L2 sensitivity is 1 and its noise std is the noise multiplier itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedtwin.tensors import to_tensor


@dataclass(frozen=True)
class FeatureConfig:
    """The public feature map: the same at every hospital and at the server."""

    features: int = 1200  # total feature count, split evenly over the scales (cos, sin pairs)
    scales: tuple[int, ...] = (1, 2, 4)  # average-pooling factors the image is seen at
    bandwidth: float = 0.33  # Gaussian kernel width per pixel: sigma = bandwidth * sqrt(pixels)
    seed: int = 0  # the random frequencies; public (in the manifest)
    patch: int = 0  # also the mean embedding of all patch x patch patches (0 = none)
    patch_features: int = 600  # features of that block (cos, sin pairs)
    patch_stride: int = 1  # step between patches


class FeatureMap(nn.Module):
    """Images ``(N, C, S, S)`` in [-1, 1] -> features ``(N, D)``, each row of norm at most 1
    (exactly 1 without the patch block).

    Fixed: no parameters, nothing learned, nothing exchanged.
    """

    def __init__(self, cfg: FeatureConfig, image_size: int, channels: int = 1):
        super().__init__()
        per_scale = cfg.features // (2 * len(cfg.scales))
        if per_scale < 1:
            raise ValueError(
                f"warm_start.features={cfg.features} is too few for {len(cfg.scales)} scales"
            )
        rng = torch.Generator().manual_seed(cfg.seed)
        self.scales = tuple(int(s) for s in cfg.scales)
        for i, scale in enumerate(self.scales):
            if image_size % scale:
                raise ValueError(f"warm_start.scales: {scale} does not divide {image_size}")
            pixels = channels * (image_size // scale) ** 2
            width = cfg.bandwidth * pixels**0.5
            freqs = torch.randn(pixels, per_scale, generator=rng) / width
            self.register_buffer(f"freqs{i}", freqs, persistent=False)
        self.per_scale = per_scale
        self.dim = 2 * per_scale * len(self.scales)
        self.patch = int(cfg.patch)
        if self.patch:
            per_patch = cfg.patch_features // 2
            width = cfg.bandwidth * channels**0.5 * self.patch
            filters = torch.randn(per_patch, channels, self.patch, self.patch, generator=rng)
            self.register_buffer("patch_freqs", filters / width, persistent=False)
            self.per_patch, self.patch_stride = per_patch, int(cfg.patch_stride)
            self.dim += 2 * per_patch
        self.blocks = len(self.scales) + bool(self.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = []
        for i, scale in enumerate(self.scales):
            pooled = F.avg_pool2d(x, scale) if scale > 1 else x
            h = pooled.flatten(1) @ getattr(self, f"freqs{i}")
            blocks.append(torch.cat([h.cos(), h.sin()], dim=1) / self.per_scale**0.5)
        if self.patch:
            # every patch's features have norm 1, so their mean over positions has norm <= 1
            h = F.conv2d(x, self.patch_freqs, stride=self.patch_stride)
            patches = torch.cat([h.cos(), h.sin()], dim=1).mean(dim=(2, 3))
            blocks.append(patches / self.per_patch**0.5)
        # each block has norm at most 1 (the whole-image ones exactly 1): the vector, at most 1
        return torch.cat(blocks, dim=1) / self.blocks**0.5


@torch.no_grad()
def embed(fmap: FeatureMap, images: np.ndarray, batch: int = 512) -> torch.Tensor:
    """uint8 images -> features ``(N, D)`` float32."""
    x = to_tensor(images)
    return torch.cat([fmap(x[i : i + batch]) for i in range(0, len(x), batch)])


def noisy_feature_sums(
    fmap: FeatureMap,
    images: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    noise_multiplier: float,
) -> np.ndarray:
    """Per-class feature sums ``(n_classes, D)`` with Gaussian noise of std
    ``noise_multiplier`` (the sensitivity is 1), drawn from OS randomness so that nothing
    published can undo it. ``noise_multiplier=0`` gives exact sums (DP off)."""
    phi = embed(fmap, images).double()
    y = torch.from_numpy(np.array(labels, dtype=np.int64))  # a copy: the input may be read-only
    sums = torch.zeros(n_classes, fmap.dim, dtype=torch.float64).index_add_(0, y, phi)
    if noise_multiplier > 0:
        secret = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
        noise = torch.randn(sums.shape, generator=secret, dtype=torch.float64)
        sums += noise_multiplier * noise
    return sums.numpy()


def class_means(pooled: torch.Tensor) -> torch.Tensor:
    """Per-class target embedding ``(K, D)`` from the pooled release ``(K, D + 1)``: feature
    sums and (noisy) image counts, each divided by the same total (see ``release_row``)."""
    counts = pooled[:, -1:].clamp(min=1e-6)
    return pooled[:, :-1] / counts


def release_rows(sums: np.ndarray, counts: np.ndarray, n_images: int) -> np.ndarray:
    """What one hospital sends: ``[feature sums, count]`` per class ``(K, D + 1)``, divided
    by its number of training images. Federated averaging weights each hospital by that
    number, so the server's average is the consortium's sums and counts over all images:
    their ratio is the pooled class mean, whatever each hospital's size."""
    rows = np.concatenate([sums, np.asarray(counts, dtype=np.float64)[:, None]], axis=1)
    return (rows / max(1, n_images)).astype(np.float32)


def moment_loss(phi: torch.Tensor, labels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared MMD between generated images' features ``phi (N, D)`` of class ``labels`` and
    the target class means ``(K, D)``, summed over classes weighted by their share of the
    batch. Unbiased in the generated sample (the i = j terms are left out), so it does not
    reward a generator for making the same image twice. Classes with fewer than two images
    in the batch are skipped."""
    total = phi.new_zeros(())
    for c in range(target.shape[0]):
        rows = phi[labels == c]
        n = len(rows)
        if n < 2:
            continue
        s = rows.sum(0)
        pairs = (s @ s - (rows * rows).sum()) / (n * (n - 1))
        mmd = pairs - 2 * rows.mean(0) @ target[c] + target[c] @ target[c]
        total = total + (n / len(phi)) * mmd
    return total
