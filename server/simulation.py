"""The demo's federation on Flower's Simulation Engine: one virtual SuperNode per hospital,
the same ServerApp and ClientApp as a deployment, the hospitals' data held in memory."""

from __future__ import annotations

import os
from pathlib import Path

from fedtwin.data import Hospital


def run_federation(cfg: dict, hospitals: list[Hospital], out: Path) -> None:
    """Train on Flower's Simulation Engine, one virtual SuperNode per hospital."""
    from flwr.simulation import run_simulation

    from fedtwin.client.client_app import make_client_app
    from fedtwin.server.server_app import make_server_app

    def load_hospital(context) -> Hospital:
        return hospitals[int(context.node_config["partition-id"])]

    def ledger_path(context, hospital: Hospital) -> Path:
        return out / "ledgers" / f"{hospital.name}.sqlite"  # each simulated hospital's disk

    cpus = max(1, os.cpu_count() or 1)
    per_hospital = max(1, int(cfg["federation"].get("cpus_per_hospital", 1)))
    cfg = {**cfg, "threads_per_hospital": per_hospital}
    backend = {
        "client_resources": {"num_cpus": per_hospital, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": "error"},
    }
    run_simulation(
        server_app=make_server_app(cfg, out),
        client_app=make_client_app(cfg, load_hospital, ledger_path),
        num_supernodes=len(hospitals),
        backend_config=backend,
    )
