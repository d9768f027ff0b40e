"""FedAvg over the whole generator (generator and discriminator), weighted by examples.

On top of Flower's FedAvg this keeps what a consortium needs from every round: each
hospital's epsilon and losses, and a checkpoint of the global model on disk, written
before the next round starts so a crash never loses a completed round.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtwin.checkpoints import save_checkpoint
from fedtwin.checks import update_problem
from fedtwin.server import messages


def aggregate_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """One line per round across hospitals: the largest epsilon (an average of epsilons
    means nothing; -1 if DP is off anywhere) and example-weighted mean losses."""
    metrics = [r[messages.METRICS] for r in records]
    eps = [float(m["epsilon"]) for m in metrics]
    out = {"epsilon-max": -1.0 if min(eps) < 0 else max(eps)}
    for key in ("loss_d", "loss_g", "loss"):
        pairs = [(float(m[key]), float(m[weighting_key])) for m in metrics if key in m]
        weight = sum(w for _, w in pairs)
        if weight > 0:
            out[key] = sum(v * w for v, w in pairs) / weight
    return MetricRecord(out)


class RoundBook:
    """What both strategies (``TwinFedAvg`` here, ``secagg.SecureFedAvg``) keep across
    rounds: the round records, the offset of a resumed run, and for each round its wall
    time, its bytes per node (with a ``traffic.MeteredGrid``) and a checkpoint."""

    def open_book(self, out: Path, meter=None) -> None:
        self.out, self.meter = Path(out), meter
        self.rounds: list[dict] = []
        self.offset = 0  # rounds completed before this run (resumed from a checkpoint)
        self._started = time.monotonic()

    def resume(self, completed: int, rounds: list[dict]) -> None:
        """Continue after ``completed`` rounds (their records ``rounds``): this run's round
        1 is the federation's round ``completed + 1``, and the hospitals see that number."""
        self.offset, self.rounds = completed, list(rounds)

    def start_round(self) -> None:
        self._started = time.monotonic()
        if self.meter is not None:
            self.meter.take()  # what came before this round is not its traffic

    def record(self, entry: dict, arrays: ArrayRecord | None) -> None:
        """Log a finished round and keep it; if it made a new global model, checkpoint both
        (a round without one is repeated after a restart)."""
        entry["seconds"] = time.monotonic() - self._started
        if self.meter is not None:
            entry["traffic"] = self.meter.take()
        self.rounds.append(entry)
        log(INFO, "round %d: %s", entry["round"], describe_round(entry))
        if arrays is not None:
            weights = messages.from_record(arrays)
            save_checkpoint(self.out, entry["round"], weights, self.rounds)


class TwinFedAvg(RoundBook, FedAvg):
    """FedAvg that checks every update before averaging (``fedtwin.checks``), logs
    per-hospital metrics and checkpoints every round into ``out``."""

    def __init__(self, out: Path, max_update_norm: float = float("inf"), meter=None, **kwargs):
        kwargs.setdefault("train_metrics_aggr_fn", aggregate_metrics)
        super().__init__(**kwargs)
        self.open_book(out, meter)
        self.max_update_norm = float(max_update_norm)
        self._sent: dict[str, np.ndarray] = {}  # the global model of the current round

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = messages.from_record(arrays)
        self.start_round()
        replies = super().configure_train(server_round + self.offset, arrays, config, grid)
        # Later rounds go on with whoever is online (at least min_train_nodes).
        self.min_available_nodes = self.min_train_nodes
        return replies

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.offset
        hospitals, refused, rejected, good = {}, [], [], []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                refused.append({"node": node, "reason": msg.error.reason})
                continue
            name = str(msg.content[messages.HOSPITAL]["name"])
            update = messages.from_record(msg.content[messages.ARRAYS])
            problem = update_problem(update, self._sent, self.max_update_norm)
            if problem:
                log(WARNING, "round %d: update of %s (node %d) rejected: %s",
                    server_round, name, node, problem)  # fmt: skip
                rejected.append({"node": node, "hospital": name, "reason": problem})
                continue
            hospitals[name] = hospital_metrics(msg.content[messages.METRICS])
            good.append(msg)
        arrays, metrics = super().aggregate_train(server_round, good)
        entry = {"round": server_round, "hospitals": hospitals, "refused": refused}
        entry["rejected"] = rejected
        if metrics is not None:
            entry["mean"] = {k: v for k, v in metrics.items() if k != "epsilon"}
        self.record(entry, arrays)
        return arrays, metrics


def hospital_metrics(metrics) -> dict:
    """A hospital's round metrics as the history keeps them (epsilon inf when DP is off)."""
    m = dict(metrics)
    m["epsilon"] = messages.epsilon_from_metric(float(m["epsilon"]))
    return m


def describe_round(entry: dict) -> str:
    parts = []
    for name, m in entry["hospitals"].items():
        eps = "inf (DP off)" if m["epsilon"] == float("inf") else f"{m['epsilon']:.2f}"
        if entry["round"] == 0:  # the feature release trains nothing
            parts.append(f"{name} eps {eps} released its feature sums")
            continue
        losses = " ".join(f"{k} {v:.3f}" for k, v in m.items() if k.startswith("loss"))
        parts.append(f"{name} eps {eps} {losses}".rstrip())
    parts += [
        f"node {r['node']} refused: {r['reason']}" if r.get("node") else f"refused: {r['reason']}"
        for r in entry["refused"]
    ]
    parts += [
        f"{r['hospital']} (node {r['node']}) rejected: {r['reason']}"
        for r in entry.get("rejected", [])
    ]
    if entry.get("halted"):
        parts.append(entry["halted"])
    return "; ".join(parts) or "no hospital answered"
