"""End to end: the tiny `fedtwin demo` on Flower's Simulation Engine (real Ray actors)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from opacus.accountants import RDPAccountant

from fedtwin.config import load_config
from fedtwin.demo import load_real_data, simulate_hospitals
from fedtwin.ledger import Ledger
from fedtwin.privacy import plan_privacy
from fedtwin.twin import sha256_file

pytestmark = pytest.mark.slow


# The GAN and the diffusion generator go through the same federation, audit and report:
# the GAN on grey chest X-rays (2 classes), the diffusion model on RetinaMNIST by name
# (colour fundus photographs, 5 grades).
MODELS = {
    "dcgan": ["model=dcgan"],
    "ddpm": ["model=ddpm", "model.sample_steps=10", "model.width=16", "model.noise_multiplicity=2"],
}
DATASETS = {"dcgan": "data_path", "ddpm": "retina_path"}  # the fixture giving its file
RARE = ["+twin.class_weights.grade_4=3.0"]


def overrides(request, model: str) -> list[str]:
    """The demo's settings for ``model``: its dataset by name, then the model's."""
    path = request.getfixturevalue(DATASETS[model])
    # RetinaMNIST's rarest grade over-sampled in its twin (twin.class_weights)
    name = [] if DATASETS[model] == "data_path" else ["data=retinamnist", *RARE]
    return ["+experiment=tiny", *name, f"data.path={path}", *MODELS[model]]


@pytest.fixture(scope="module", params=list(MODELS))
def demo_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"demo-{request.param}")
    cmd = [sys.executable, "-m", "fedtwin.cli", "demo", "--out", str(out)]
    cmd += overrides(request, request.param)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_demo_leaves_twin_and_report(demo_run):
    out, proc = demo_run
    twin = out / "twin"
    manifest = json.loads((twin / "manifest.json").read_text())
    npz = np.load(twin / "images.npz")
    cfg = json.loads((out / "config.json").read_text())["data"]
    colour = (3,) if cfg["channels"] == 3 else ()
    assert npz["train_images"].shape == (200, 28, 28, *colour)
    assert npz["train_labels"].shape == (200, 1)
    assert set(np.unique(npz["train_labels"])) <= set(range(len(cfg["classes"])))
    files = sorted((twin / "dicom").glob("*.dcm"))
    assert len(files) == 200
    ds = pydicom.dcmread(files[7])  # the pixels read back as written, RGB in colour
    assert ds.PhotometricInterpretation == ("RGB" if colour else "MONOCHROME2")
    assert np.array_equal(ds.pixel_array, npz["train_images"][7])
    over = {"grade_4": 3.0} if colour else {}
    assert manifest["label_mix"] == {"mode": "federation", "over_sampled": over}
    for rel, digest in manifest["files"].items():
        assert sha256_file(twin / rel) == digest, rel
    assert manifest["rounds_completed"] == 2
    assert manifest["generator_rounds"] == [1, 2]  # twin.checkpoints=5, only 2 rounds ran
    assert manifest["config"]["model"]["name"] in out.name  # the generator asked for
    assert manifest["audit"]["near_copies"] == 0
    assert "canaries" not in manifest["audit"]  # a production twin trains on none
    gate = manifest["gate"]
    # A tiny run's images are textures far from every real image (5 warm-start steps, six
    # DP steps): which real image is nearest is then decided by a few "hub" images, and the
    # closer-to-train share is one correlated coin flip (docs/audit.md) that sits at
    # the 0.6 threshold. What must hold either way: signed if and only if it passed.
    assert gate["signed"] == (gate["audit_verdict"] == "pass") and gate["override"] is None
    assert manifest["audit"]["verdict"] == gate["audit_verdict"]
    assert 0.0 <= manifest["federated_utility"]["auc"] <= 1.0
    sizes = manifest["audit"]["sample_sizes"]  # the audit set duplicates aside, utility not
    removed = sizes["holdout_in_train_removed"] + sizes["holdout_duplicates_removed"]
    assert manifest["federated_utility"]["n"] == sizes["holdout"] + removed
    verify = [sys.executable, "-m", "fedtwin.cli", "verify", str(twin)]
    if gate["signed"]:
        verify += ["--public-key", str(out / "keys" / "consortium-signing.pem.pub")]
    checked = subprocess.run(verify, capture_output=True, text=True, timeout=120)
    if gate["signed"]:
        assert checked.returncode == 0, checked.stdout + checked.stderr
    else:  # no key was made: nothing was signed
        assert checked.returncode == 1 and "not signed" in checked.stderr, checked.stderr
    html = (out / "report.html").read_text()
    assert "hospital-0" in html and "TSTR" in html and "Privacy audit" in html
    assert "global generators of rounds 1, 2, an equal share each" in html
    assert ("<b>over-sampled</b>: grade_4 ×3" in html) == bool(colour)
    assert "TSTR AUC" in proc.stdout
    # the realism test, the spectra and the quality gate: in the summary, report, terminal
    summary = json.loads((out / "summary.json").read_text())
    realism = summary["evaluation"]["realism"]
    test = realism["two_sample"]["twin_vs_real"]
    assert test["low"] <= test["auc"] <= test["high"] and test["n_positive"] == 100
    assert len(realism["two_sample"]["most_real"]) == 16
    assert len(realism["spectrum"]["log10_power"]["twin"]) == 14  # rings 1 .. 28 / 2
    assert "Realism" in html and "radial power spectra" in html and "most real" in html
    assert "What these cannot see" in html
    assert "realism: a CNN tells twin from real val images with AUC" in proc.stdout
    checks = summary["quality"]["checks"]
    assert set(checks) == {"class_signal", "realism"}
    assert checks["class_signal"]["measured"] == summary["evaluation"]["tstr"]["auc_mean"]
    for warning in summary["quality"]["warnings"]:  # a tiny twin fails realism, say so
        assert f"WARNING: {warning}" in proc.stdout and html.count('class="warn"') >= 1
    assert (
        manifest["quality"]["checks"]["class_signal"]["measured"]
        == (manifest["federated_utility"]["auc"])
    )
    # the two-sample test at each hospital, pooled by the server, gated in the manifest
    sites = manifest["federated_utility"]["two_sample"]
    assert sites["hospitals"] == 2 and sites["skipped"] == {} and 0.0 <= sites["auc"] <= 1.0
    # each scores as many unseen twin images as holdout ones, at most half the 200-image twin
    assert sites["n_twin"] == sites["n_real"] <= 2 * 100
    assert set(manifest["quality"]["checks"]) == {"class_signal", "realism"}
    assert manifest["quality"]["checks"]["realism"]["measured"] == sites["auc"]
    assert "At the hospitals" in html
    # TSTR's seed 0 is the server's twin classifier, scored on val rather than trained again
    assert [r["reused"] for r in summary["evaluation"]["tstr"]["per_seed"]] == [True]
    assert [r["reused"] for r in summary["evaluation"]["trtr"]["per_seed"]] == [False]


def test_reported_epsilon_equals_independent_accountant(demo_run, request):
    """Each hospital's epsilon = a fresh Opacus accountant over the steps it took; <= target."""
    out, _ = demo_run
    model = "dcgan" if "dcgan" in out.name else "ddpm"
    cfg = load_config(overrides(request, model))
    features = bool(cfg["model"].get("features"))  # the DCGAN's hospitals release them
    assert json.loads((out / "config.json").read_text())["privacy"] == cfg["privacy"]
    hospitals = simulate_hospitals(cfg, load_real_data(cfg)[0])
    history = json.loads((out / "history.json").read_text())["rounds"]
    fed, priv = cfg["federation"], cfg["privacy"]
    for h in hospitals:
        steps = sum(r["hospitals"][h.name]["steps"] for r in history if h.name in r["hospitals"])
        assert steps == fed["rounds"] * fed["local_steps"]
        # the feature release's noise, as the hospital recorded it in its ledger
        ledger = Ledger.existing(out / "ledgers" / f"{h.name}.sqlite")
        feature_noise = [e.noise_multiplier for e in ledger.entries() if e.kind == "features"]
        assert len(feature_noise) == int(features)
        plan = plan_privacy(
            enabled=True,
            epsilon=priv["epsilon"],
            delta=priv["delta"],
            max_grad_norm=priv["max_grad_norm"],
            accountant=priv["accountant"],
            n_train=len(h.train),
            batch_size=fed["batch_size"],
            total_steps=steps,
            label_noise=priv["label_noise"],
            feature_noise=feature_noise[0] if features else 0.0,
        )
        accountant = RDPAccountant()
        # the class-count release and the feature-sum release (once each), then every
        # DP-SGD step
        accountant.step(noise_multiplier=priv["label_noise"], sample_rate=1.0)
        if features:
            accountant.step(noise_multiplier=feature_noise[0], sample_rate=1.0)
        for _ in range(steps):
            accountant.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
        independent = accountant.get_epsilon(delta=priv["delta"])
        reported = history[-1]["hospitals"][h.name]["epsilon"]
        assert reported == pytest.approx(independent, rel=1e-9)
        assert reported <= priv["epsilon"]
        manifest = json.loads((out / "twin" / "manifest.json").read_text())
        assert manifest["privacy"]["epsilon_per_hospital"][h.name] == pytest.approx(reported)
        # the hospital's ledger holds exactly that: the two releases, one entry per round
        kinds = ["labels"] + ["features"] * features + ["train"] * fed["rounds"]
        assert [e.kind for e in ledger.entries()] == kinds
        assert ledger.epsilon() == pytest.approx(independent, rel=1e-9)


def test_dp_off_is_labelled_infinite_and_canaries_leave_only_counts(tmp_path, data_path, capsys):
    """Run as a user runs it, through the command line, to its last terminal line."""
    from fedtwin.canaries import make_canaries
    from fedtwin.cli import main

    overrides = [
        "+experiment=tiny",
        f"data.path={data_path}",
        "privacy.enabled=false",
        "federation.rounds=1",
        "twin.size=40",
        "twin.dicom=false",
        "model.features=null",  # the labels need training rounds only
        "eval.hybrid=false",
        "audit.canaries=10",
    ]
    cfg = load_config(overrides)
    assert main(["demo", "--out", str(tmp_path), *overrides]) == 0
    said = capsys.readouterr().out
    assert "epsilon per hospital (delta 1e-05): hospital-0 inf, hospital-1 inf" in said
    assert re.search(r"empirical epsilon >= \d+\.\d\d .* against accounted inf", said)
    manifest = json.loads((tmp_path / "twin" / "manifest.json").read_text())
    assert set(manifest["privacy"]["epsilon_per_hospital"].values()) == {"inf"}
    html = (tmp_path / "report.html").read_text()
    assert "DP off" in html
    # the canaries: counts and the bound in audit.json, the manifest and the report; no
    # canary image among the twin's files, no coin anywhere
    canaries = manifest["audit"]["canaries"]
    assert canaries == json.loads((tmp_path / "twin" / "audit.json").read_text())["canaries"]
    assert (canaries["canaries"], canaries["guessed"]) == (20, 4)  # 2 hospitals x 10, 20 %
    assert 0 <= canaries["correct"] <= 4 and canaries["epsilon_accounted"] == "inf"
    assert all(isinstance(v, (int, float)) for k, v in canaries.items() if k != "epsilon_accounted")
    assert "Canaries" in html and "never a guarantee" in html
    twin = np.load(tmp_path / "twin" / "images.npz")["train_images"]
    for hospital in ("hospital-0", "hospital-1"):
        planted = make_canaries(10, (28, 28), 2, cfg["seed"], hospital).images
        assert not {c.tobytes() for c in planted} & {t.tobytes() for t in twin}


def test_one_hospital_with_secure_aggregation_is_refused_before_anything_starts(tmp_path):
    """SecAgg+ needs two hospitals: one would wait forever for a second."""
    from fedtwin.config import check_federation
    from fedtwin.demo import run_demo

    cfg = load_config(["+experiment=tiny", "federation.hospitals=1"])
    with pytest.raises(ValueError, match="federation.secure_aggregation=false for one hospital"):
        run_demo(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    check_federation(load_config(["federation.hospitals=1", "federation.secure_aggregation=false"]))


def test_hybrid_and_per_hospital_figures_match_a_central_computation(demo_run):
    """Each simulated hospital's own classifiers (its images alone, and the twin's
    classifier fine-tuned on them with twin images), trained again here on the same data
    with the same seed and scored on its holdout, give
    the figures the hospitals sent as histograms: the same accuracy, and the same AUC from
    the same binned log-odds (the binned AUC itself can be off the exact one when a
    hospital's holdout has a handful of one class and the scores tie; that is the
    federated utility's own approximation, not the transport's)."""
    import torch

    from fedtwin.metrics import (
        TWIN_CLASSIFIER,
        Classifier,
        channels_of,
        classifier_from_config,
        hybrid_classifier,
        predict_log_odds,
    )
    from fedtwin.utility import pool_utility, site_utility

    out, _ = demo_run
    summary = json.loads((out / "summary.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    train, _, _ = load_real_data(cfg)
    with np.load(out / "twin" / "images.npz") as npz:
        twin = npz["train_images"], npz["train_labels"][:, 0].astype(np.int64)
    ev, threads = cfg["eval"], torch.get_num_threads()
    n_classes = len(cfg["data"]["classes"])
    assert ev["seeds"] == [0]
    # the twin's classifier, as the hospitals received it
    start = Classifier(n_classes, channels_of(twin[0]))
    start.load_state_dict(torch.load(out / TWIN_CLASSIFIER, weights_only=True)["state"])
    torch.set_num_threads(1)  # as at the hospitals
    try:
        for h in simulate_hospitals(cfg, train):
            mine = summary["per_hospital"][h.name]
            assert mine["holdout"] == len(h.holdout)
            counts = np.bincount(h.holdout.labels, minlength=n_classes)
            assert mine["label_mix"] == {str(c): int(n) for c, n in enumerate(counts)}
            own = (h.train.images, h.train.labels)
            models = {
                "real_only": classifier_from_config(*own, n_classes, ev, seed=0),
                "hybrid": hybrid_classifier(start, own, twin, n_classes, ev, seed=0),
            }
            for kind, model in models.items():
                scored = site_utility(model, h.holdout.images, h.holdout.labels)
                expected = pool_utility({h.name: scored})
                assert mine[kind]["acc"] == pytest.approx(expected["acc"], abs=1e-9), (h.name, kind)
                assert mine[kind]["auc"] == pytest.approx(expected["auc"], abs=1e-9), (h.name, kind)
                predicted = predict_log_odds(model, h.holdout.images).argmax(1)
                for c, n in enumerate(counts):  # each class's share classified right
                    got = mine[kind]["per_class_acc"][str(c)]
                    if n == 0:  # a class this hospital's holdout lacks: no figure
                        assert got == "nan", (h.name, kind, c, got)  # as fedtwin.jsonio writes it
                        continue
                    right = int(np.sum(predicted[h.holdout.labels == c] == c))
                    assert got == pytest.approx(right / n)
    finally:
        torch.set_num_threads(threads)
    pooled = summary["hybrid"]
    assert set(pooled) == {"twin", "hybrid", "real_only"}
    assert pooled["twin"]["n"] == sum(m["holdout"] for m in summary["per_hospital"].values())


# What the terminal names, in order, as a tiny run goes (fedtwin.progress): the feature
# release and the warm start only where the model releases features (the GAN).
PHASES = [
    "data",
    "flower start",
    "feature release",
    "warm start",
    "rounds",
    "twin generation and its classifier",
    "audit and utility at the hospitals",
    "flower stop",
    "TSTR and TRTR",
    "Fréchet distance and coverage",
    "realism two-sample test",
    "report",
]


def test_the_terminal_names_every_phase_in_order_and_the_summary_times_them(demo_run):
    out, proc = demo_run
    lines = proc.stderr.replace("\r", "\n")  # tqdm's bars redraw with \r
    done = re.findall(r"^\[[\d:]+\] (.+) done in \d+ s$", lines, re.MULTILINE)
    summary = json.loads((out / "summary.json").read_text())
    expected = [p for p in PHASES if p in summary["phases"]]
    assert done == expected == list(summary["phases"])
    assert set(PHASES) - set(expected) <= {"feature release", "warm start"}
    assert all(seconds >= 0 for seconds in summary["phases"].values())
    assert "<h2>Time</h2>" in (out / "report.html").read_text()
    assert "INFO" not in proc.stderr  # Flower's own log stays out without --verbose


def test_a_stopped_demo_leaves_no_process_behind(tmp_path, data_path):
    """SIGTERM once the federation runs (its first phase after Flower's start): the demo
    ends, and so does every process it started (SuperLink, SuperExec, the simulation,
    Ray's), found from /proc while it ran and by the output folder in their command lines."""
    import queue
    import signal
    import threading
    import time

    from fedtwin.localnet import _alive, descendants

    cmd = [sys.executable, "-m", "fedtwin.cli", "demo", "--out", str(tmp_path),
           "+experiment=tiny", f"data.path={data_path}"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    started, seen, deadline = set(), [], time.monotonic() + 300
    try:
        while not any("flower start done" in line for line in seen):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)
            started |= set(descendants(proc.pid))
            try:
                seen.append(lines.get(timeout=0.5))
            except queue.Empty:
                pass
        started |= set(descendants(proc.pid))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(started) >= 3  # the SuperLink, its simulation process, Ray's
    wait_until = time.monotonic() + 30
    while (left := [p for p in started if _alive(p)]) and time.monotonic() < wait_until:
        time.sleep(0.5)
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes() for p in left if _alive(p)]
    assert not [pid for pid in _pids_naming(str(tmp_path)) if _alive(pid)]


def _pids_naming(text: str) -> list[int]:
    """The processes whose command line holds ``text``."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids
