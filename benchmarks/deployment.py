"""Part (h): deployment: the same training run over real processes on 127.0.0.1
(SuperLink over TLS, one SuperNode per hospital, `flwr run`), with and without SecAgg+:
wall time per round against the same local compute alone (overhead ratio), and the bytes
sent per round to and from each hospital.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from fedtwin.config import load_config


def part_h(cfg: dict, out_dir: Path, overrides: list[str]) -> dict:
    import json
    import shutil

    from fedtwin.localnet import build
    from fedtwin.medmnist import resolve_data_path

    quick = bool(cfg.get("quick"))
    names = ("hospital-0", "hospital-1", "hospital-2")
    fed = cfg["federation"]
    rounds, steps = (2 if quick else 3), int(fed["local_steps"])
    source = resolve_data_path(cfg["data"])
    per_hospital = 300 if quick else 1000
    setting = [*overrides, f"federation.hospitals={len(names)}", "federation.min_hospitals=2",
               f"federation.rounds={rounds}", f"federation.local_steps={steps}", "twin.size=200",
               "twin.dicom=false", "audit.override=deployment-benchmark"]  # fmt: skip
    result = {
        "what": f"{len(names)} hospitals of {per_hospital} images (80 % train) on one machine, "
        f"{rounds} rounds x {steps} DP steps; a round's wall time at the ServerApp vs the "
        "hospitals' local compute alone (in this process, one after another); bytes are "
        "the messages' content as Flower sends it, before HTTP framing and TLS",
        "hospitals": len(names),
        "rounds": rounds,
        "local_steps": steps,
    }
    root = out_dir / "h_deployment"
    shutil.rmtree(root, ignore_errors=True)
    archives = {}
    for mode, secure in (("secagg", True), ("plain", False)):
        (root / mode).mkdir(parents=True)
        c = build(root / mode, source, names, per_hospital)
        archives = c.archives
        try:
            start = time.time()
            run = c.run(root / mode / "out", " ".join(
                [*setting, f"federation.secure_aggregation={str(secure).lower()}"]))  # fmt: skip
            wall = time.time() - start
        finally:
            c.stop()
        if run["status"] != "finished:completed":
            raise RuntimeError(f"{mode} run {run['status']}: {run['logs'][-2000:]}")
        history = json.loads((root / mode / "out" / "history.json").read_text())["rounds"]
        result[mode] = deployment_rounds(history, wall)
    alone = local_compute_alone(cfg, setting, archives, steps)
    result["local_compute_alone_s"] = alone
    serial, slowest = sum(alone.values()), max(alone.values())
    result["local_compute_alone_serial_s"] = serial
    for mode in ("secagg", "plain"):
        r = result[mode]
        r["overhead_vs_serial_compute"] = r["round_s_mean"] / serial
        r["overhead_vs_slowest_hospital"] = r["round_s_mean"] / slowest
    return result


def deployment_rounds(history: list[dict], wall: float) -> dict:
    """Per-round seconds, in-deployment compute and bytes per hospital from history.json."""
    rows = []
    for entry in history:
        traffic = entry["traffic"]
        down, up = traffic["to_node_bytes"].values(), traffic["from_node_bytes"].values()
        rows.append({
            "round": entry["round"],
            "seconds": entry["seconds"],
            "hospitals": len(entry["hospitals"]),
            "train_s_max": max(m["train-seconds"] for m in entry["hospitals"].values()),
            "bytes_to_hospital_mean": float(np.mean(list(down))),
            "bytes_from_hospital_mean": float(np.mean(list(up))),
        })  # fmt: skip
    return {
        "run_wall_time_s": wall,
        "rounds": rows,
        "round_s_mean": float(np.mean([r["seconds"] for r in rows])),
        "bytes_per_round_per_hospital": float(
            np.mean([r["bytes_to_hospital_mean"] + r["bytes_from_hospital_mean"] for r in rows])
        ),
    }


def local_compute_alone(cfg: dict, setting: list[str], archives: dict, steps: int) -> dict:
    """Each hospital's DP local round, run here on its archive without Flower."""
    from fedtwin.client.hospital import THREADS
    from fedtwin.client.site import load_archive
    from fedtwin.models import build_model
    from fedtwin.privacy import plan_from_config
    from fedtwin.server.server_app import initial_weights
    from fedtwin.tensors import set_weights
    from fedtwin.training import local_round

    run_cfg = load_config(setting)
    fed, size = run_cfg["federation"], int(run_cfg["data"]["image_size"])
    times = {}
    for name, archive in archives.items():
        hospital = load_archive(str(archive), "", size, float(fed["holdout_fraction"]))
        model = build_model(run_cfg["model"], len(run_cfg["data"]["classes"]), size)
        set_weights(model, initial_weights(run_cfg))
        plan = plan_from_config(
            run_cfg["privacy"], n_train=len(hospital.train), batch_size=int(fed["batch_size"]),
            total_steps=int(fed["rounds"]) * steps,
        )  # fmt: skip
        torch.set_num_threads(THREADS)
        start = time.perf_counter()
        local_round(model, hospital.train.images, hospital.train.labels, plan, steps=steps,
                    batch_size=int(fed["batch_size"]), history=[], seed=0)  # fmt: skip
        times[name] = time.perf_counter() - start
    return times
