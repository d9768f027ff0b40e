"""Shared fixtures: the PneumoniaMNIST file beside the repository, small real subsets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA = SHARED / "pneumoniamnist_28_trainval.npz"
RETINA = SHARED / "retinamnist_28_trainval.npz"  # colour fundus photographs, 5 grades

# The deployment tests (real Flower processes) mostly wait: on Flower's 3-second polls, on a
# fresh ClientApp process per message, on a dead node's heartbeat. So they run one after
# another as one work unit (``pytest_xdist_make_scheduler`` below) on a pytest-xdist worker
# more than there are cores (``pytest_xdist_auto_num_workers``), while the other files keep
# the cores busy, a file per worker (``--dist loadfile``: module fixtures stay on one
# worker). Units are handed out in the order below, longest first (``--no-loadscope-reorder``:
# xdist would otherwise sort them by number of tests), and the short files fill in around.
DEPLOYMENT = (
    "test_deploy_node_failure.py",
    "test_deploy_operator_crash.py",
    "test_deploy.py",
)
LONGEST = (
    *DEPLOYMENT,
    "test_demo.py",
    "test_resume.py",
    "test_flwr_app.py",
    "test_update_checks.py",
    "test_secagg.py",
    "test_ddpm.py",
    "test_privacy.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST)))  # stable: in file order


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    return (os.cpu_count() or 1) + 1  # the cores, and one for the waiting deployment tests


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadfile`` with the deployment files as one unit; other modes as xdist's."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class DeploymentTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = super()._split_scope(nodeid)
            return "deployment" if Path(file).name in DEPLOYMENT else file

    return DeploymentTogether(config, log)


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
