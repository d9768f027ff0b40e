"""Shared fixtures: the PneumoniaMNIST file beside the repository, small real subsets, a small
reader study."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA = SHARED / "pneumoniamnist_28_trainval.npz"
RETINA = SHARED / "retinamnist_28_trainval.npz"  # colour fundus photographs, 5 grades

# The longest test files, longest first, each deployment test (mostly waiting on Flower's
# 3-second polls) beside one that computes. pytest-xdist (--dist loadfile
# --no-loadscope-reorder) hands files to the workers in this order, two to each at first:
# these start at once, and the short files fill in around them instead of one long file
# running alone at the end. One worker per core: more thrash (torch, Flower and Ray all
# compute). Measured on two cores: a third worker slowed the run, and so did a third
# worker that ran the deployment files one after another (22 min against 19; the compute
# tests beside them took two to ten times as long, as every Flower message starts a
# process that imports torch).
LONGEST = (
    "test_deploy_failures.py",
    "test_demo.py",
    "test_resume.py",
    "test_deploy.py",
    "test_flwr_app.py",
    "test_update_checks.py",
    "test_secagg.py",
    "test_ddpm.py",
    "test_privacy.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST)))  # stable: in file order


@pytest.fixture(scope="session")
def data_path() -> Path:
    if not DATA.exists():
        pytest.skip(f"PneumoniaMNIST file not found at {DATA} (the shared data folder)")
    return DATA


@pytest.fixture(scope="session")
def retina_path() -> Path:
    if not RETINA.exists():
        pytest.skip(f"RetinaMNIST file not found at {RETINA} (the shared data folder)")
    return RETINA


@pytest.fixture(scope="session")
def small_real(data_path) -> tuple[np.ndarray, np.ndarray]:
    """The first 300 real training images ``(300, 28, 28)`` uint8 and labels ``(300,)``."""
    d = np.load(data_path)
    return d["train_images"][:300].copy(), d["train_labels"][:300, 0].astype(np.int64)


@pytest.fixture(scope="session")
def make_study():
    """``make_study(path)``: a small reader study of random grey images at ``path`` (8
    images, classes a and b; no dataset needed); returns ``path``."""
    from fedtwin.review.store import Study

    def make(path: Path) -> Path:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (8, 28, 28), dtype=np.uint8)
        labels = np.array([0, 1] * 4)
        Study.create(path, (images, labels), (images[::-1], labels), ["a", "b"], 8, 0, "0" * 64)
        return path

    return make


@pytest.fixture
def federate():
    """``federate(cfg, hospitals, out, server_app=None, **client_kwargs)``: a federation of
    ``hospitals`` on Flower's Simulation Engine, each hospital's ledger in
    ``out/ledgers/<name>.sqlite``; returns the rounds of ``out/history.json``. One Ray
    actor serves the hospitals in turn: the tests already run a file per core."""
    import json

    from flwr.simulation import run_simulation

    from fedtwin.client.client_app import make_client_app
    from fedtwin.server.server_app import make_server_app

    def run(cfg, hospitals, out: Path, server_app=None, **client_kwargs) -> list[dict]:
        run_simulation(
            server_app=server_app or make_server_app(cfg, out),
            client_app=make_client_app(
                cfg,
                lambda ctx: hospitals[int(ctx.node_config["partition-id"])],
                lambda ctx, h: out / "ledgers" / f"{h.name}.sqlite",
                **client_kwargs,
            ),
            num_supernodes=len(hospitals),
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                            "init_args": {"num_cpus": 1, "include_dashboard": False}},
        )  # fmt: skip
        history = out / "history.json"
        return json.loads(history.read_text())["rounds"] if history.exists() else []

    return run


@pytest.fixture
def sent_update():
    """``sent_update(out, name)``: what hospital ``name`` recorded sending in its one
    training round (its ledger's committed reply, as ``federate`` keeps the ledgers), and
    its example count."""
    from fedtwin.ledger import Ledger
    from fedtwin.server import messages

    def read(out: Path, name: str) -> tuple[dict, int]:
        ledger = Ledger(out / "ledgers" / f"{name}.sqlite", delta=1e-5)
        (entry,) = [e for e in ledger.entries() if e.kind == "train"]
        weights, metrics = messages.unpack_reply(ledger.answered("train", entry.request))
        return weights, int(metrics["num-examples"])

    return read
