"""Benchmark fedtwin and write the figures to one JSON file.

The runner: parses the command line, runs the parts asked for (the list is in the
package's docstring, benchmarks/__init__.py), writes the JSON after each part ends, and
prints one summary line per figure kept (TSTR, throughput, audit time, catalog MB/s,
deployment overhead) and one per failed part.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import traceback
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.audit import part_e
from benchmarks.baseline import part_c
from benchmarks.canaries import part_l
from benchmarks.canaries import summary_lines as canary_lines
from benchmarks.catalog import part_f
from benchmarks.common import SETTING
from benchmarks.deployment import part_h
from benchmarks.diffusion import part_g
from benchmarks.image_size import part_j
from benchmarks.throughput import part_d
from benchmarks.twin_quality import part_a, part_b, part_i, part_k, part_m
from fedtwin.config import load_config
from fedtwin.jsonio import write_json


def main() -> int:
    parser = argparse.ArgumentParser(prog="benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark.json"))
    parser.add_argument("--parts", help="comma-separated subset (default: a to l, and m "
                        "with --mnist)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny config: a smoke test")
    parser.add_argument("--runs", type=int, default=3, help="independent runs of (a) and (b)")
    parser.add_argument("--eps1-runs", type=int, default=1, help="independent runs of (i)")
    parser.add_argument("--mnist", type=Path,
                        help="part m: MNIST .npz with DPImageBench's split")  # fmt: skip
    parser.add_argument("--last-round-alone", action="store_true",
                        help="also score the last round alone (slower)")  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every part")
    args = parser.parse_args()
    if args.parts is None:
        args.parts = "a,b,c,d,e,f,g,h,i,j,k,l" + (",m" if args.mnist else "")

    common.LAST_ROUND_ALONE = args.last_round_alone  # read by common.run_demo_command
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
        "j": ("j_image_size", lambda: part_j(cfg)),
        "k": ("k_ladder", lambda: part_k(out_dir, overrides, args.runs, cfg)),
        "l": ("l_canaries", lambda: part_l(out_dir, overrides, args.runs)),
        "m": ("m_mnist", lambda: part_m(out_dir, args.mnist, overrides, args.runs)),
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
        f"audit {r['gate']['audit_verdict']}{realism_line(r.get('realism'))}"
    )


def realism_line(realism: dict | None) -> str:
    if not realism:
        return ""
    c2st, ratio = realism["c2st"], realism["spectral_over_floor"]
    return (
        f"\n  realism: two-sample AUC {c2st['auc']:.3f} [{c2st['low']:.3f}, {c2st['high']:.3f}]"
        f" (real vs real {realism['c2st_floor']['auc']:.3f}) | spectral distance "
        f"{realism['spectral_distance']:.3f} = {ratio:.1f}x the real floor"
    )


def hybrid_lines(per_hospital: dict) -> list[str]:
    """One line per hospital: its holdout's AUC with its own images alone, with its own
    images plus the twin, and with the twin alone."""
    lines = []
    for name, row in per_hospital.items():
        figures = " | ".join(
            f"{kind} {row[kind]['auc']:.3f}"
            for kind in ("real_only", "hybrid", "twin")
            if kind in row
        )
        lines.append(f"  {name} ({row['holdout']} holdout images): AUC {figures}")
    return lines


def summary_lines(result: dict) -> str:
    lines = []
    ladder = result.get("k_ladder", {})
    parts = {name: result.get(name, {}) for name in ("a_federated", "b_central", "i_epsilon_1")}
    parts |= {f"k {rung}": ladder[rung] for rung in ("no_dp_central_long", "no_dp_central")
              if rung in ladder}  # fmt: skip
    mnist = result.get("m_mnist", {})
    parts |= {f"m mnist {eps}": mnist[eps] for eps in ("epsilon_10", "epsilon_1") if eps in mnist}
    for name, part in parts.items():
        for i, r in enumerate(part.get("runs", [])):
            lines.append(demo_line(f"{name} run {i + 1}", r))
            lines.extend(hybrid_lines(r.get("per_hospital") or {}))
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
    lines.extend(canary_lines(result.get("l_canaries", {})))
    for name, r in result.items():
        if isinstance(r, dict) and "error" in r:
            lines.append(f"{name}: FAILED {r['error']}")
    return "\n".join(lines)
