"""Part (j): what larger and colour images cost. Seconds per DP-SGD step of each generator
at 28 and 64 px, grey and colour, and of the DCGAN at 128 px (the diffusion model's step
there takes minutes on a CPU), on the configured device
with the configured batch, on real images upsampled to the size (PneumoniaMNIST grey;
for colour the same images in three channels: the cost depends on the shape, not on
what the pixels show). Ratios are to 28 px grey measured in the same run."""

from __future__ import annotations

import time

import numpy as np


def part_j(cfg: dict) -> dict:
    from fedtwin.config import resolve_device
    from fedtwin.data import resize_images
    from fedtwin.demo import load_real_data
    from fedtwin.models import build_model
    from fedtwin.privacy import plan_from_config
    from fedtwin.training import local_round

    device = resolve_device(str(cfg.get("device", "auto")))
    quick = bool(cfg.get("quick"))
    train, _, _ = load_real_data(cfg)
    images, labels = train.images[:1000], train.labels[:1000]
    n_classes = len(cfg["data"]["classes"])
    batch = int(cfg["federation"]["batch_size"])
    steps = 2 if quick else 5
    # each generator at its default settings (the DCGAN's feature release is not a step)
    models = {"dcgan": {"name": "dcgan", "features": None}, "ddpm": {"name": "ddpm"}}
    out: dict = {"device": device, "batch_size": batch, "steps": steps, "runs": []}
    for size in (28, 64, 128):
        grey = resize_images(images, size)
        for channels in (1, 3):
            x = grey if channels == 1 else np.repeat(grey[..., None], 3, axis=3)
            for name, model_cfg in models.items():
                if name == "ddpm" and size > 64 and device == "cpu":
                    continue
                plan = plan_from_config(
                    cfg["privacy"], n_train=len(x), batch_size=batch, total_steps=steps + 1
                )
                model = build_model(model_cfg, n_classes, size, channels)
                args = dict(batch_size=batch, history=[], device=device)
                local_round(model, x, labels, plan, steps=1, seed=0, **args)  # warm-up
                start = time.time()
                local_round(model, x, labels, plan, steps=steps, seed=1, **args)
                per_step = (time.time() - start) / steps
                parameters = sum(p.numel() for p in model.private_module().parameters())
                out["runs"].append(
                    {"model": name, "size": size, "channels": channels, "s_per_step": per_step,
                     "private_parameters": parameters}
                )  # fmt: skip
                line = f"{name} {size} px x{channels}: {per_step:.3f} s/step"
                print(f"[benchmark] {line}", flush=True)
    first = {(r["model"], r["size"], r["channels"]): r["s_per_step"] for r in out["runs"]}
    base = {name: first[(name, 28, 1)] for name in models}
    for r in out["runs"]:
        r["over_28px_grey"] = r["s_per_step"] / base[r["model"]]
    return out
