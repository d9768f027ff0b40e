"""Training under secure aggregation: Flower's SecAgg+ workflow, so that the server holds
only the weighted sum of the hospitals' updates, never one hospital's.

Each round the hospitals agree keys, train, and send their weights (times their example
count) quantized and masked with pairwise and private masks; the masks cancel only in the
sum (``fedtwin.client.secagg``). A hospital that drops out or refuses after the keys are
agreed is unmasked from the key shares the others hold, as long as at least
``federation.secagg.reconstruction_threshold`` of its neighbours answer.

What the server can check is the sum: its shapes, finite values and distance from the
last global model (``fedtwin.checks``); a sum that fails is not applied and the round
counts as failed. Each hospital checks its own update before masking it. A malicious
hospital could still hide a bad update in the sum within the norm bound: SecAgg+ trades
per-hospital inspection for privacy (docs/deployment.md, "Secure aggregation").

Flower runs SecAgg+ with its legacy strategy interface (FitIns/FitRes); ``SecureFedAvg``
is that strategy, with the same per-round records and checkpoints as ``TwinFedAvg``.
"""

from __future__ import annotations

import json
from logging import WARNING
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.common import (
    FitIns,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from fedtwin.checks import update_problem
from fedtwin.client.secagg import CLIP, MAX_NORM, MAX_WEIGHT, NAMES
from fedtwin.server import messages
from fedtwin.server.strategy import RoundBook, hospital_metrics
from fedtwin.server.traffic import MeteredGrid


class SecureFedAvg(RoundBook, FedAvg):
    """FedAvg for Flower's SecAgg+ workflow: every result it gets carries the already
    unmasked weighted average, with each hospital's own metrics (epsilon, losses)."""

    def __init__(
        self, out: Path, names: list[str], train_config: dict, cfg: dict, meter=None, **kwargs
    ):
        fed = cfg["federation"]
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=max(2, int(fed["min_hospitals"])),  # SecAgg+ needs two
            min_available_clients=int(fed["hospitals"]),  # round 1 waits for all of them
            accept_failures=True,
            **kwargs,
        )
        self.open_book(out, meter)
        self.names = list(names)
        self.max_update_norm = float(fed["max_update_norm"])
        self.config = {
            **train_config,
            NAMES: json.dumps(self.names),  # legacy configs hold scalars only
            MAX_NORM: self.max_update_norm,
            CLIP: float(fed["secagg"]["clipping_range"]),
            MAX_WEIGHT: float(fed["secagg"]["max_examples"]),
        }
        self._sent: dict[str, np.ndarray] = {}
        self._sampled = 0

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager):
        pairs = super().configure_fit(server_round, parameters, client_manager)
        self.start_round()
        # Later rounds go on with whoever is online (at least min_fit_clients).
        self.min_available_clients = self.min_fit_clients
        self._sent = dict(zip(self.names, parameters_to_ndarrays(parameters), strict=True))
        self._sampled = len(pairs)
        config = {**self.config, "server-round": server_round + self.offset}
        return [(proxy, FitIns(ins.parameters, dict(config))) for proxy, ins in pairs]

    def aggregate_fit(self, server_round: int, results, failures):
        server_round += self.offset
        refused = [{"node": None, "reason": reason} for reason in _reasons(failures)]
        hospitals = {
            str(res.metrics["hospital"]): hospital_metrics(json.loads(res.metrics["round-metrics"]))
            for _, res in results
        }
        entry = {"round": server_round, "hospitals": hospitals, "refused": refused}
        entry["rejected"] = []
        dropped = self._sampled - len(results)
        entry["secure_aggregation"] = {"summed": len(results), "dropped": dropped}
        if not results:
            self.record(entry, None)
            return None, {}
        # The workflow gives every result the same unmasked average: only that is known.
        average = parameters_to_ndarrays(results[0][1].parameters)
        pairs = zip(self.names, average, strict=False)  # a missing array is a problem below
        weights = {n: a.astype(self._sent[n].dtype) for n, a in pairs}
        problem = update_problem(weights, self._sent, self.max_update_norm)
        if problem:
            log(WARNING, "round %d: the sum of %d hospitals is rejected: %s",
                server_round, len(results), problem)  # fmt: skip
            entry["rejected"] = [{"node": None, "hospital": "(the sum)", "reason": problem}]
            entry["hospitals"] = {}
            self.record(entry, None)
            return None, {}
        self.record(entry, messages.to_record(weights))
        return ndarrays_to_parameters([weights[n] for n in self.names]), {}


class SecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, forgetting hospitals that left before sharing their keys.

    In flwr 1.42 the unmask step asks the remaining hospitals for key shares of every
    hospital sampled in the round, including one that dropped out before it shared any;
    they have none, every one of them fails, and the round is lost to a single early
    dropout. A hospital that shared no keys put no mask on anyone's vector, so there is
    nothing to unmask for it: after the key sharing, the round's hospitals are those that
    took part in it, and their neighbours only those among them.
    """

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state) -> bool:
        ok = super().share_keys_stage(grid, context, state)
        shared = set(state.active_node_ids)
        state.sampled_node_ids = shared
        state.nid_to_neighbours = {
            nid: neighbours & shared
            for nid, neighbours in state.nid_to_neighbours.items()
            if nid in shared
        }
        return ok


def _reasons(failures) -> list[str]:
    """The hospitals' error reasons; the workflow lists one error reply more than once."""
    errors = {}
    for failure in failures:
        error = failure.args[0] if isinstance(failure, BaseException) and failure.args else failure
        errors[id(error)] = str(getattr(error, "reason", error))
    return list(errors.values())


def train_secure(
    grid: MeteredGrid,
    context: Context,
    cfg: dict,
    out: Path,
    weights: dict[str, np.ndarray],
    done: int,
    history: list[dict],
    train_config: dict,
    *,
    rounds: int,
) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Train ``rounds`` rounds after ``done`` under SecAgg+; the final weights and all
    rounds."""
    fed = cfg["federation"]
    secagg = fed["secagg"]
    names = list(weights)
    strategy = SecureFedAvg(
        out, names, train_config, cfg, meter=grid,
        initial_parameters=ndarrays_to_parameters([weights[n] for n in names]),
    )  # fmt: skip
    strategy.resume(done, history)
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
    workflow = SecAggPlus(
        num_shares=1.0,  # every hospital holds a share of every other's keys
        reconstruction_threshold=float(secagg["reconstruction_threshold"]),
        max_weight=float(secagg["max_examples"]),
        clipping_range=float(secagg["clipping_range"]),
        timeout=float(secagg["timeout_s"]) if secagg.get("timeout_s") else None,
    )

    def fit(grid: Grid, ctx: LegacyContext) -> None:
        before = len(strategy.rounds)
        workflow(grid, ctx)
        if len(strategy.rounds) == before:  # halted before the sum: too few answered
            current = int(ctx.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
            entry = {"round": current + done, "hospitals": {}, "refused": [], "rejected": []}
            entry["halted"] = "secure aggregation halted: too few hospitals answered"
            strategy.record(entry, None)

    DefaultWorkflow(fit_workflow=fit)(grid, legacy)
    final = compat.arrayrecord_to_parameters(
        legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
    )
    return dict(zip(names, parameters_to_ndarrays(final), strict=True)), strategy.rounds
