"""``fedtwin demo``: the whole pipeline on one machine, hospitals simulated by Flower.

data -> hospitals (partition + holdout) -> federated DP training (Flower Simulation Engine)
-> global generator -> twin -> federated privacy audit and utility at the hospitals ->
twin directory, signed if the audit passed -> TSTR/TRTR, Fréchet distance, realism (the
two-sample test, spectra) and the quality gate on val -> report.html
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedtwin.config import check_config, resolve_device
from fedtwin.data import (
    Hospital,
    Split,
    load_npz,
    make_hospitals,
    pooled_train,
    resize_images,
)
from fedtwin.jsonio import write_json
from fedtwin.medmnist import resolve_data_path
from fedtwin.progress import Terminal

log = logging.getLogger("fedtwin")


def load_real_data(cfg: dict) -> tuple[Split, Split, Path]:
    """The real train and val splits named by ``data.*``, at ``data.image_size``."""
    d = cfg["data"]
    path = resolve_data_path(d)
    channels = int(d.get("channels", 1))
    train, val = load_npz(path, "train", channels), load_npz(path, "val", channels)
    size = int(d["image_size"])
    if train.images.shape[1:3] != (size, size):
        train = Split(resize_images(train.images, size), train.labels)
        val = Split(resize_images(val.images, size), val.labels)
    return train, val, path


def simulate_hospitals(cfg: dict, train: Split) -> list[Hospital]:
    fed = cfg["federation"]
    return make_hospitals(
        train,
        int(fed["hospitals"]),
        str(fed["partition"]),
        float(fed["alpha"]),
        float(fed["holdout_fraction"]),
        int(cfg["seed"]),
    )


def run_demo(
    cfg: dict[str, Any], out: Path, progress: bool = True, verbose: bool = False
) -> dict[str, Any]:
    """Run everything into ``out``; returns the summary also written to ``summary.json``,
    with the seconds of each phase (``phases``). ``progress`` shows each phase as it runs
    (``fedtwin.progress.Terminal``) and the evaluation's classifier epochs; ``verbose``
    shows Flower's own log as the federation runs."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    check_config(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    resolve_device(str(cfg["device"]))  # device=cuda without a GPU: an error now, not later
    with contextlib.ExitStack() as stack:
        stream = None if progress else stack.enter_context(open(os.devnull, "w"))
        terminal = stack.enter_context(Terminal(stream))
        stack.enter_context(logging_redirect_tqdm())
        return _run_phases(cfg, out, terminal, progress=progress, verbose=verbose)


def _run_phases(
    cfg: dict[str, Any], out: Path, terminal: Terminal, *, progress: bool, verbose: bool
) -> dict[str, Any]:
    """``run_demo``, each phase started on ``terminal``."""
    from fedtwin.checkpoints import read_history
    from fedtwin.gate import final_epsilons
    from fedtwin.metrics import TWIN_CLASSIFIER, evaluate_twin, load_classifier, recipe
    from fedtwin.quality import evaluation_quality
    from fedtwin.report import write_report
    from fedtwin.server.simulation import run_federation

    start = time.time()
    terminal.phase("data")
    write_json(out / "config.json", cfg)
    train, val, _ = load_real_data(cfg)
    hospitals = simulate_hospitals(cfg, train)
    n_classes = len(cfg["data"]["classes"])
    for h in hospitals:
        counts = h.train.class_counts(n_classes).tolist()
        log.info(
            "%s: %d train (per class %s), %d holdout", h.name, len(h.train), counts, len(h.holdout)
        )

    # Training, then the twin: generated, audited at the hospitals, written, signed if passed.
    run_federation(cfg, out, terminal, verbose=verbose)
    federation_time = time.time() - start
    twin_dir = out / "twin"
    if not (twin_dir / "manifest.json").is_file():
        raise RuntimeError(f"the federation ended without a twin in {twin_dir}; see the log")
    history = read_history(out)
    epsilons = {h.name: 0.0 for h in hospitals} | final_epsilons(history)
    manifest = json.loads((twin_dir / "manifest.json").read_text())
    audit = json.loads((twin_dir / "audit.json").read_text())
    with np.load(twin_dir / "images.npz") as npz:
        images, labels = npz["train_images"], npz["train_labels"][:, 0].astype(np.int64)

    real_train = pooled_train(hospitals)
    seed = int(cfg["seed"])
    made_by = recipe(images, labels, cfg["eval"], seed)
    channels = int(cfg["data"].get("channels", 1))
    server_classifier = load_classifier(out / TWIN_CLASSIFIER, made_by, n_classes, channels)
    evaluation = evaluate_twin(
        (images, labels),
        (real_train.images, real_train.labels),
        (val.images, val.labels),
        cfg["eval"],
        n_classes=n_classes,
        progress=progress,
        on_phase=terminal.phase,
        twin_classifiers={seed: server_classifier} if server_classifier else None,
    )
    quality = evaluation_quality(evaluation, cfg["eval"])
    for warning in quality["warnings"]:
        log.warning("twin quality: %s", warning)
    terminal.phase("report")
    wall = time.time() - start
    summary = {
        "wall_time_s": wall,
        "federation_time_s": federation_time,  # training, twin, audit at the hospitals
        "phases": dict(terminal.seconds),  # seconds of each phase; the report's is added below
        "rounds_completed": int(manifest["rounds_completed"]),
        "generator_rounds": manifest["generator_rounds"],  # the twin's share-makers
        "epsilon_per_hospital": epsilons,
        "delta": float(cfg["privacy"]["delta"]),
        "gate": manifest["gate"],
        "audit": manifest["audit"],
        "federated_utility": manifest["federated_utility"],
        "hybrid": hybrid_figures(manifest["federated_utility"]),
        "per_hospital": per_hospital_figures(manifest["federated_utility"]),
        "evaluation": evaluation,
        "quality": quality,  # the quality gate on val; the manifest has the hospitals' one
    }
    write_report(
        out / "report.html",
        real_val=(val.images, val.labels),
        twin=(images, labels),
        class_names=list(cfg["data"]["classes"]),
        epsilons=epsilons,
        delta=float(cfg["privacy"]["delta"]),
        dp_enabled=bool(cfg["privacy"]["enabled"]),
        losses=round_losses(history),
        evaluation=evaluation,
        audit=audit,
        gate=manifest["gate"],
        quality=quality,
        federated_utility=manifest["federated_utility"],
        config=cfg,
        wall_time_s=wall,
        phases=summary["phases"],
        notes=[
            "the twin was drawn from the global generators of rounds "
            f"{', '.join(map(str, manifest['generator_rounds']))}, an equal share each "
            "(twin.checkpoints)"
        ],
    )
    terminal.end()
    summary["wall_time_s"] = time.time() - start
    summary["phases"] = dict(terminal.seconds)
    write_json(out / "summary.json", summary)
    return summary


UTILITY_KINDS = ("twin", "hybrid", "real_only")  # whose classifier scored the holdouts


def _by_classifier(utility: dict) -> dict:
    """Whose classifier scored the holdouts -> its pooled figures (with ``per_hospital``)."""
    return {"twin": utility, **{k: utility[k] for k in UTILITY_KINDS[1:] if k in utility}}


def hybrid_figures(utility: dict) -> dict:
    """Pooled over the hospitals' holdouts: AUC and accuracy of the twin's classifier, and
    of the hospitals' own classifiers trained with the twin and without it."""
    return {k: {m: u[m] for m in ("auc", "acc", "n")} for k, u in _by_classifier(utility).items()}


def per_hospital_figures(utility: dict) -> dict:
    """Hospital -> its holdout size and label mix (images per class) and, for each
    classifier, its AUC, accuracy and per-class accuracy (recall) there."""
    kinds = _by_classifier(utility)

    def figures(u: dict) -> dict:
        per_class = {c: v["acc"] for c, v in u.get("per_class", {}).items()}
        return {"auc": u["auc"], "acc": u["acc"], "per_class_acc": per_class}

    return {
        name: {"holdout": row["n"]}
        | {"label_mix": {c: v["n"] for c, v in row.get("per_class", {}).items()}}
        | {k: figures(u["per_hospital"][name]) for k, u in kinds.items()}
        for name, row in utility.get("per_hospital", {}).items()
    }


def round_losses(history: list[dict]) -> list[dict]:
    rows = []
    for entry in history:
        hs = entry["hospitals"].values()
        row = {"round": entry["round"]}
        for key in ("loss_d", "loss_g"):
            vals = [m[key] for m in hs if key in m]
            row[key] = float(np.mean(vals)) if vals else math.nan
        rows.append(row)
    return rows
