"""Benchmark fedtwin and write the figures to one JSON file.

  (a) the demo's setting: 4 hospitals, Dirichlet alpha 0.5, epsilon 10, delta 1e-5:
      TSTR/TRTR on val, Fréchet distance, precision/recall/density/coverage, wall time
      (runs the `fedtwin demo` command; --runs independent runs, all kept)
  (b) the same generator and plan trained centrally: one hospital holding all the data
      (--runs runs)
  (i) the demo's setting at epsilon 1 (--eps1-runs runs)
  (c) the baseline a twin must beat: a DP-SGD classifier trained federated at the same
      epsilon directly on the real data (same hospitals)
  (d) throughput: DP vs non-DP local training samples/s for the same model, generation
      images/s, DICOM files written/s
  (e) the privacy audit: wall time per hospital (audit + utility scoring) for twins of
      1k, 5k and 20k images, and its growth with the twin's size; and, as calibration, the
      audit of real val images posing as a twin (what a twin that is as close to the
      hospitals as new real patients would score)
  (f) the catalog: 8 concurrent pulls of a 20k-image twin from a `fedtwin catalog serve`
      process over mutual TLS on 127.0.0.1: throughput (MB/s) vs a plain local copy of
      the same files, and the server's memory (RSS) before, during and after
  (g) the diffusion generator (model=ddpm): DP and non-DP training samples/s, sampling
      images/s, and the demo's setting trained with it (TSTR, audit, wall time), at the
      largest size that finishes in 30 minutes on the CPU, or the default size on a GPU
  (h) deployment: the same training run over real processes on 127.0.0.1 (SuperLink over
      TLS, one SuperNode per hospital, `flwr run`), with and without SecAgg+: wall time per
      round against the same local compute alone (overhead ratio), and the bytes sent per
      round to and from each hospital

Usage: python scripts/benchmark.py --out runs/benchmark.json [--quick] [--runs 3] [--eps1-runs 1]
       [--parts a,b,c,d,e,f,g,h,i] [--last-round-alone] [hydra overrides...]. Each part is
written as soon as it ends; a failed part records its error and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from fedtwin.config import load_config
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
        "gate": summary["gate"],
        "audit": summary["audit"],
        "federated_utility": {
            k: summary["federated_utility"][k] for k in ("auc", "acc", "n", "per_hospital")
        },
        "rounds_completed": summary["rounds_completed"],
        "epsilon_per_hospital": summary["epsilon_per_hospital"],
        "delta": summary["delta"],
        "tstr": classifier_scores(ev["tstr"]),
        "trtr": classifier_scores(ev["trtr"]),
        "frechet": ev["frechet"],
        "manifold": ev["manifold"],
        "generator_rounds": summary.get("generator_rounds"),
        "last_round_alone": last_round_alone(out) if LAST_ROUND_ALONE else None,
        "output": str(out),
    }


def classifier_scores(evaluation: dict) -> dict:
    """The figures of a TSTR or TRTR result that the benchmark keeps."""
    return {k: evaluation[k] for k in ("auc_mean", "auc_std", "acc_mean", "acc_std")}


def last_round_alone(out: Path) -> dict | None:
    """The demo's evaluation of a twin made by the last round's generator alone
    (``twin.checkpoints=1``), with the twin's labels and seed: what drawing the twin from
    several rounds adds, measured on the same training run. None if it used one round."""
    from fedtwin.data import pooled_train
    from fedtwin.demo import load_real_data, simulate_hospitals
    from fedtwin.metrics import evaluate_twin
    from fedtwin.models import build_model
    from fedtwin.server.strategy import read_history, recent_global_models
    from fedtwin.training import set_weights
    from fedtwin.twin import generate

    manifest = json.loads((out / "twin" / "manifest.json").read_text())
    if len(manifest.get("generator_rounds", [])) < 2:
        return None
    cfg = manifest["config"]
    train, val, _ = load_real_data(cfg)
    real = pooled_train(simulate_hospitals(cfg, train))
    [(done, weights)] = recent_global_models(out, read_history(out), 1)
    with np.load(out / "twin" / "images.npz") as npz:
        labels = npz["train_labels"][:, 0].astype(np.int64)
    n_classes = len(cfg["data"]["classes"])
    model = build_model(cfg["model"], n_classes, int(cfg["data"]["image_size"]))
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


def part_a(out_dir: Path, overrides: list[str], runs: int) -> dict:
    return repeated(out_dir / "a_federated", SETTING + overrides, runs)


def part_i(out_dir: Path, overrides: list[str], runs: int) -> dict:
    return repeated(out_dir / "i_epsilon_1", [*SETTING, *overrides, "privacy.epsilon=1"], runs)


def part_b(out_dir: Path, overrides: list[str], runs: int) -> dict:
    # one hospital: there is no sum to hide an update in, so no secure aggregation
    central = [
        *SETTING,
        *overrides,
        "federation.hospitals=1",
        "federation.secure_aggregation=false",
    ]
    return {
        "note": "the same generator and privacy plan on the pooled training images of the "
        "4 hospitals' split (one hospital, same rounds x local steps, same epsilon)",
        **repeated(out_dir / "b_central", central, runs),
    }


def part_c(cfg: dict) -> dict:
    from fedtwin.baseline import train_federated_dp_classifier
    from fedtwin.demo import load_real_data, simulate_hospitals
    from fedtwin.metrics import classification_scores, predict_proba

    start = time.time()
    train, val, _ = load_real_data(cfg)
    hospitals = simulate_hospitals(cfg, train)
    fed = cfg["federation"]
    runs = []
    for seed in cfg["eval"]["seeds"][:1]:  # one seed: each costs as much as a federation
        model, eps = train_federated_dp_classifier(
            hospitals,
            {**cfg, "seed": int(seed)},
            rounds=int(fed["rounds"]),
            local_steps=int(fed["local_steps"]),
            batch_size=int(fed["batch_size"]),
            progress=True,
        )
        scores = classification_scores(predict_proba(model, val.images), val.labels)
        runs.append({"seed": int(seed), **scores})
    return {
        "what": "classifier trained federated with DP-SGD on the real images (FedAvg, "
        "same hospitals, rounds, local steps and batch size as the generator; C = 1); "
        "one seed",
        "auc_mean": float(np.mean([r["auc"] for r in runs])),
        "auc_std": float(np.std([r["auc"] for r in runs])),
        "acc_mean": float(np.mean([r["acc"] for r in runs])),
        "acc_std": float(np.std([r["acc"] for r in runs])),
        "per_seed": runs,
        "epsilon_per_hospital": eps,
        "wall_time_s": time.time() - start,
    }


def part_d(cfg: dict) -> dict:
    from fedtwin.dicom import write_dicom

    out = throughput(cfg, steps=20 if cfg.get("quick") else 100, n_generate=2000)
    fake, gen_labels = out.pop("_images")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        for i in range(500):
            write_dicom(
                Path(tmp) / f"{i:05d}.dcm", fake[i], label=int(gen_labels[i]), synthetic=True
            )
        out["dicom_files_per_s"] = 500 / (time.time() - start)
    return out


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


def part_e(cfg: dict) -> dict:
    from fedtwin.audit import site_audit
    from fedtwin.demo import load_real_data, simulate_hospitals
    from fedtwin.metrics import features, train_classifier
    from fedtwin.models import build_model
    from fedtwin.twin import generate
    from fedtwin.utility import site_utility

    train, val, _ = load_real_data(cfg)
    hospitals = simulate_hospitals(cfg, train)
    n_classes, size = len(cfg["data"]["classes"]), int(cfg["data"]["image_size"])
    torch.manual_seed(0)
    model = build_model(cfg["model"], n_classes, size)  # timing does not depend on weights
    sizes = (200, 500, 1000) if cfg.get("quick") else (1000, 5000, 20000)
    out: dict = {
        "what": "site_audit + site_utility at each hospital (the work of one audit query), "
        "twin from an untrained generator: the work depends on sizes, not on content",
        "threads": torch.get_num_threads(),
        "hospitals": {
            h.name: {"train": len(h.train), "holdout": len(h.holdout)} for h in hospitals
        },
        "by_twin_size": {},
    }
    for n in sizes:
        labels = np.arange(n) % n_classes
        twin = generate(model, labels, seed=0)
        start = time.time()
        clf = train_classifier(twin, labels, n_classes, epochs=1, batch_size=128, lr=1e-3, seed=0)
        row: dict = {"classifier_1_epoch_s": time.time() - start, "per_hospital_s": {}}
        for h in hospitals:
            start = time.time()
            site_audit(
                twin,
                h.train.images,
                h.holdout.images,
                cfg["audit"],
                embed=lambda x, clf=clf: features(clf, x),
            )
            site_utility(clf, h.holdout.images, h.holdout.labels)
            row["per_hospital_s"][h.name] = time.time() - start
        row["mean_per_hospital_s"] = float(np.mean(list(row["per_hospital_s"].values())))
        out["by_twin_size"][str(n)] = row
        print(f"[benchmark] audit, twin of {n}: {row['mean_per_hospital_s']:.1f} s per hospital")
    first, last = (
        out["by_twin_size"][str(n)]["mean_per_hospital_s"] for n in (sizes[0], sizes[-1])
    )
    out[f"growth_{sizes[-1]}_over_{sizes[0]}"] = last / first
    out["real_val_as_twin"] = audit_real_as_twin(cfg, hospitals, val)
    return out


# The diffusion generator on CPU: sized so that the whole `fedtwin demo` finishes within
# 30 minutes on 2 cores (a quarter of the default width's compute per image: width 16 and
# 2 noise levels per image; 25 DDIM steps; a 2,000-image twin).
DDPM_CPU = [
    "model=ddpm",
    "model.width=16",
    "model.noise_multiplicity=2",
    "model.sample_steps=25",
    "federation.rounds=20",
    "federation.local_steps=40",
    "twin.size=2000",
]


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
    sizes = [] if device == "cuda" else DDPM_CPU  # a GPU runs the default configuration
    result: dict = {"hardware": hardware, "setting": SETTING + sizes}
    for name, extra in (("default", ["model=ddpm"]), ("run_config", SETTING + sizes)):
        cfg = {**load_config([*SETTING, *extra, *overrides]), "quick": quick}
        tp = throughput(cfg, steps=3 if quick else 10, n_generate=20 if quick else 200)
        tp.pop("_images")
        result[f"throughput_{name}"] = tp
        print(f"[benchmark] ddpm ({name}) throughput: {tp['dp_samples_per_s']:.0f} DP samples/s")
    run = run_demo_command(out_dir / "g_ddpm", [*SETTING, *sizes, *overrides])
    return {**result, **run}


def audit_real_as_twin(cfg: dict, hospitals, val) -> dict:
    """The audit's verdict when the "twin" is real val data (never trained on, but from
    the same population): where an honest, perfect generator would land."""
    from fedtwin.audit import pool, site_audit, summary
    from fedtwin.metrics import features, train_classifier

    n_classes = len(cfg["data"]["classes"])
    twin, labels = val.images, val.labels
    clf = train_classifier(twin, labels, n_classes, epochs=3, batch_size=128, lr=1e-3, seed=0)
    sites = {
        h.name: site_audit(twin, h.train.images, h.holdout.images, cfg["audit"],
                           embed=lambda x: features(clf, x))
        for h in hospitals
    }  # fmt: skip
    audit = pool(sites, cfg["audit"], int(cfg["data"]["image_size"]))
    return {"twin": f"real val split ({len(twin)} images)", **summary(audit)}


def part_f(cfg: dict) -> dict:
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    from fedtwin import pki
    from fedtwin.catalog.client import Identity, connect, publish, pull
    from fedtwin.signing import make_signing_key, public_key_path, sign_twin
    from fedtwin.twin import write_twin

    n, clients = (500, 4) if cfg.get("quick") else (20000, 8)
    root = Path(tempfile.mkdtemp(prefix="fedtwin-catalog-bench-"))
    try:
        rng = np.random.default_rng(0)
        twin = root / "twin"
        start = time.time()
        write_twin(
            twin,
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            rng.integers(0, 2, n),
            class_names=list(cfg["data"]["classes"]),
            provenance={"gate": {"audit_verdict": "pass", "signed": True, "override": None}},
        )
        sign_twin(twin, make_signing_key(root / "signing.pem"))
        files = [p for p in twin.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        pki.init_ca(root / "pki")
        pki.issue_server(root / "pki", "catalog", ["127.0.0.1"])
        for name, role in (("op", "operator"), ("alice", "researcher")):
            pki.issue_client(root / "pki", name, role)
        out: dict = {
            "twin_images": n,
            "twin_files": len(files),
            "twin_mb": size / 1e6,
            "make_twin_s": time.time() - start,
            "concurrent_pulls": clients,
        }

        server = subprocess.Popen(
            [sys.executable, "-m", "fedtwin.cli", "catalog", "serve", "--root",
             str(root / "store"), "--address", "127.0.0.1:0", "--pki", str(root / "pki"),
             "--signing-key", str(public_key_path(root / "signing.pem"))],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        try:
            address = server.stdout.readline().split(" on ")[1].split()[0]

            def stub(name):
                d = root / "pki"
                return connect(
                    Identity(address, d / "ca.pem", d / f"{name}.pem", d / f"{name}.key")
                )

            start = time.time()
            publish(stub("op"), twin, "bench", "1")
            out["publish_s"] = time.time() - start
            out["publish_mb_per_s"] = size / 1e6 / out["publish_s"]
            rss = RssSampler(server.pid)
            out["server_rss_mb_idle"] = rss.now()

            def timed(fn, k):
                with rss, ThreadPoolExecutor(k) as pool:
                    start = time.time()
                    list(pool.map(fn, range(k)))
                    return time.time() - start

            def one_pull(i, tag):
                pull(stub("alice"), "bench", "1", root / tag / str(i))

            def one_copy(i, tag):
                shutil.copytree(twin, root / tag / str(i))

            single_pull = timed(lambda i: one_pull(i, "p1"), 1)
            out["server_rss_mb_peak_1_pull"] = rss.peak
            waves = []  # repeated waves: memory that keeps growing would be a leak
            for wave in range(3):
                seconds = timed(lambda i, w=wave: one_pull(i, f"p{clients}-{w}"), clients)
                waves.append({"s": seconds, "server_rss_mb_peak": rss.peak})
                shutil.rmtree(root / f"p{clients}-{wave}")
            out["concurrent_waves"] = waves
            out["server_rss_mb_peak_concurrent"] = max(w["server_rss_mb_peak"] for w in waves)
            out["server_rss_mb_after"] = rss.now()
            many_pull = min(w["s"] for w in waves)
            single_copy = timed(lambda i: one_copy(i, "c1"), 1)
            copies = []
            for wave in range(3):
                copies.append(timed(lambda i, w=wave: one_copy(i, f"c-{w}"), clients))
                shutil.rmtree(root / f"c-{wave}")
            many_copy = min(copies)
        finally:
            server.terminate()
            server.wait(10)
        out |= {
            "one_pull_s": single_pull,
            "one_pull_mb_per_s": size / 1e6 / single_pull,
            "one_local_copy_mb_per_s": size / 1e6 / single_copy,
            "concurrent_pulls_s": many_pull,  # the fastest of the waves, as for the copies
            "concurrent_pulls_total_mb_per_s": clients * size / 1e6 / many_pull,
            "concurrent_local_copies_total_mb_per_s": clients * size / 1e6 / many_copy,
            "pull_over_copy_throughput_one": single_copy / single_pull,
            "pull_over_copy_throughput_concurrent": many_copy / many_pull,
            "note": "a pull includes TLS, gRPC streaming, writing every file and verifying "
            "every sha256 and the signature; client threads and server share this machine",
        }
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


class RssSampler:
    """Samples a process's resident memory (Linux /proc) every 50 ms inside ``with``."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0.0, None

    def now(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            line = next(x for x in f if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    def __enter__(self):
        import threading

        self.peak, self._stop = self.now(), threading.Event()

        def sample():
            while not self._stop.wait(0.05):
                self.peak = max(self.peak, self.now())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def part_h(cfg: dict, out_dir: Path, overrides: list[str]) -> dict:
    import json
    import shutil

    from fedtwin.data import resolve_data_path
    from fedtwin.localnet import build

    quick = bool(cfg.get("quick"))
    names = ("hospital-0", "hospital-1", "hospital-2")
    fed = cfg["federation"]
    rounds, steps = (2 if quick else 3), int(fed["local_steps"])
    source = resolve_data_path(cfg["data"].get("path"), cfg["data"]["name"])
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
    from fedtwin.client.deploy import load_archive
    from fedtwin.models import build_model
    from fedtwin.privacy import plan_from_config
    from fedtwin.server.server_app import initial_weights
    from fedtwin.training import local_round, set_weights

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
        torch.set_num_threads(int(run_cfg.get("threads_per_hospital", 1)))
        start = time.perf_counter()
        local_round(model, hospital.train.images, hospital.train.labels, plan, steps=steps,
                    batch_size=int(fed["batch_size"]), history=[], seed=0)  # fmt: skip
        times[name] = time.perf_counter() - start
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark.json"))
    parser.add_argument("--parts", default="a,b,c,d,e,f,g,h,i", help="comma-separated subset")
    parser.add_argument("--quick", action="store_true", help="tiny config: a smoke test")
    parser.add_argument("--runs", type=int, default=3, help="independent runs of (a) and (b)")
    parser.add_argument("--eps1-runs", type=int, default=1, help="independent runs of (i)")
    parser.add_argument("--last-round-alone", action="store_true",
                        help="also score the last round alone (slower)")  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every part")
    args = parser.parse_args()

    global LAST_ROUND_ALONE
    LAST_ROUND_ALONE = args.last_round_alone
    overrides = (["+experiment=tiny"] if args.quick else []) + args.overrides
    cfg = {**load_config(SETTING + overrides), "quick": args.quick}
    out_dir = args.out.with_suffix("")
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "quick": args.quick,
        "overrides": overrides,
        "config": cfg,
    }
    parts = {
        "a": ("a_federated", lambda: part_a(out_dir, overrides, args.runs)),
        "b": ("b_central", lambda: part_b(out_dir, overrides, args.runs)),
        "c": ("c_dp_classifier_baseline", lambda: part_c(cfg)),
        "d": ("d_throughput", lambda: part_d(cfg)),
        "e": ("e_audit", lambda: part_e(cfg)),
        "f": ("f_catalog", lambda: part_f(cfg)),
        "g": ("g_ddpm", lambda: part_g(out_dir, overrides, args.quick)),
        "h": ("h_deployment", lambda: part_h(cfg, out_dir, overrides)),
        "i": ("i_epsilon_1", lambda: part_i(out_dir, overrides, args.eps1_runs)),
    }
    for key in args.parts.split(","):
        name, run = parts[key.strip()]
        print(f"[benchmark] part {key}: {name} ...", flush=True)
        start = time.time()
        try:
            result[name] = run()
        except Exception as e:  # one failed part must not lose the others
            result[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        result[name]["part_wall_time_s"] = time.time() - start
        write_json(args.out, result)
        print(f"[benchmark] part {key} done in {time.time() - start:.0f} s", flush=True)

    print(summary_lines(result))
    print(f"written: {args.out}")
    return 0


def demo_line(name: str, r: dict) -> str:
    tstr, trtr, fr = r["tstr"], r["trtr"], r["frechet"]
    twin = r.get("manifold", {}).get("twin", {})
    return (
        f"{name}: TSTR AUC {tstr['auc_mean']:.3f} ACC {tstr['acc_mean']:.3f} | "
        f"TRTR AUC {trtr['auc_mean']:.3f} | Fréchet {fr['twin_vs_val']:.2f} "
        f"(floor {fr['train_vs_val_floor']:.2f}) | precision {twin.get('precision', -1):.2f} "
        f"coverage {twin.get('coverage', -1):.2f} | {r['command_wall_time_s']:.0f} s | "
        f"audit {r['gate']['audit_verdict']}"
    )


def summary_lines(result: dict) -> str:
    lines = []
    for name in ("a_federated", "b_central", "i_epsilon_1"):
        for i, r in enumerate(result.get(name, {}).get("runs", [])):
            lines.append(demo_line(f"{name} run {i + 1}", r))
    for name in ("g_ddpm",):
        r = result.get(name, {})
        if "tstr" in r:
            lines.append(demo_line(name, r))
            alone = r.get("last_round_alone")
            if alone:
                lines.append(
                    f"  twin from the last round alone (round {alone['round']}): TSTR AUC "
                    f"{alone['tstr']['auc_mean']:.3f} | Fréchet {alone['frechet_twin_vs_val']:.2f}"
                )
    c = result.get("c_dp_classifier_baseline", {})
    if "auc_mean" in c:
        lines.append(f"c baseline: AUC {c['auc_mean']:.3f} ACC {c['acc_mean']:.3f}")
    d = result.get("d_throughput", {})
    if "dp_samples_per_s" in d:
        lines.append(
            f"d: DP {d['dp_samples_per_s']:.0f} vs no-DP {d['no_dp_samples_per_s']:.0f} samples/s "
            f"(ratio {d['dp_over_no_dp_throughput']:.2f}), generation "
            f"{d['generation_images_per_s']:.0f} img/s, DICOM {d['dicom_files_per_s']:.0f} files/s"
        )
    e = result.get("e_audit", {})
    for n, row in e.get("by_twin_size", {}).items():
        lines.append(
            f"e: audit of a {n}-image twin: {row['mean_per_hospital_s']:.1f} s per hospital"
        )
    if "real_val_as_twin" in e:
        r = e["real_val_as_twin"]
        lines.append(
            f"e: real val posing as a twin: audit {r['verdict']}, {r['near_copies']} near copies"
        )
    f = result.get("f_catalog", {})
    if "concurrent_pulls_s" in f:
        lines.append(
            f"f: {f['concurrent_pulls']} concurrent pulls of {f['twin_images']} images "
            f"({f['twin_mb']:.0f} MB each): {f['concurrent_pulls_total_mb_per_s']:.1f} MB/s in all "
            f"vs local copies {f['concurrent_local_copies_total_mb_per_s']:.1f} MB/s; server RSS "
            f"{f['server_rss_mb_idle']:.0f} MB idle, peak {f['server_rss_mb_peak_1_pull']:.0f} "
            f"(1 pull) / {f['server_rss_mb_peak_concurrent']:.0f} MB ({f['concurrent_pulls']})"
        )
    g = result.get("g_ddpm", {})
    for name in ("throughput_default", "throughput_run_config"):
        if name in g:
            t = g[name]
            lines.append(
                f"g: ddpm width {t['model']['width']} x{t['model']['noise_multiplicity']} on "
                f"{t['device']}: DP {t['dp_samples_per_s']:.0f} vs no-DP "
                f"{t['no_dp_samples_per_s']:.0f} samples/s, sampling "
                f"{t['generation_images_per_s']:.1f} img/s ({t['model']['sample_steps']} steps)"
            )
    h = result.get("h_deployment", {})
    for mode in ("secagg", "plain"):
        if mode in h:
            r = h[mode]
            lines.append(
                f"h: deployment ({mode}): {r['round_s_mean']:.1f} s per round = "
                f"{r['overhead_vs_serial_compute']:.1f}x the hospitals' compute alone "
                f"({h['local_compute_alone_serial_s']:.1f} s, one after another); "
                f"{r['bytes_per_round_per_hospital'] / 1e6:.2f} MB per round per hospital"
            )
    for name, r in result.items():
        if isinstance(r, dict) and "error" in r:
            lines.append(f"{name}: FAILED {r['error']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
