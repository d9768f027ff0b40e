"""Does a twin look real? Measured where the eye looks, not in a class classifier's features.

A normal-vs-pneumonia classifier's features keep only what separates the classes, so a twin
of smooth blobs can sit inside the real images' neighbourhoods there (``fedtwin.manifold``)
and still look nothing like an X-ray. Two measures that see what the eye sees:

- **Classifier two-sample test** (C2ST; Lopez-Paz and Oquab, ICLR 2017): a CNN learns to
  tell twin images from real training images, then scores images it has never seen, real
  val images against held-out twin images. Its AUC is 0.5 when it cannot tell them apart
  and 1 when it always can; the interval is DeLong's. The floor is the same test with real
  images in place of the twin (two disjoint parts of the training split), which scores
  about 0.5.
- **Radial power spectrum**: the mean power of the images' 2D Fourier transform in rings of
  equal spatial frequency, on a log10 scale. Fine structure (ribs, edges, texture) lives at
  high frequencies; a generator that blurs shows a spectrum that falls off too early. The
  distance is the mean absolute difference of the log spectra over the rings, with real
  train against val as the floor.

Images are uint8 ``(N, H, W)`` or ``(N, H, W, C)``; nothing here knows what a twin is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.stats import norm

from fedtwin.metrics import predict_log_odds, train_classifier

REAL, TWIN = 0, 1  # the two-sample classifier's labels
SHOWN = 16  # most and least real twin images kept for the report


def auc_interval(positive: np.ndarray, negative: np.ndarray, level: float = 0.95) -> dict:
    """AUC of scores ``positive`` (should be high) against ``negative``, with DeLong's
    interval (DeLong et al. 1988): the Mann-Whitney statistic, ties counted half, and the
    variance of its placement values. Also the counts it rests on."""
    pos, neg = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if len(pos) < 2 or len(neg) < 2:
        raise ValueError(f"auc_interval needs 2 scores a side, got {len(pos)} and {len(neg)}")
    # placement values: for each positive, the share of negatives it beats, and vice versa
    below = np.searchsorted(np.sort(neg), pos, side="left")
    at = np.searchsorted(np.sort(neg), pos, side="right") - below
    v_pos = (below + 0.5 * at) / len(neg)
    below = np.searchsorted(np.sort(pos), neg, side="left")
    at = np.searchsorted(np.sort(pos), neg, side="right") - below
    v_neg = 1.0 - (below + 0.5 * at) / len(pos)
    auc = float(v_pos.mean())
    se = float(np.sqrt(v_pos.var(ddof=1) / len(pos) + v_neg.var(ddof=1) / len(neg)))
    half = norm.ppf(0.5 + level / 2) * se
    return {
        "auc": auc,
        "low": float(max(0.0, auc - half)),
        "high": float(min(1.0, auc + half)),
        "level": level,
        "n_positive": len(pos),
        "n_negative": len(neg),
    }


def two_sample_test(
    real_fit: np.ndarray,
    other_fit: np.ndarray,
    real_test: np.ndarray,
    other_test: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = False,
    desc: str = "two-sample test",
) -> tuple[dict, np.ndarray]:
    """Train a CNN on ``real_fit`` (label real) against ``other_fit`` (label other), score
    the unseen ``real_test`` and ``other_test``. Returns the AUC with its interval (0.5:
    cannot tell) and the score of every ``other_test`` image (log-odds of "other": the
    lower, the more real it looks)."""
    images = np.concatenate([real_fit, other_fit])
    labels = np.r_[np.full(len(real_fit), REAL), np.full(len(other_fit), TWIN)]
    model = train_classifier(
        images, labels, 2, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
        progress=progress, desc=desc,
    )  # fmt: skip
    real_scores = predict_log_odds(model, real_test)[:, TWIN]
    other_scores = predict_log_odds(model, other_test)[:, TWIN]
    result = auc_interval(other_scores, real_scores)
    return result | {"n_fit": len(images)}, other_scores


def radial_spectrum(images: np.ndarray) -> np.ndarray:
    """log10 of the mean power per ring of spatial frequency, rings 1 .. S // 2 (the
    constant ring 0 left out), of uint8 images; colour images are averaged over channels
    first (brightness), each image's mean subtracted."""
    x = np.asarray(images, np.float64) / 255.0
    if x.ndim == 4:
        x = x.mean(axis=3)
    x = x - x.mean(axis=(1, 2), keepdims=True)
    power = (np.abs(np.fft.fft2(x)) ** 2).mean(axis=0)
    h, w = power.shape
    fy, fx = np.fft.fftfreq(h) * h, np.fft.fftfreq(w) * w
    ring = np.rint(np.hypot(fy[:, None], fx[None, :])).astype(int)
    rings = min(h, w) // 2
    sums = np.bincount(ring.ravel(), power.ravel(), minlength=rings + 1)
    counts = np.bincount(ring.ravel(), minlength=rings + 1)
    return np.log10(sums[1 : rings + 1] / counts[1 : rings + 1] + 1e-12)


def spectral_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two log10 radial spectra (``radial_spectrum``)."""
    return float(np.mean(np.abs(np.asarray(a) - np.asarray(b))))


def _sizes(n_train: int, n_twin: int, n_val: int, cap: int) -> tuple[int, int]:
    """Images per side to fit on and to test on, the same for the twin's test and the
    floor's: the floor needs two disjoint fitting sets and a test set from train."""
    n_test = min(n_val, cap, n_twin // 2)
    n_fit = min(cap, n_twin - n_test, (n_train - n_test) // 2)
    if n_test < 10 or n_fit < 10:
        raise ValueError(
            f"the two-sample test needs at least 10 images a side to fit and to test; got "
            f"{n_train} real train, {n_val} val and {n_twin} twin images"
        )
    return n_fit, n_test


def realism_report(
    twin: np.ndarray,
    real_train: np.ndarray,
    val: np.ndarray,
    eval_cfg: Mapping,
    *,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """The two-sample test (twin against real, and its real-against-real floor) and the
    spectra of twin, real train and val with their distances; the twin images the test
    finds most and least real (indices into ``twin``)."""
    cap, epochs = int(eval_cfg["c2st_images"]), int(eval_cfg["c2st_epochs"])
    recipe = {"epochs": epochs, "batch_size": int(eval_cfg["batch_size"]),
              "lr": float(eval_cfg["lr"]), "seed": seed, "progress": progress}  # fmt: skip
    n_fit, n_test = _sizes(len(real_train), len(twin), len(val), cap)
    rng = np.random.default_rng(seed)
    t, r, v = rng.permutation(len(twin)), rng.permutation(len(real_train)), len(val)
    v_idx = rng.permutation(v)[:n_test]
    twin_test, twin_fit = t[:n_test], t[n_test : n_test + n_fit]
    test, scores = two_sample_test(
        real_train[r[:n_fit]], twin[twin_fit], val[v_idx], twin[twin_test],
        desc="realism: twin vs real", **recipe,
    )  # fmt: skip
    floor, _ = two_sample_test(
        real_train[r[:n_fit]], real_train[r[n_fit : 2 * n_fit]],
        val[v_idx], real_train[r[2 * n_fit : 2 * n_fit + n_test]],
        desc="realism: real vs real", **recipe,
    )  # fmt: skip
    order = np.argsort(scores, kind="stable")
    spectra = {name: radial_spectrum(x) for name, x in (("twin", twin), ("train", real_train),
                                                         ("val", val))}  # fmt: skip
    distance = spectral_distance(spectra["twin"], spectra["val"])
    spectral_floor = spectral_distance(spectra["train"], spectra["val"])
    return {
        "two_sample": {
            "twin_vs_real": test,
            "real_vs_real_floor": floor,
            "epochs": epochs,
            "fit_per_side": n_fit,
            "test_per_side": n_test,
            "most_real": [int(i) for i in twin_test[order[:SHOWN]]],
            "least_real": [int(i) for i in twin_test[order[::-1][:SHOWN]]],
        },
        "spectrum": {
            "log10_power": {k: s.tolist() for k, s in spectra.items()},
            "distance_twin_val": distance,
            "distance_floor_train_val": spectral_floor,
            "distance_over_floor": distance / spectral_floor if spectral_floor > 0 else None,
        },
    }
