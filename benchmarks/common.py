"""What several benchmark parts share: the demo's setting, running `fedtwin demo` as a user
would and reading back the figures it measures (TSTR/TRTR, Fréchet distance, manifold
metrics, audit, wall time), repeated independent runs, and the generator's throughput (DP
vs non-DP training samples/s, generation images/s).

``LAST_ROUND_ALONE`` is set by the runner from ``--last-round-alone``; it is read here, on
this module, when a demo run is scored.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fedtwin.jsonio import write_json

SETTING = [
    "federation.hospitals=4",
    "federation.partition=dirichlet",
    "federation.alpha=0.5",
    "privacy.epsilon=10",
    "privacy.delta=1e-5",
]


LAST_ROUND_ALONE = False  # --last-round-alone: also score the last round's generator alone


def run_demo_command(out: Path, overrides: list[str]) -> dict:
    """Run `fedtwin demo` as a user would, in its own process, and read its summary."""
    import json

    cmd = [sys.executable, "-m", "fedtwin.cli", "demo", "--out", str(out), *overrides]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"`fedtwin demo` failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    ev = summary["evaluation"]
    return {
        "command_wall_time_s": wall,
        "federation_time_s": summary["federation_time_s"],
        "phases": summary.get("phases"),  # seconds of each phase (the demo's own clock)
        "gate": summary["gate"],
        "audit": summary["audit"],
        "federated_utility": {
            k: summary["federated_utility"][k] for k in ("auc", "acc", "n", "per_hospital")
        },
        # each hospital's own classifier with and without the twin (eval.hybrid), pooled
        # and per hospital, beside the twin's classifier: does the twin help *this* hospital?
        "hybrid": summary.get("hybrid"),
        "per_hospital": summary.get("per_hospital"),
        "rounds_completed": summary["rounds_completed"],
        "epsilon_per_hospital": summary["epsilon_per_hospital"],
        "delta": summary["delta"],
        "tstr": classifier_scores(ev["tstr"]),
        "trtr": classifier_scores(ev["trtr"]),
        "frechet": ev["frechet"],
        "manifold": ev["manifold"],
        "realism": realism_figures(ev["realism"]),
        "quality": summary["quality"],
        "generator_rounds": summary.get("generator_rounds"),
        "last_round_alone": last_round_alone(out) if LAST_ROUND_ALONE else None,
        "output": str(out),
    }


def realism_figures(realism: dict) -> dict:
    """The realism figures a benchmark keeps: the two-sample test and its floor, the
    spectral distance and its floor (not the spectra nor the image indices)."""
    ts, sp = realism["two_sample"], realism["spectrum"]
    return {
        "c2st": ts["twin_vs_real"],
        "c2st_floor": ts["real_vs_real_floor"],
        "spectral_distance": sp["distance_twin_val"],
        "spectral_floor": sp["distance_floor_train_val"],
        "spectral_over_floor": sp["distance_over_floor"],
    }


def classifier_scores(evaluation: dict) -> dict:
    """The figures of a TSTR or TRTR result that the benchmark keeps."""
    return {k: evaluation[k] for k in ("auc_mean", "auc_std", "acc_mean", "acc_std")}


def last_round_alone(out: Path) -> dict | None:
    """The demo's evaluation of a twin made by the last round's generator alone
    (``twin.checkpoints=1``), with the twin's labels and seed: what drawing the twin from
    several rounds adds, measured on the same training run. None if it used one round."""
    from fedtwin.checkpoints import read_history, recent_global_models
    from fedtwin.data import pooled_train
    from fedtwin.demo import load_real_data, simulate_hospitals
    from fedtwin.metrics import evaluate_twin
    from fedtwin.models import model_from_config
    from fedtwin.tensors import set_weights
    from fedtwin.twin import generate

    manifest = json.loads((out / "twin" / "manifest.json").read_text())
    if len(manifest.get("generator_rounds", [])) < 2:
        return None
    cfg = json.loads((out / "config.json").read_text())  # the manifest's holds no local paths
    train, val, _ = load_real_data(cfg)
    real = pooled_train(simulate_hospitals(cfg, train))
    [(done, weights)] = recent_global_models(out, read_history(out), 1)
    with np.load(out / "twin" / "images.npz") as npz:
        labels = npz["train_labels"][:, 0].astype(np.int64)
    n_classes = len(cfg["data"]["classes"])
    model = model_from_config(cfg)
    set_weights(model, weights)
    images = generate(model, labels, int(cfg["seed"]))
    twin, real, val = (images, labels), (real.images, real.labels), (val.images, val.labels)
    ev = evaluate_twin(twin, real, val, cfg["eval"], n_classes=n_classes)
    return {
        "round": done,
        "tstr": classifier_scores(ev["tstr"]),
        "frechet_twin_vs_val": ev["frechet"]["twin_vs_val"],
    }


def repeated(out: Path, overrides: list[str], runs: int) -> dict:
    """``runs`` independent demo runs of one setting (fresh DP noise each), every one kept,
    and the spread of the figures the issue's goals name. Each finished run is also written
    to ``out/runs.json`` at once, so a part stopped before its last run keeps the others."""
    results = []
    for i in range(runs):
        results.append(run_demo_command(out / f"run-{i + 1}", overrides))
        write_json(out / "runs.json", {"setting": overrides, "runs": results})
    figures = {
        "tstr_auc": [r["tstr"]["auc_mean"] for r in results],
        "tstr_acc": [r["tstr"]["acc_mean"] for r in results],
        "coverage": [r["manifold"]["twin"]["coverage"] for r in results],
        "precision": [r["manifold"]["twin"]["precision"] for r in results],
        "c2st_auc": [r["realism"]["c2st"]["auc"] for r in results],
        "spectral_over_floor": [r["realism"]["spectral_over_floor"] for r in results],
        "frechet_over_floor": [
            r["frechet"]["twin_vs_val"] / r["frechet"]["train_vs_val_floor"] for r in results
        ],
        "wall_time_s": [r["command_wall_time_s"] for r in results],
        "signed": [r["gate"]["signed"] for r in results],
    }
    spread = {
        k: {"min": min(v), "mean": float(np.mean(v)), "max": max(v)}
        for k, v in figures.items()
        if k != "signed"
    }
    return {"setting": overrides, "runs": results, "figures": figures, "spread": spread}


def throughput(cfg: dict, steps: int, n_generate: int) -> dict:
    """DP vs non-DP local training samples/s of ``cfg``'s generator (same model, same data,
    one process) and its generation images/s."""
    from fedtwin.config import resolve_device
    from fedtwin.demo import load_real_data
    from fedtwin.models import build_model
    from fedtwin.privacy import plan_from_config
    from fedtwin.training import local_round
    from fedtwin.twin import generate

    device = resolve_device(str(cfg.get("device", "auto")))
    train, _, _ = load_real_data(cfg)
    n_classes, size = len(cfg["data"]["classes"]), int(cfg["data"]["image_size"])
    batch = int(cfg["federation"]["batch_size"])
    images, labels = train.images[:2000], train.labels[:2000]
    out: dict = {
        "model": dict(cfg["model"]),
        "device": device,
        "training_images": len(images),
        "steps": steps,
        "batch_size": batch,
    }
    for mode in ("dp", "no_dp"):
        plan = plan_from_config(
            cfg["privacy"],
            n_train=len(images),
            batch_size=batch,
            total_steps=steps + 2,
            enabled=mode == "dp",
        )
        model = build_model(cfg["model"], n_classes, size)
        args = dict(batch_size=batch, history=[], device=device)
        local_round(model, images, labels, plan, steps=2, seed=0, **args)  # warm-up
        start = time.time()
        local_round(model, images, labels, plan, steps=steps, seed=1, **args)
        seconds = time.time() - start
        out[f"{mode}_samples_per_s"] = steps * plan.sample_rate * len(images) / seconds
    out["dp_over_no_dp_throughput"] = out["dp_samples_per_s"] / out["no_dp_samples_per_s"]

    model = build_model(cfg["model"], n_classes, size)
    gen_labels = np.arange(n_generate) % n_classes
    start = time.time()
    fake = generate(model, gen_labels, seed=0, device=device)
    out["generation_images_per_s"] = len(fake) / (time.time() - start)
    out["_images"] = (fake, gen_labels)
    return out
