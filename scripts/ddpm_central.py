"""The diffusion generator trained centrally with DP-SGD on the whole train split, in this
process (no federation): a quick way to compare its settings at one privacy budget.

    .venv/bin/python scripts/ddpm_central.py --out runs/ddpm-c1.json --clip 1 \\
        data.path=/path/to/pneumoniamnist.npz +experiment=ddpm_cpu

Trains ``--steps`` DP-SGD steps (batch ``federation.batch_size``, ε = ``privacy.epsilon``,
clipping bound ``--clip``), draws a class-balanced twin of ``--twin`` images, and scores
TSTR AUC on val with two classifier seeds; writes JSON and a grid of 16 images per class
(``--out`` with ``.png``). One run per call: DP noise comes from the OS, so run a setting
more than once before believing a small difference.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fedtwin.config import load_config
from fedtwin.demo import load_real_data
from fedtwin.jsonio import write_json
from fedtwin.metrics import classification_scores, predict_proba, train_classifier
from fedtwin.models import model_from_config
from fedtwin.privacy import plan_from_config
from fedtwin.tensors import set_weights, to_uint8
from fedtwin.training import local_round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--steps", type=int, default=300, help="DP-SGD steps")
    parser.add_argument("--clip", type=float, default=None, help="clipping bound C")
    parser.add_argument("--twin", type=int, default=600, help="twin images to draw")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()

    cfg = load_config(["model=ddpm", *args.overrides])
    if args.clip is not None:
        cfg["privacy"]["max_grad_norm"] = args.clip
    train, val, _ = load_real_data(cfg)
    n_classes, batch = len(cfg["data"]["classes"]), int(cfg["federation"]["batch_size"])
    torch.manual_seed(int(cfg["seed"]))
    model = model_from_config(cfg)
    plan = plan_from_config(
        cfg["privacy"], n_train=len(train.labels), batch_size=batch, total_steps=args.steps
    )
    start = time.time()
    result = local_round(
        model, train.images, train.labels, plan,
        steps=args.steps, batch_size=batch, history=[], seed=int(cfg["seed"]),
    )  # fmt: skip
    set_weights(model, result.weights)
    train_s = time.time() - start

    labels = np.random.default_rng(0).permutation(np.arange(args.twin) % n_classes)
    images = to_uint8(model.sample(torch.as_tensor(labels), torch.Generator().manual_seed(1)))
    aucs = []
    for seed in (0, 1):
        clf = train_classifier(images, labels, n_classes, epochs=15, batch_size=128,
                               lr=1e-3, seed=seed)  # fmt: skip
        aucs.append(classification_scores(predict_proba(clf, val.images), val.labels)["auc"])
    rows = [np.concatenate(list(images[labels == c][:16]), axis=1) for c in range(n_classes)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(args.out.with_suffix(".png"))
    out = {
        "model": cfg["model"],
        "max_grad_norm": plan.max_grad_norm,
        "noise_multiplier": plan.noise_multiplier,
        "epsilon": result.epsilon,
        "steps": args.steps,
        "loss": result.losses.get("loss"),
        "train_s": train_s,
        "tstr_auc": aucs,
    }
    write_json(args.out, out)
    print(out)


if __name__ == "__main__":
    main()
