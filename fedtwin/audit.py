"""Privacy audit of a synthetic twin, computed where the real images are.

Each hospital calls :func:`site_audit` with the candidate twin, its own training images
(members) and its holdout (non-members, never trained on). It returns aggregates only:
counts, sample sizes and histograms on bins fixed in advance (``Bins``), the same at every
hospital. The server's :func:`pool` adds them up, so the pooled figures are exactly what
the same statistics give with all hospitals' data in one place (a test checks this).

What is computed (references in docs/audit.md):

- **near copies**: a twin image ``s`` copies its nearest training image ``x`` when it is
  much closer to ``x`` than any other real image at the hospital is:
  ``d(s, x) / d(x, nearest other training image) < copy_margin`` (0.25), in pixel space
  or in a coarse ``copy_coarse`` x ``copy_coarse`` average-pooled space (where pixel noise
  added to a copy averages out). This is the authenticity test of Alaa et al. 2022 with a
  margin; the margin is set so that real images the generator never saw (other
  hospitals' images, val) are not flagged. The holdout images, scored by the same rule,
  are the hospital's own false-positive baseline. A spacing is floored at the 5th
  percentile of the hospital's spacings, so that a training image with a near-duplicate
  (the same patient twice) does not shelter copies of itself.
- **close to one record**: the same ratio below ``record_ratio`` (0.5) catches what the
  margin lets through, such as a blend that is 70 % one patient. Real images fall there
  too, so it is a rate: the twin's share (lower 95 % bound) must not exceed the
  holdout's (upper 95 % bound).
- **distance to closest record** (DCR): median nearest-training distance of twin images
  over that of holdout images (pixel and feature space); < 1 means the twin sits closer
  to the training images than unseen real images do.
- **structural similarity** (SSIM) of each twin image to its nearest training image (pixel
  space), beside the same for holdout images: how alike in structure, not only in pixel
  distance, a twin image is to the real image it is closest to. Reported (quantiles and
  the share of twin images above the holdout's 99th percentile), not a gate check.
- **closer to train**: share of twin images nearer to a size-matched training subsample
  than to the holdout (0.5 for a generator that does not favour its training data).
- **membership inference**: every training and holdout image is scored by its distance
  to the nearest twin image (GAN-Leaks, pixel and feature space) and by a density ratio
  in the spirit of DOMIAS, ``log(r_real / r_twin)`` with ``r`` the distance to the k-th
  nearest real (other) / twin image; AUC of members vs non-members, with a negative
  control (two random halves of the holdout as members vs non-members).

Exact duplicates in the real data are not blamed on the generator: duplicate training
images count once, and holdout images identical to a training image are dropped from the
non-members (they are members in all but name). Images are uint8 ``(N, H, W)`` or, in
colour, ``(N, H, W, C)``; the pixel space is ``x / 255`` flattened, the feature space
unit-length embeddings.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from fedtwin.histograms import (
    Bins,
    auc_from_hists,
    auc_interval,
    hist,
    hist_quantile,
    wilson_interval,
)
from fedtwin.neighbours import closest, nearest
from fedtwin.ssim import ssim

Embed = Callable[[np.ndarray], np.ndarray]  # uint8 (N, H, W) -> features (N, D)

ATTACKS = ("gan_leaks_pixel", "gan_leaks_feature", "density_ratio")


class AuditError(ValueError):
    """The audit cannot run on this hospital's data; the message says why."""


def pixels(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float64) / 255.0


def unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _digests(images: np.ndarray) -> list[bytes]:
    return [hashlib.sha256(img.tobytes()).digest() for img in images]


def deduplicate(train: np.ndarray, holdout: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """Training images once each; holdout without images that are also training images."""
    seen: set[bytes] = set()
    keep_train = []
    for i, d in enumerate(_digests(train)):
        if d not in seen:
            seen.add(d)
            keep_train.append(i)
    keep_holdout, in_train, repeated = [], 0, 0
    held: set[bytes] = set()
    for i, d in enumerate(_digests(holdout)):
        if d in seen:
            in_train += 1
        elif d in held:
            repeated += 1
        else:
            held.add(d)
            keep_holdout.append(i)
    counts = {
        "train_duplicates_removed": len(train) - len(keep_train),
        "holdout_in_train_removed": in_train,
        "holdout_duplicates_removed": repeated,
    }
    return train[keep_train], holdout[keep_holdout], counts


def coarse(images: np.ndarray, size: int) -> np.ndarray:
    """Images averaged down to ``size`` x ``size`` (values in [0, 1]; each colour channel
    on its own), flattened."""
    x = torch.as_tensor(images, dtype=torch.float64) / 255.0
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return torch.nn.functional.adaptive_avg_pool2d(x, size).flatten(1).numpy()


def copy_ratios(
    train: np.ndarray, candidates: tuple[np.ndarray, ...], coarse_size: int
) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """Per image of each candidate set (uint8): its distance to its nearest training image
    ``x`` over ``x``'s distance to its nearest other training image (floored at the 5th
    percentile of those spacings), the smaller of pixel space and the coarse space. Below
    1: closer to ``x`` than any other training image is; near 0: a copy. ``train`` must be
    free of exact duplicates and hold at least 2 images. Also returns, per set, each image's
    distance to its nearest training image in pixel space (the distance to closest record)
    and that image's index."""
    if len(train) < 2:
        raise AuditError("copy ratios need at least 2 distinct training images")
    ratios: list[list[np.ndarray]] = [[] for _ in candidates]
    pixel_nearest: list[tuple[np.ndarray, np.ndarray]] = []
    for space in (pixels, lambda x: coarse(x, coarse_size)):
        t = space(train)
        spacing = nearest(t, t, 2)[:, 1]  # the first neighbour is the image itself
        spacing = np.maximum(spacing, max(float(np.quantile(spacing, 0.05)), 1e-12))
        for out, images in zip(ratios, candidates, strict=True):
            d, j = closest(space(images), t)
            out.append(d / spacing[j])
            if space is pixels:
                pixel_nearest.append((d, j))
    return [np.minimum(*r) for r in ratios], pixel_nearest


def density_score(real: np.ndarray, twin: np.ndarray, k: int) -> np.ndarray:
    """``log(r_real / r_twin)`` per real row: its k-th nearest other real image over its
    k-th nearest twin image. High when the twin is dense where this image is (member-like)."""
    r_real = nearest(real, real, k + 1)[:, -1]  # the first neighbour is the image itself
    r_twin = nearest(real, twin, k)[:, -1]
    return np.log(np.maximum(r_real, 1e-12) / np.maximum(r_twin, 1e-12))


def site_audit(
    twin: np.ndarray,
    train: np.ndarray,
    holdout: np.ndarray,
    cfg: Mapping[str, Any],
    *,
    embed: Embed | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """One hospital's audit aggregates (see the module docstring); nothing per image.

    ``cfg`` is the ``audit`` config group (``copy_margin``, ``copy_coarse``,
    ``density_k``, ``bins``), as the server sends it: checked here.
    """
    if len(twin) == 0:
        raise AuditError("the twin is empty: nothing to audit")
    train_u, holdout_u, counts = deduplicate(train, holdout)
    if len(train_u) < 2 or len(holdout_u) < 4:
        raise AuditError(
            f"the audit needs at least 2 training and 4 holdout images, this hospital has "
            f"{len(train_u)} and {len(holdout_u)} (after removing duplicates); "
            f"raise federation.holdout_fraction or leave this hospital out of the audit"
        )
    bins = Bins.for_images(twin.shape[1], int(cfg["bins"]))
    rng = np.random.default_rng(seed)
    px_twin, px_train, px_hold = pixels(twin), pixels(train_u), pixels(holdout_u)
    out: dict[str, Any] = {
        "n_twin": len(twin),
        "n_train": len(train_u),
        "n_holdout": len(holdout_u),
        **counts,
    }

    # Near copies: much closer to one training image than any other training image is.
    limit, size = float(cfg["copy_margin"]), int(cfg["copy_coarse"])
    if not (0.0 < limit <= 0.5 and 1 <= size <= twin.shape[1]):
        raise AuditError(
            f"audit.copy_margin must be in (0, 0.5] and audit.copy_coarse in [1, "
            f"{twin.shape[1]}]; got {limit} and {size}"
        )
    (r_twin, r_hold), pixel_nearest = copy_ratios(train_u, (twin, holdout_u), size)
    (d_twin, j_twin), (d_hold, j_hold) = pixel_nearest
    out["copies"] = {
        "near_copies": int(np.sum(r_twin < limit)),
        "holdout_flagged": int(np.sum(r_hold < limit)),
    }
    out["record"] = {"twin": hist(r_twin, bins.record), "holdout": hist(r_hold, bins.record)}

    # Structural similarity to that nearest training image (pixel space), holdout alike.
    out["ssim"] = {
        "twin": hist(ssim(twin, train_u[j_twin]), bins.ssim),
        "holdout": hist(ssim(holdout_u, train_u[j_hold]), bins.ssim),
    }

    # Closer to a size-matched training subsample than to the holdout.
    m = min(len(train_u), len(holdout_u))
    sub_train = px_train[rng.choice(len(train_u), m, replace=False)]
    sub_hold = px_hold[rng.choice(len(holdout_u), m, replace=False)]
    closer = nearest(px_twin, sub_train, 1)[:, 0] < nearest(px_twin, sub_hold, 1)[:, 0]
    out["closer_to_train"] = {"count": int(closer.sum()), "n": len(twin)}

    # Distance to closest record and membership scores, per space.
    spaces = {"pixel": (px_twin, px_train, px_hold, d_twin, d_hold)}
    if embed is not None:
        f_twin, f_train, f_hold = (unit(embed(x)) for x in (twin, train_u, holdout_u))
        spaces["feature"] = (
            f_twin,
            f_train,
            f_hold,
            nearest(f_twin, f_train, 1)[:, 0],
            nearest(f_hold, f_train, 1)[:, 0],
        )
    half = rng.permutation(len(holdout_u)) < len(holdout_u) // 2  # negative control split
    out["dcr"], out["mia"] = {}, {}
    for name, (s, tr, ho, d_twin, d_hold) in spaces.items():
        edges = getattr(bins, name)
        out["dcr"][name] = {"twin": hist(d_twin, edges), "holdout": hist(d_hold, edges)}
        # GAN-Leaks: a real image's distance to its nearest twin image, small = member-like.
        member, non = nearest(tr, s, 1)[:, 0], nearest(ho, s, 1)[:, 0]
        out["mia"][f"gan_leaks_{name}"] = _mia_hists(-member, -non, half, -edges[::-1])
    real = spaces.get("feature", spaces["pixel"])
    score = density_score(np.concatenate([real[1], real[2]]), real[0], int(cfg["density_k"]))
    n_tr = len(train_u)
    out["mia"]["density_ratio"] = _mia_hists(score[:n_tr], score[n_tr:], half, bins.score)
    return out


def _mia_hists(members, nonmembers, half, edges) -> dict[str, Any]:
    """Histograms of attack scores (higher = more member-like) and the negative control."""
    return {
        "members": hist(members, edges),
        "nonmembers": hist(nonmembers, edges),
        "control_a": hist(nonmembers[half], edges),
        "control_b": hist(nonmembers[~half], edges),
    }


# ---- pooling at the server ---------------------------------------------------------------


def _sum(sites: list[dict], *path: str) -> Any:
    values = []
    for site in sites:
        v = site
        for key in path:
            v = v[key]
        values.append(np.asarray(v))
    return np.sum(values, axis=0)


def pool(sites: Mapping[str, dict], cfg: Mapping[str, Any], image_size: int) -> dict[str, Any]:
    """Combine the hospitals' aggregates, apply the thresholds of ``cfg`` (the ``audit``
    group) and decide. Returns the content of ``audit.json``."""
    names = list(sites)
    rows = [sites[n] for n in names]
    bins = Bins.for_images(image_size, int(cfg["bins"]))
    th = cfg["thresholds"]
    n_twin = int(rows[0]["n_twin"]) if rows else 0

    copies = {key: int(_sum(rows, "copies", key)) for key in rows[0]["copies"]} if rows else {}
    near = copies.get("near_copies", 0)
    copies["per_hospital"] = {n: int(sites[n]["copies"]["near_copies"]) for n in names}

    dcr = {}
    for space in rows[0]["dcr"] if rows else []:
        edges = getattr(bins, space)
        t, h = _sum(rows, "dcr", space, "twin"), _sum(rows, "dcr", space, "holdout")
        med_t, med_h = hist_quantile(t, edges, 0.5), hist_quantile(h, edges, 0.5)
        dcr[space] = {
            "twin_quantiles": {str(q): hist_quantile(t, edges, q) for q in (0.01, 0.05, 0.5)},
            "holdout_quantiles": {str(q): hist_quantile(h, edges, q) for q in (0.01, 0.05, 0.5)},
            "ratio": med_t / med_h if med_h > 0 else math.nan,
            "twin_hist": t,
            "holdout_hist": h,
            "edges": edges,
        }

    record = _record_shares(rows, bins.record, float(th["record_ratio"]))
    similarity = _ssim_quantiles(rows, bins.ssim) if rows and "ssim" in rows[0] else {}

    k = int(_sum(rows, "closer_to_train", "count")) if rows else 0
    n = int(_sum(rows, "closer_to_train", "n")) if rows else 0
    closer = {"share": k / n if n else math.nan, "ci95": wilson_interval(k, n), "n": n}

    mia = {}
    for attack in rows[0]["mia"] if rows else []:
        h = {key: _sum(rows, "mia", attack, key) for key in rows[0]["mia"][attack]}
        n_m, n_n = int(h["members"].sum()), int(h["nonmembers"].sum())
        auc = auc_from_hists(h["members"], h["nonmembers"])
        control = auc_from_hists(h["control_a"], h["control_b"])
        n_a, n_b = int(h["control_a"].sum()), int(h["control_b"].sum())
        mia[attack] = {
            "auc": auc,
            "ci95": auc_interval(auc, n_m, n_n),
            "n_members": n_m,
            "n_nonmembers": n_n,
            "control_auc": control,
            "control_ci95": auc_interval(control, n_a, n_b),
            "members_hist": h["members"],
            "nonmembers_hist": h["nonmembers"],
        }

    worst = max(mia, key=lambda a: mia[a]["auc"]) if mia else None
    checks = [
        _check("near copies", near, "<=", int(th["max_near_copies"])),
        _check(
            "MIA AUC (" + str(worst) + ")",
            mia[worst]["auc"] if worst else math.nan,
            "<=",
            float(th["mia_auc_max"]),
        ),
        _check(
            "DCR ratio (pixel)",
            dcr.get("pixel", {}).get("ratio", math.nan),
            ">=",
            float(th["dcr_ratio_min"]),
        ),
        _check(
            f"share closer than {record['cut']:g} of a record's spacing, lower 95 % "
            "(at most the holdout's upper 95 %)",
            record["twin_ci95"][0],
            "<=",
            record["holdout_ci95"][1],
        ),
        _check(
            "closer-to-train share, upper 95 %",
            closer["ci95"][1],
            "<=",
            float(th["closer_to_train_max"]),
        ),
    ]
    notes = []
    for attack, r in mia.items():
        lo, hi = r["control_ci95"]
        if not (lo <= 0.5 <= hi):
            notes.append(
                f"{attack}: the negative control (holdout halves) gives AUC {r['control_auc']:.3f}"
                f" with an interval excluding 0.5; its member AUC is not conclusive"
            )
    return {
        "verdict": "pass" if all(c["passed"] for c in checks) else "fail",
        "checks": checks,
        "notes": notes,
        "hospitals": names,
        "n_twin": n_twin,
        "sample_sizes": {
            "train": int(_sum(rows, "n_train")) if rows else 0,
            "holdout": int(_sum(rows, "n_holdout")) if rows else 0,
            **{
                key: int(_sum(rows, key)) if rows else 0
                for key in (
                    "train_duplicates_removed",
                    "holdout_in_train_removed",
                    "holdout_duplicates_removed",
                )
            },
        },
        "near_copies": copies,
        "close_to_one_record": record,
        "dcr": dcr,
        "closer_to_train": closer,
        "ssim": similarity,
        "mia": mia,
        "thresholds": dict(th),
    }


def _record_shares(rows: list[dict], edges: np.ndarray, cut: float) -> dict[str, Any]:
    """Shares of twin and holdout images whose copy ratio is below ``cut`` (a bin edge)."""
    if not rows:
        return {"cut": cut, "twin_ci95": (math.nan, math.nan), "holdout_ci95": (math.nan,) * 2}
    below = edges[1:] <= cut + 1e-12
    out: dict[str, Any] = {"cut": cut, "edges": edges}
    for who in ("twin", "holdout"):
        h = _sum(rows, "record", who)
        k, n = int(h[below].sum()), int(h.sum())
        out[f"{who}_share"] = k / n if n else math.nan
        out[f"{who}_ci95"] = wilson_interval(k, n)
        out[f"{who}_hist"] = h
    return out


def _ssim_quantiles(rows: list[dict], edges: np.ndarray) -> dict[str, Any]:
    """Pooled SSIM to the nearest training image: quantiles of twin and holdout images and
    the share of twin images more similar than the holdout's 99th percentile (to its bin)."""
    t, h = _sum(rows, "ssim", "twin"), _sum(rows, "ssim", "holdout")
    qs = (0.5, 0.95, 0.99)
    top = hist_quantile(h, edges, 0.99)
    return {
        "twin_quantiles": {str(q): hist_quantile(t, edges, q) for q in qs},
        "holdout_quantiles": {str(q): hist_quantile(h, edges, q) for q in qs},
        "twin_above_holdout_q99": float(t[edges[1:] > top].sum() / max(t.sum(), 1)),
        "twin_hist": t,
        "holdout_hist": h,
        "edges": edges,
    }


def _check(name: str, value: float, op: str, limit: float) -> dict[str, Any]:
    ok = (value <= limit) if op == "<=" else (value >= limit)
    return {"check": name, "value": value, "rule": f"{op} {limit:g}", "passed": bool(ok)}


def summary(audit: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ``audit.json`` that goes into the manifest: verdict and headline figures."""
    return {
        "verdict": audit["verdict"],
        "checks": [dict(c) for c in audit["checks"]],
        "mia_auc": {a: r["auc"] for a, r in audit["mia"].items()},
        "near_copies": audit["near_copies"]["near_copies"],
        "ssim_median": {
            who: audit["ssim"][f"{who}_quantiles"]["0.5"] for who in ("twin", "holdout")
        }
        if audit.get("ssim")
        else {},
        "sample_sizes": audit["sample_sizes"],
        "notes": audit["notes"],
    }
