"""Compare generator settings fast: the demo's hospitals and privacy plans, FedAvg in this
process (no Flower, no secure aggregation), TSTR on val at chosen rounds; writes JSON.

    .venv/bin/python scripts/sweep.py --out runs/sweep-aux.json --every 5 \\
        data.path=/path/to/pneumoniamnist.npz model.conditioning=aux

Each hospital runs the same ``local_round`` as in the demo, with its own noisy label mix,
accountant history and optimizer moments; the server averages by examples. TSTR here is a
cheaper evaluation than the demo's (a 4,000-image twin, 10 epochs, 2 classifier seeds), so
compare runs of this script with each other; the realism test (two-sample AUC, spectral
distance over its floor) is the demo's own. Like the demo's twin, it is drawn from the
global models of the last ``twin.checkpoints`` rounds (``twin.checkpoints=1``: the last
model alone). With ``model.conditioning=aux`` it also
scores the discriminator's class head on val: a DP classifier that comes for free.
DP noise is drawn from the OS, so two runs of one setting differ; run a setting twice
before believing a small difference.
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fedtwin.config import load_config
from fedtwin.data import label_shares, pooled_train
from fedtwin.demo import load_real_data, simulate_hospitals
from fedtwin.features import noisy_feature_sums, release_rows
from fedtwin.inprocess import run_rounds
from fedtwin.jsonio import write_json
from fedtwin.manifold import prdc
from fedtwin.metrics import classification_scores, features, predict_proba, train_classifier
from fedtwin.models import model_from_config
from fedtwin.models.dcgan import total_variation
from fedtwin.privacy import noisy_class_shares, plan_from_config, uses_features
from fedtwin.realism import realism_report
from fedtwin.tensors import get_weights, set_weights, to_tensor
from fedtwin.twin import generate_from_rounds, label_mix


def scores(cfg: dict, recent: list[dict], labels: np.ndarray, val, judge=None, train=None) -> dict:
    """TSTR of a twin drawn from the ``recent`` global models (as ``twin.checkpoints``
    does), its precision and coverage against val in the features of ``judge`` (a CNN
    trained on the real train split), its realism against ``train`` and val (the
    two-sample test's AUC and the spectral distance over its floor, ``fedtwin.realism``)
    and, for the AC-GAN, the last model's class head on val."""
    models = []
    for weights in recent:
        model = model_from_config(cfg)
        set_weights(model, weights)
        models.append(model)
    images = generate_from_rounds(models, labels, seed=0)
    aucs, accs = [], []
    for seed in (0, 1):
        clf = train_classifier(images, labels, model.n_classes, epochs=10, batch_size=128,
                               lr=1e-3, seed=seed)  # fmt: skip
        scored = classification_scores(predict_proba(clf, val.images), val.labels)
        aucs.append(scored["auc"])
        accs.append(scored["acc"])
    out = {
        "tstr_auc": float(np.mean(aucs)),
        "tstr_auc_per_seed": aucs,
        "tstr_acc": float(np.mean(accs)),
        "models": len(models),
        "total_variation": smoothness(images),
        "real_total_variation": smoothness(val.images),
    }
    if train is not None:
        realism = realism_report(images, train.images, val.images, cfg["eval"])
        ts, sp = realism["two_sample"], realism["spectrum"]
        out["c2st_auc"] = ts["twin_vs_real"]["auc"]
        out["c2st_floor"] = ts["real_vs_real_floor"]["auc"]
        out["spectral_over_floor"] = sp["distance_over_floor"]
    if judge is not None:
        out.update(prdc(features(judge, val.images), features(judge, images)))
        out["images"] = images
    n_classes = len(cfg["data"]["classes"])
    if cfg["model"].get("conditioning") == "aux":
        with torch.no_grad():
            logits = model.private_module()(to_tensor(val.images), torch.as_tensor(val.labels))
        probs = torch.softmax(logits[:, 1 : 1 + n_classes], dim=1).numpy()
        out["d_class_head_auc"] = classification_scores(probs, val.labels)["auc"]
    return out


def smoothness(images: np.ndarray) -> float:
    """The images' total variation in [-1, 1] units (``fedtwin.models.dcgan``'s prior)."""
    return float(total_variation(to_tensor(images)))


def save_grid(prefix: Path | None, name: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Two rows of 16 twin images per class, as ``<prefix>-<name>.png``."""
    if prefix is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = np.unique(labels)
    fig, axes = plt.subplots(2 * len(classes), 16, figsize=(16, 2.2 * len(classes)))
    for r, ax_row in enumerate(axes):
        shown = images[labels == classes[r // 2]][(r % 2) * 16 :][:16]
        for ax, image in zip(ax_row, shown, strict=False):
            ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        for ax in ax_row:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(f"{prefix}-{name}.png", dpi=60)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--every", type=int, default=0, help="also score every N rounds")
    parser.add_argument("--png", type=Path, help="write each scored twin's image grid here")
    parser.add_argument("--warm-only", action="store_true",
                        help="stop after scoring the warm-started generator")  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for fedtwin demo")
    args = parser.parse_args()
    cfg = load_config(args.overrides)
    fed, n_classes = cfg["federation"], len(cfg["data"]["classes"])
    rounds, steps, batch = int(fed["rounds"]), int(fed["local_steps"]), int(fed["batch_size"])
    train, val, _ = load_real_data(cfg)
    hospitals = simulate_hospitals(cfg, train)
    real = pooled_train(hospitals)
    judge = train_classifier(real.images, real.labels, n_classes, epochs=10, batch_size=128,
                             lr=1e-3, seed=0)  # fmt: skip
    features = uses_features(cfg)
    plans = [
        plan_from_config(
            cfg["privacy"],
            n_train=len(h.train),
            batch_size=batch,
            total_steps=rounds * steps,
            features=features,
        )  # fmt: skip
        for h in hospitals
    ]
    priors = [
        noisy_class_shares(h.train.labels, n_classes, p)
        for h, p in zip(hospitals, plans, strict=True)
    ]
    histories = [p.one_shot_releases() if p.enabled else [] for p in plans]
    twin_labels = label_mix(label_shares(hospitals), 4000, "federation", 0)
    torch.manual_seed(int(cfg["seed"]))
    model = model_from_config(cfg)
    result_extra = {}
    if features:  # each hospital's one release, averaged by examples as FedAvg does
        start = time.time()
        rows = [
            release_rows(
                noisy_feature_sums(
                    model.feature_map,
                    h.train.images,
                    h.train.labels,
                    n_classes,
                    p.feature_noise if p.enabled else 0.0,
                ),
                prior * len(h.train),
                len(h.train),
            )  # fmt: skip
            for h, p, prior in zip(hospitals, plans, priors, strict=True)
        ]
        sizes = [len(h.train) for h in hospitals]
        pooled = sum(r * n for r, n in zip(rows, sizes, strict=True)) / sum(sizes)
        model.feature_release.copy_(torch.as_tensor(pooled))
        rng = torch.Generator().manual_seed(int(cfg["seed"]))
        trace = model.warm_start(int(fed["warm_start_steps"]), rng, progress=True)
        result_extra = {"warm_start_s": time.time() - start, "warm_start_loss": trace}
        warm = scores(cfg, [get_weights(model)], twin_labels, val, judge, real)
        save_grid(args.png, "warm", warm.pop("images"), twin_labels)
        result_extra["warm_start_scores"] = warm
        tqdm.write(f"warm start: {warm}")
        if args.warm_only:
            write_json(args.out, {"overrides": args.overrides, **result_extra})
            return
    weights = get_weights(model)
    recent = deque(maxlen=int(cfg["twin"]["checkpoints"]))  # the twin's generators
    result = {"overrides": args.overrides, "sigma": [p.noise_multiplier for p in plans],
              "sample_rate": [p.sample_rate for p in plans], "rounds": {}}  # fmt: skip
    result.update(result_extra)
    start = time.time()

    def model_for(i: int):
        model = model_from_config(cfg)
        model.label_prior = torch.as_tensor(priors[i], dtype=torch.float32)
        return model

    def on_round(rnd: int, weights: dict, results: list) -> None:
        recent.append(weights)
        if rnd == rounds or (args.every and rnd % args.every == 0):
            scored = scores(cfg, list(recent), twin_labels, val, judge, real)
            save_grid(args.png, f"round{rnd}", scored.pop("images"), twin_labels)
            result["rounds"][rnd] = {
                "train_s": time.time() - start,
                "epsilon": [r.epsilon for r in results],
                **scored,
            }
            tqdm.write(f"round {rnd}: {result['rounds'][rnd]}")
            write_json(args.out, result)

    run_rounds(model_for, weights, hospitals, plans, rounds=rounds, local_steps=steps,
               batch_size=batch, seed=int(cfg["seed"]), keep_optimizer=True,
               histories=histories, on_round=on_round, progress=True)  # fmt: skip
    torch.save(list(recent), args.out.with_suffix(".pt"))  # the twin's generators, to study


if __name__ == "__main__":
    main()
