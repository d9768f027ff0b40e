"""The quality gate beside the privacy gate: it says plainly what a twin is not.

The privacy gate decides whether a twin may be signed. This one decides nothing: a twin
that carries no class signal, or that a classifier tells from real images at a glance, is
still the operator's to publish or not, but the terminal, the report and the manifest say
so in words, so nobody takes it for a good twin by silence.

Two checks, each with the figure it rests on and the threshold from ``eval.*``:

- **class signal**: AUC of a classifier trained on the twin alone, scored on real images
  (at the hospitals' holdouts by the server; on val by the demo's evaluation). Near 0.5
  the twin's labels mean nothing (``eval.min_class_auc``).
- **realism**: the two-sample test's AUC (``fedtwin.realism``): how well a CNN tells twin
  from real images it has not seen (``eval.max_c2st_auc``). Pooled over the hospitals'
  holdouts by the server (each hospital runs the test on its own images); on val by the
  demo's evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _check(measured: float | None, threshold: float, passed: bool, says: str) -> dict:
    return {"measured": measured, "threshold": threshold, "passed": passed, "says": says}


def class_signal(auc: float, eval_cfg: Mapping, where: str) -> dict[str, Any]:
    """Does a classifier trained on the twin tell the classes apart on real images?"""
    low = float(eval_cfg["min_class_auc"])
    if auc >= low:
        return _check(auc, low, True, f"class signal: AUC {auc:.3f} on {where}")
    return _check(
        auc, low, False,
        f"NO USABLE CLASS SIGNAL: a classifier trained on the twin scores AUC {auc:.3f} on "
        f"{where} (0.5 = chance; threshold {low:g}); its labels do not say what its images "
        "show",
    )  # fmt: skip


def realism(c2st_auc: float, eval_cfg: Mapping, where: str = "") -> dict[str, Any]:
    """Can a CNN tell twin images from real ones it has not seen? ``where``: on which real
    images, said after the figure (e.g. " on the hospitals' holdouts")."""
    high = float(eval_cfg["max_c2st_auc"])
    if c2st_auc <= high:
        return _check(c2st_auc, high, True, f"realism: two-sample AUC {c2st_auc:.3f}{where}")
    return _check(
        c2st_auc, high, False,
        f"FAILS THE REALISM TEST: a CNN tells twin from real images with AUC {c2st_auc:.3f}"
        f"{where} (0.5 = it cannot; threshold {high:g}); the twin does not look like real "
        "images",
    )  # fmt: skip


def verdict(checks: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``{"passed": all passed, "checks": ..., "warnings": [what failed, in words]}``."""
    failed = [c["says"] for c in checks.values() if not c["passed"]]
    return {"passed": not failed, "checks": dict(checks), "warnings": failed}


def federated_quality(utility: Mapping[str, Any], eval_cfg: Mapping) -> dict[str, Any]:
    """The server's quality gate, from the twin classifier's pooled holdout AUC and the
    pooled two-sample AUC of the hospitals' own tests (``utility["two_sample"]``, from
    ``fedtwin.realism.pool_two_sample``), when they ran it."""
    checks = {}
    if utility.get("auc") is not None:
        checks["class_signal"] = class_signal(
            float(utility["auc"]), eval_cfg, "the hospitals' holdouts"
        )
    c2st = (utility.get("two_sample") or {}).get("auc")
    if c2st is None:
        return verdict(checks) | {
            "realism": "not measured at the hospitals; the demo measures it on val (report.html)"
        }
    checks["realism"] = realism(float(c2st), eval_cfg, " on the hospitals' holdouts")
    return verdict(checks)


def evaluation_quality(evaluation: Mapping[str, Any], eval_cfg: Mapping) -> dict[str, Any]:
    """The demo's quality gate, from its evaluation on the val split."""
    checks = {"class_signal": class_signal(evaluation["tstr"]["auc_mean"], eval_cfg, "val")}
    test = evaluation.get("realism", {}).get("two_sample", {}).get("twin_vs_real")
    if test:
        checks["realism"] = realism(float(test["auc"]), eval_cfg)
    return verdict(checks)
