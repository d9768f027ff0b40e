"""Consortium side: a Flower ServerApp that trains the generator federated, then has the
twin audited at the hospitals and publishes it (``publish.publish_twin``)."""

from __future__ import annotations

from pathlib import Path

from fedtwin.server.publish import publish_twin
from fedtwin.server.strategy import TwinFedAvg
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedtwin import messages
from fedtwin.models import build_model
from fedtwin.training import get_weights


def initial_weights(cfg: dict) -> dict:
    import torch

    torch.manual_seed(int(cfg["seed"]))
    model = build_model(cfg["model"], len(cfg["data"]["classes"]), cfg["data"]["image_size"])
    return get_weights(model)


def train_and_publish(grid: Grid, cfg: dict, out: Path) -> None:
    """Train for ``federation.rounds``, checkpointing into ``out``, then write the audited
    (and, if it passed, signed) twin to ``out/twin``. The same in simulation and deployment."""
    fed = cfg["federation"]
    strategy = TwinFedAvg(
        out=out,
        fraction_train=1.0,
        fraction_evaluate=0.0,  # the twin is evaluated after training, not per round
        min_train_nodes=int(fed["min_hospitals"]),
        min_available_nodes=int(fed["hospitals"]),
        max_update_norm=float(fed["max_update_norm"]),
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=messages.to_record(initial_weights(cfg)),
        num_rounds=int(fed["rounds"]),
        train_config=ConfigRecord({"local-steps": int(fed["local_steps"])}),
    )
    if not any(r["hospitals"] for r in strategy.rounds):
        refusals = [r for e in strategy.rounds for r in e["refused"]]
        why = f": {refusals[0]['reason']}" if refusals else ""
        raise RuntimeError(f"no hospital trained in any round, nothing to publish{why}")
    publish_twin(grid, cfg, out, result.arrays, strategy.rounds)


def make_server_app(cfg: dict, out: Path) -> ServerApp:
    """A ServerApp running ``train_and_publish`` with a resolved config (simulation)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        train_and_publish(grid, cfg, out)

    return app
