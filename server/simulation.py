"""The demo's federation: the repository's one Flower app (``fedtwin.server.server_app:app``,
``fedtwin.client.client_app:app``) started by ``flwr run``, as ``flwr run .`` starts it, on
Flower's Simulation Engine, one simulated SuperNode per hospital.

The SuperLink is the demo's own (127.0.0.1, a free port, files under ``<out>/flower``), and
ends with the demo. The run reads the demo's resolved settings from ``<out>/config.json``.
The terminal shows one line per round, read from ``<out>/history.json``; ``verbose``
streams the run's Flower log (``flwr log --stream``) as well.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger("fedtwin")


def run_federation(cfg: dict, out: Path, verbose: bool = False) -> None:
    """Train, make and audit the twin of ``cfg`` (already written to ``out/config.json``)
    into ``out``. Raises RuntimeError with the run's log if the run did not complete."""
    from fedtwin.localnet import simulation
    from fedtwin.server.app_folder import write_app

    work = Path(out) / "flower"
    work.mkdir(parents=True, exist_ok=True)
    app = write_app(work / "app", out, config=Path(out) / "config.json").parent
    hospitals = int(cfg["federation"]["hospitals"])
    engine = (
        f"num-supernodes={hospitals} client-resources-num-cpus=1 "
        f"init-args-num-cpus={max(1, os.cpu_count() or 1)} init-args-logging-level='error'"
    )
    c = simulation(work)
    try:
        run_id = c.flwr_run(app, out, "--federation-config", engine)
        if verbose:
            c.stream_log(run_id)
        watch = Progress(Path(out), int(cfg["federation"]["rounds"]))
        run = c.wait_run(run_id, math.inf, watch=watch, logs=False)
        if run["status"] != "finished:completed":
            logs = c.run_logs(run_id)
            raise RuntimeError(f"the federation ended {run['status']}:\n{logs[-4000:]}")
    finally:
        c.stop()


class Progress:
    """Called at each poll of a running federation: a line for each round that
    ``history.json`` gained (round, hospitals, epsilon, losses), then one as the twin is
    made."""

    def __init__(self, out: Path, rounds: int):
        self.out, self.rounds, self.shown, self.twin = out, rounds, 0, False

    def __call__(self) -> None:
        from fedtwin.checkpoints import read_history

        try:
            history = read_history(self.out)
        except (OSError, ValueError):  # not written yet, or being replaced
            return
        for entry in history[self.shown :]:
            log.info("%s", round_line(entry, self.rounds))
        self.shown = max(self.shown, len(history))
        if history and history[-1]["round"] >= self.rounds and not self.twin:
            log.info("the twin: generating, auditing at the hospitals, signing if it passes")
            self.twin = True


def round_line(entry: dict, rounds: int) -> str:
    """``round 3/5: 4 hospitals, epsilon <= 6.12, loss_d 1.31 loss_g 0.84``."""
    hospitals = entry["hospitals"]
    what = "feature release" if entry["round"] == 0 else f"round {entry['round']}/{rounds}"
    line = f"{what}: {len(hospitals)} hospital{'s' if len(hospitals) != 1 else ''}"
    epsilons = [float(m["epsilon"]) for m in hospitals.values() if "epsilon" in m]  # "inf": DP off
    if epsilons:
        line += f", epsilon <= {max(epsilons):.2f}"
    for key in ("loss_d", "loss_g", "loss"):
        values = [m[key] for m in hospitals.values() if key in m]
        if values:
            line += f", {key} {sum(values) / len(values):.3f}"
    if entry.get("refused"):
        line += f", {len(entry['refused'])} refused"
    return line
