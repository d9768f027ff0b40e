"""Federated utility: a classifier trained on the twin, scored on every hospital's holdout.

The server trains the classifier on the twin alone (so it may travel: it has seen no real
image), each hospital scores it on its holdout with :func:`site_utility` and returns
histograms of the predicted log-odds of each class on fixed bins, and counts; :func:`pool_utility`
adds them up into one AUC and accuracy over all holdouts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedtwin.histograms import auc_from_hists, hist
from fedtwin.metrics import Classifier, predict_log_odds

# Log-odds, not probabilities: a confident classifier puts most probabilities within 1e-4
# of 0 or 1, where probability bins would tie them all and lose the ranking (AUC -> 0.5).
# Bins of 0.02 in log-odds; the rare values beyond +-40 go into the end bins.
SCORE_BINS = np.linspace(-40.0, 40.0, 4001)


def site_utility(model: Classifier, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Per class ``c``: histograms of the log-odds of ``c`` over images of class ``c`` and
    of other classes, and how many of each class were classified right. No per-image value."""
    scores = predict_log_odds(model, images)
    n_classes = scores.shape[1]
    out: dict[str, Any] = {"n": len(labels), "per_class": {}}
    for c in range(n_classes):
        mine = labels == c
        out["per_class"][str(c)] = {
            "positive": hist(scores[mine, c], SCORE_BINS),
            "negative": hist(scores[~mine, c], SCORE_BINS),
            "n": int(mine.sum()),
            "correct": int(np.sum(scores[mine].argmax(1) == c)),
        }
    return out


def pool_utility(sites: Mapping[str, dict]) -> dict[str, Any]:
    """AUC (binary: of class 1; else macro one-vs-rest, as ``metrics.classification_scores``)
    and accuracy over every hospital's holdout, with the per-hospital figures."""

    def scores(rows: list[dict]) -> dict[str, Any]:
        classes = sorted(rows[0]["per_class"], key=int)
        aucs, per_class, correct, n = {}, {}, 0, 0
        for c in classes:
            pos = np.sum([r["per_class"][c]["positive"] for r in rows], axis=0)
            neg = np.sum([r["per_class"][c]["negative"] for r in rows], axis=0)
            aucs[c] = auc_from_hists(pos, neg)
            right = sum(int(r["per_class"][c]["correct"]) for r in rows)
            n_c = sum(int(r["per_class"][c]["n"]) for r in rows)
            # the class's images, and the share of them classified as it (its recall)
            per_class[c] = {"n": n_c, "acc": right / n_c if n_c else float("nan")}
            correct, n = correct + right, n + n_c
        if len(classes) == 2:
            auc = aucs["1"]
        else:
            auc = float(np.nanmean(list(aucs.values())))
        acc = correct / n if n else float("nan")
        return {"auc": auc, "acc": acc, "n": n, "per_class": per_class}

    names = list(sites)
    if not names:
        return {"auc": float("nan"), "acc": float("nan"), "n": 0, "per_hospital": {}}
    pooled = scores([sites[n] for n in names])
    pooled["per_hospital"] = {n: scores([sites[n]]) for n in names}
    return pooled
