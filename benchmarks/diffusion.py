"""Part (g): the diffusion generator (model=ddpm): DP and non-DP training samples/s,
sampling images/s, and the demo's setting trained with it (TSTR, audit, wall time), at
the largest size that finishes in 30 minutes on the CPU, or the default size on a GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.common import SETTING, run_demo_command, throughput

# The diffusion generator on CPU: the preset sized so that the whole `fedtwin demo`
# finishes in about 30 minutes on 2 cores (conf/experiment/ddpm_cpu.yaml).
DDPM_CPU = ["+experiment=ddpm_cpu"]


def part_g(out_dir: Path, overrides: list[str], quick: bool) -> dict:
    import torch

    from fedtwin.config import load_config, resolve_device

    device = resolve_device("auto")
    hardware = {
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    sizes = ["model=ddpm"] if device == "cuda" else DDPM_CPU  # a GPU: the default size
    result: dict = {"hardware": hardware, "setting": SETTING + sizes}
    for name, extra in (("default", ["model=ddpm"]), ("run_config", SETTING + sizes)):
        cfg = {**load_config([*SETTING, *extra, *overrides]), "quick": quick}
        tp = throughput(cfg, steps=3 if quick else 10, n_generate=20 if quick else 200)
        tp.pop("_images")
        result[f"throughput_{name}"] = tp
        print(f"[benchmark] ddpm ({name}) throughput: {tp['dp_samples_per_s']:.0f} DP samples/s")
    run = run_demo_command(out_dir / "g_ddpm", [*SETTING, *sizes, *overrides])
    return {**result, **run}
