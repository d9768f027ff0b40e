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

The two-sample test also runs federated, at each hospital (:func:`site_two_sample`): a CNN
learns the hospital's training images against part of the twin, then scores its holdout
against twin images it has not seen; the hospital sends back histograms of those scores on
fixed shared bins, their counts and its own AUC, and :func:`pool_two_sample` adds the
histograms up into one AUC over every hospital (as ``fedtwin.utility`` does for the twin
classifier's scores). No per-image value leaves.

Images are uint8 ``(N, H, W)`` or ``(N, H, W, C)``; nothing here knows what a twin is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.stats import norm

from fedtwin.histograms import auc_from_hists, hist
from fedtwin.histograms import auc_interval as hanley_mcneil
from fedtwin.metrics import predict_log_odds, train_classifier
from fedtwin.utility import SCORE_BINS

REAL, TWIN = 0, 1  # the two-sample classifier's labels
SHOWN = 16  # most and least real twin images kept for the report
MIN_PER_SIDE = 10  # fewer images a side to fit or to test on: no test


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
    real_scores, other_scores = _fit_and_score(
        real_fit, other_fit, real_test, other_test, epochs=epochs, batch_size=batch_size,
        lr=lr, seed=seed, progress=progress, desc=desc,
    )  # fmt: skip
    result = auc_interval(other_scores, real_scores)
    return result | {"n_fit": len(real_fit) + len(other_fit)}, other_scores


def _fit_and_score(
    real_fit: np.ndarray,
    other_fit: np.ndarray,
    real_test: np.ndarray,
    other_test: np.ndarray,
    **recipe: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """The log-odds of "other" of ``real_test`` and of ``other_test`` by a CNN trained on
    ``real_fit`` against ``other_fit`` (``recipe``: ``train_classifier``'s keywords)."""
    images = np.concatenate([real_fit, other_fit])
    labels = np.r_[np.full(len(real_fit), REAL), np.full(len(other_fit), TWIN)]
    model = train_classifier(images, labels, 2, **recipe)
    real_scores = predict_log_odds(model, real_test)[:, TWIN]
    other_scores = predict_log_odds(model, other_test)[:, TWIN]
    return real_scores, other_scores


def site_two_sample(
    twin: np.ndarray,
    train_images: np.ndarray,
    holdout_images: np.ndarray,
    eval_cfg: Mapping,
    *,
    seed: int,
) -> dict[str, Any]:
    """The two-sample test at a hospital, on its own images: a CNN learns up to
    ``eval.c2st_images`` of its training images against as many twin images, then scores
    as many of its holdout images (never trained on) against twin images it has not seen
    (the twin split in two disjoint parts). Returns aggregates only (``score_record``);
    with fewer than ``MIN_PER_SIDE`` images a side to fit or to test on, only the counts
    that say why, with ``skipped`` 1."""
    cap = int(eval_cfg["c2st_images"])
    n_test = min(len(holdout_images), cap, len(twin) // 2)
    n_fit = min(cap, len(twin) - n_test, len(train_images))
    if n_test < MIN_PER_SIDE or n_fit < MIN_PER_SIDE:
        return {"skipped": 1, "n_train": len(train_images), "n_holdout": len(holdout_images),
                "n_twin": len(twin)}  # fmt: skip
    rng = np.random.default_rng(seed)
    t = rng.permutation(len(twin))
    real_fit = train_images[rng.permutation(len(train_images))[:n_fit]]
    real_test = holdout_images[rng.permutation(len(holdout_images))[:n_test]]
    real_scores, twin_scores = _fit_and_score(
        real_fit, twin[t[n_test : n_test + n_fit]], real_test, twin[t[:n_test]],
        epochs=int(eval_cfg["c2st_epochs"]), batch_size=int(eval_cfg["batch_size"]),
        lr=float(eval_cfg["lr"]), seed=seed,
    )  # fmt: skip
    return score_record(real_scores, twin_scores, n_fit)


def score_record(real_scores: np.ndarray, twin_scores: np.ndarray, n_fit: int) -> dict:
    """What a hospital sends of its two-sample test: histograms of the log-odds of "twin"
    of the real and of the twin images it scored, on the shared ``SCORE_BINS``; how many
    of each it scored (``n_real``, ``n_twin``) and fitted on a side (``n_fit``); and its own
    AUC from the exact scores. No per-image value."""
    return {
        "real": hist(np.asarray(real_scores, np.float64), SCORE_BINS),
        "twin": hist(np.asarray(twin_scores, np.float64), SCORE_BINS),
        "n_real": len(real_scores),
        "n_twin": len(twin_scores),
        "n_fit": int(n_fit),
        "auc": auc_interval(twin_scores, real_scores)["auc"],
    }


def pool_two_sample(sites: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One AUC over every hospital that ran the test: its histograms added up (the AUC of
    all their scores together, up to ties within a bin), with a 95 % interval (Hanley and
    McNeil) and counts; each hospital's own AUC and counts; the hospitals that could not
    run it, and why. ``auc`` is None when none could."""
    tested = {n: s for n, s in sites.items() if not s.get("skipped")}
    n_real = sum(int(s["n_real"]) for s in tested.values())
    n_twin = sum(int(s["n_twin"]) for s in tested.values())
    auc = low = high = None
    if tested:
        real = np.sum([np.asarray(s["real"]) for s in tested.values()], axis=0)
        twin = np.sum([np.asarray(s["twin"]) for s in tested.values()], axis=0)
        auc = auc_from_hists(twin, real)
        low, high = hanley_mcneil(auc, n_twin, n_real)
    per_hospital = {}
    for name, s in tested.items():
        own = float(s["auc"])
        low_own, high_own = hanley_mcneil(own, int(s["n_twin"]), int(s["n_real"]))
        per_hospital[name] = {"auc": own, "low": low_own, "high": high_own}
        per_hospital[name] |= {k: int(s[k]) for k in ("n_real", "n_twin", "n_fit")}
    skipped = {
        name: f"too few images: {int(s['n_train'])} training, {int(s['n_holdout'])} holdout "
        f"and {int(s['n_twin'])} twin images (the test needs {MIN_PER_SIDE} a side to fit on "
        "and to test on)"
        for name, s in sites.items()
        if s.get("skipped")
    }
    return {
        "test": "at each hospital a CNN learns its training images against part of the "
        "twin, then scores its holdout against twin images it has not seen",
        "auc": auc,
        "low": low,
        "high": high,
        "n_real": n_real,
        "n_twin": n_twin,
        "hospitals": len(tested),
        "per_hospital": per_hospital,
        "skipped": skipped,
    }


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
