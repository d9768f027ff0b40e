"""SSIM against a direct, loop-by-loop computation of Wang et al.'s formula, and the
cases whose value is known in closed form."""

from __future__ import annotations

import numpy as np
import pytest

from fedtwin.ssim import K1, K2, SIGMA, ssim


def reference(a: np.ndarray, b: np.ndarray, size: int = 11) -> float:
    """One pair, one channel: the weighted statistics of every whole window, in plain numpy."""
    x, y = a.astype(float) / 255.0, b.astype(float) / 255.0
    t = np.arange(size) - (size - 1) / 2
    g = np.exp(-(t**2) / (2 * SIGMA**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = K1**2, K2**2
    values = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            px, py = x[i : i + size, j : j + size], y[i : i + size, j : j + size]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            values.append(
                ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
            )
    return float(np.mean(values))


@pytest.fixture(scope="module")
def pairs(small_real) -> tuple[np.ndarray, np.ndarray]:
    images, _ = small_real
    rng = np.random.default_rng(0)
    noisy = np.clip(images[:6] + rng.normal(0, 10, images[:6].shape), 0, 255).astype(np.uint8)
    return images[:6], np.concatenate([noisy[:3], images[6:9]])  # noisy copies, others


def test_matches_the_formula_window_by_window(pairs):
    a, b = pairs
    got = ssim(a, b)
    want = [reference(x, y) for x, y in zip(a, b, strict=True)]
    assert got == pytest.approx(want, abs=1e-9)
    assert got[:3].min() > got[3:].max()  # a noisy copy is more alike than another patient


def test_known_values(pairs):
    a, _ = pairs
    assert ssim(a, a) == pytest.approx(np.ones(len(a)))
    c = np.full((2, 28, 28), 51, np.uint8), np.full((2, 28, 28), 204, np.uint8)
    u, v = 0.2, 0.8  # flat images: only the luminance term is left
    assert ssim(*c) == pytest.approx((2 * u * v + K1**2) / (u * u + v * v + K1**2))
    inverted = ssim(a, 255 - a)
    assert (inverted < 0).all()  # structure reversed
    assert ssim(a[:3], a[3:6]) == pytest.approx(ssim(a[3:6], a[:3]))  # symmetric


def test_colour_is_the_mean_of_the_channels_and_small_images_fit(pairs):
    a, b = pairs
    rgb_a = np.stack([a, b, 255 - a], axis=-1)
    rgb_b = np.stack([b, b, a], axis=-1)
    per_channel = [ssim(a, b), ssim(b, b), ssim(255 - a, a)]
    assert ssim(rgb_a, rgb_b) == pytest.approx(np.mean(per_channel, axis=0))
    small = a[:, :8, :10]  # the window shrinks to 7 taps
    assert ssim(small, b[:, :8, :10]) == pytest.approx(
        [reference(x, y, size=7) for x, y in zip(small, b[:, :8, :10], strict=True)]
    )
    with pytest.raises(ValueError, match="one shape"):
        ssim(a, b[:, :20])
