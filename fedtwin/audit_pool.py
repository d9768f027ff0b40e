"""The server's half of the privacy audit: it adds up the hospitals' aggregates from
``fedtwin.audit.site_audit`` (counts and histograms on shared bins), applies the
thresholds of the ``audit`` config group and decides. What each figure means is in
``fedtwin.audit``'s docstring and docs/audit.md."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedtwin.histograms import Bins, auc_from_hists, auc_interval, hist_quantile, wilson_interval


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
                    "holdout_sampled_out",
                    "members_sampled_out",
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
        **({"canaries": dict(audit["canaries"])} if "canaries" in audit else {}),
    }
