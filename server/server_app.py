"""Consortium side: a Flower ServerApp that trains the generator federated, then has the
twin audited at the hospitals and signed if it passed (``audited_twin.make_audited_twin``).

``app`` is the one ServerApp that ``pyproject.toml`` names, for ``flwr run`` in simulation
and deployment alike. Its settings come from the Flower run config
(``[tool.flwr.app.config]``, or ``flwr run --run-config``):

    out        the operator's output folder: checkpoints, history.json, twin/, keys/
    overrides  Hydra overrides as on the demo's command line, e.g. "+experiment=tiny"
    <group>.<key>  any setting by its Hydra name, e.g. federation.rounds=20
    progress   where the run appends its progress events (``fedtwin.progress``); only
               ``fedtwin demo`` sets it, for its terminal
"""

from __future__ import annotations

import hashlib
import json
import time
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedtwin.checkpoints import load_checkpoint, recent_global_models, save_checkpoint
from fedtwin.config import check_config, config_from_run
from fedtwin.jsonio import write_json
from fedtwin.models import model_from_config
from fedtwin.privacy import uses_features
from fedtwin.progress import Events, relay_bars
from fedtwin.server import messages
from fedtwin.server.audited_twin import make_audited_twin
from fedtwin.server.secagg import train_secure
from fedtwin.server.strategy import TwinFedAvg
from fedtwin.server.traffic import MeteredGrid
from fedtwin.tensors import get_weights, set_weights


def initial_weights(cfg: dict) -> dict:
    import torch

    torch.manual_seed(int(cfg["seed"]))
    model = model_from_config(cfg)
    return get_weights(model)


def federation_id(cfg: dict, out: Path) -> str:
    """Names this federation to the hospitals, the same across resumed runs: its output
    folder and what shapes its plan (seed, model, rounds, steps, batch size)."""
    fed = cfg["federation"]
    key = {
        "out": str(Path(out).resolve()),
        "seed": cfg["seed"],
        "model": cfg["model"],
        "plan": [fed["rounds"], fed["local_steps"], fed["batch_size"]],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def train_and_audit(
    grid: Grid,
    context: Context,
    cfg: dict,
    out: Path,
    strategy_class: type[TwinFedAvg] = TwinFedAvg,
) -> None:
    """Train for ``federation.rounds``, checkpointing into ``out``, then write the audited
    (and, if it passed, signed) twin to ``out/twin``. The same in simulation and deployment.

    With ``federation.secure_aggregation`` (the default) the server only ever holds the
    sum of the hospitals' updates (``secagg.train_secure``); without it, each hospital's
    update is checked and averaged here (``strategy_class``).

    If ``out`` holds checkpoints (a run that crashed or was stopped), training resumes after
    the last completed round with its weights and round numbers: a hospital asked again
    for a round it had already answered replies from its ledger and pays nothing twice.
    """
    check_config(cfg)
    fed = cfg["federation"]
    events = Events.from_run(context.run_config)  # the demo's terminal; none in deployment
    weights, done, history = initial_weights(cfg), 0, []
    previous = load_checkpoint(out) if fed.get("resume", True) else None
    if previous is not None:
        done, saved, history = previous
        if set(saved) != set(weights) or any(saved[k].shape != weights[k].shape for k in weights):
            raise ValueError(
                f"{out}/checkpoints hold another model's weights; use a new output folder "
                f"or federation.resume=false"
            )
        log(INFO, "resuming after round %d of %d from %s", done, int(fed["rounds"]), out)
        weights = saved
    train_config = {"local-steps": int(fed["local_steps"]), "federation": federation_id(cfg, out)}
    metered = MeteredGrid(grid)  # each round's record keeps its bytes per hospital
    train = train_secure if fed["secure_aggregation"] else train_plain
    kwargs = {} if fed["secure_aggregation"] else {"strategy_class": strategy_class}
    if uses_features(cfg) and previous is None:
        # Round 0: each hospital's one-shot feature release, averaged (under SecAgg+: only
        # the sum is seen) like any round; then the server fits the generator to it.
        release = {**train_config, messages.TASK: messages.RELEASE, "local-steps": 0}
        weights, history = train(metered, context, cfg, out, weights, -1, history, release,
                                 rounds=1, **kwargs)  # fmt: skip
        done = 0
    if history and history[0]["round"] == 0 and "warm_start" not in history[0]:
        weights, history = warm_start(cfg, out, weights, history, events)
    if done < int(fed["rounds"]):
        left = int(fed["rounds"]) - done
        weights, history = train(metered, context, cfg, out, weights, done, history,
                                 train_config, rounds=left, **kwargs)  # fmt: skip
    if not any(r["hospitals"] for r in history):
        refusals = [r for e in history for r in e["refused"]]
        why = f": {refusals[0]['reason']}" if refusals else ""
        raise RuntimeError(f"no hospital trained in any round, no twin to make{why}")
    n = int(cfg["twin"].get("checkpoints", 1))
    events.phase("twin generation and its classifier")  # the hospitals tell their audits
    make_audited_twin(grid, cfg, out, recent_global_models(out, history, n), history)


def warm_start(
    cfg: dict, out: Path, weights: dict, history: list[dict], events: Events | None = None
) -> tuple[dict, list[dict]]:
    """Fit the generator to the pooled feature release of round 0 (post-processing at the
    server), and make that round's checkpoint the fitted model; its steps are counted to
    ``events``."""
    import torch

    events = events or Events(None)
    model = model_from_config(cfg)
    set_weights(model, weights)
    if model.feature_target() is None:
        log(WARNING, "no hospital released feature statistics: no warm start")
        history[0]["warm_start"] = {"skipped": "no release"}
        return weights, history
    started = time.monotonic()
    steps = int(cfg["federation"]["warm_start_steps"])
    log(INFO, "warm start: fitting the generator to the released statistics (%d steps)", steps)
    events.phase("warm start", total=steps, unit="steps")
    rng = torch.Generator().manual_seed(int(cfg["seed"]))
    with relay_bars(events):
        trace = model.warm_start(steps, rng, progress=True)
    weights = get_weights(model)
    seconds = time.monotonic() - started
    history[0]["warm_start"] = {"seconds": seconds, "loss": trace}
    log(INFO, "warm start: the generator fitted to the released statistics in %.0f s "
        "(moment loss %.4f -> %.4f)", seconds, trace[0], trace[-1])  # fmt: skip
    save_checkpoint(out, 0, weights, history)
    return weights, history


def train_plain(
    grid: MeteredGrid,
    context: Context,
    cfg: dict,
    out: Path,
    weights: dict,
    done: int,
    history: list[dict],
    train_config: dict,
    *,
    rounds: int,
    strategy_class: type[TwinFedAvg] = TwinFedAvg,
) -> tuple[dict, list[dict]]:
    """Train ``rounds`` rounds after ``done`` with every update checked and averaged here."""
    fed = cfg["federation"]
    strategy = strategy_class(
        out=out,
        fraction_train=1.0,
        fraction_evaluate=0.0,  # the twin is evaluated after training, not per round
        min_train_nodes=int(fed["min_hospitals"]),
        min_available_nodes=int(fed["hospitals"]),  # round 1 waits for all of them
        max_update_norm=float(fed["max_update_norm"]),
        meter=grid,
    )
    strategy.resume(done, history)
    result = strategy.start(
        grid=grid,
        initial_arrays=messages.to_record(weights),
        num_rounds=rounds,
        train_config=ConfigRecord(train_config),
    )
    return dict(messages.from_record(result.arrays)), strategy.rounds


def make_server_app(
    cfg: dict, out: Path, strategy_class: type[TwinFedAvg] = TwinFedAvg
) -> ServerApp:
    """A ServerApp running ``train_and_audit`` with a resolved config (simulation)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        train_and_audit(grid, context, cfg, out, strategy_class)

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = config_from_run(context.run_config)
    out = Path(str(context.run_config.get("out", "runs/flwr"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", cfg)
    log(INFO, "fedtwin run %s: output in %s", context.run_id, out)
    train_and_audit(grid, context, cfg, out)
