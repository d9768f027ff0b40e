"""The demo's federation: the repository's one Flower app (``fedtwin.server.server_app:app``,
``fedtwin.client.client_app:app``) started by ``flwr run``, as ``flwr run .`` starts it, on
Flower's Simulation Engine, one simulated SuperNode per hospital.

The SuperLink is the demo's own (127.0.0.1, a free port, files under ``<out>/flower``), and
ends with the demo. The run reads the demo's resolved settings from ``<out>/config.json``.
The ServerApp and the hospitals write their progress events to ``<out>/progress.jsonl``
(``fedtwin.progress``); the terminal shows them as phases (Flower's start, the feature
release, the warm start, each round with the hospitals done, the twin's generation, its
audit at the hospitals, Flower's stop), with one line per round read from
``<out>/history.json``. ``verbose`` streams the run's Flower log (``flwr log --stream``)
as well.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from fedtwin.progress import EVENTS_FILE, Terminal, read_events


def run_federation(cfg: dict, out: Path, terminal: Terminal, verbose: bool = False) -> None:
    """Train, make and audit the twin of ``cfg`` (already written to ``out/config.json``)
    into ``out``, its phases shown on ``terminal``. Raises RuntimeError with the run's log
    if the run did not complete."""
    from fedtwin.localnet import simulation
    from fedtwin.server.app_folder import write_app

    out = Path(out)
    work = out / "flower"
    work.mkdir(parents=True, exist_ok=True)
    events = out / EVENTS_FILE
    events.unlink(missing_ok=True)  # a run resumed in the same folder starts it afresh
    app = write_app(work / "app", out, config=out / "config.json", progress=events).parent
    hospitals = int(cfg["federation"]["hospitals"])
    engine = (
        f"num-supernodes={hospitals} client-resources-num-cpus=1 "
        f"init-args-num-cpus={max(1, os.cpu_count() or 1)} init-args-logging-level='error'"
    )
    terminal.phase("flower start")
    c = simulation(work)
    try:
        run_id = c.flwr_run(app, out, "--federation-config", engine)
        if verbose:
            c.stream_log(run_id)
        watch = Progress(out, cfg, terminal)
        run = c.wait_run(run_id, math.inf, watch=watch, logs=False)
        if run["status"] != "finished:completed":
            logs = c.run_logs(run_id)
            raise RuntimeError(f"the federation ended {run['status']}:\n{logs[-4000:]}")
        terminal.phase("flower stop")
    finally:
        c.stop()


class Progress:
    """Called at each poll of a running federation: the phases its progress events tell
    (to ``terminal``), a line for each round that ``history.json`` gained (round,
    hospitals, epsilon, losses), and Flower's stop once the twin is written."""

    def __init__(self, out: Path, cfg: dict, terminal: Terminal):
        fed = cfg["federation"]
        self.out, self.terminal, self.offset, self.shown = Path(out), terminal, 0, 0
        self.rounds, self.steps = int(fed["rounds"]), int(fed["local_steps"])
        self.hospitals, self.task, self.finished = int(fed["hospitals"]), "", set()

    def __call__(self) -> None:
        self.show_rounds()  # first: a round's line before the phase that follows it
        events, self.offset = read_events(self.out / EVENTS_FILE, self.offset)
        for event in events:
            self.take(event)
        if (self.out / "twin" / "manifest.json").is_file() and self.terminal.name != "flower stop":
            self.terminal.phase("flower stop")  # the run ends: Flower and Ray shut down

    def take(self, event: dict) -> None:
        if "phase" in event:
            self.task = ""
            self.terminal.phase(
                event["phase"], total=event.get("total"), unit=event.get("unit", ""), at=event["t"]
            )
        elif "done" in event:
            self.terminal.count(int(event["done"]))
        elif "hospital" in event:
            self.hospital(event)

    def hospital(self, event: dict) -> None:
        """A hospital started or finished a task: the phase it belongs to, its count."""
        task = str(event["task"])
        if task != self.task:
            self.task, self.finished = task, set()
            name, item = self.phase_of(task)
            unit = "hospitals done"
            self.terminal.phase(name, item=item, total=self.hospitals, unit=unit, at=event["t"])
        if event["finished"]:
            self.finished.add(event["hospital"])
            self.terminal.count(len(self.finished))

    def phase_of(self, task: str) -> tuple[str, str]:
        """A hospital's task -> the phase and its item: "round 2" -> ("rounds", "round 2/5,
        35 local steps at each hospital")."""
        if task == "audit":
            return "audit and utility at the hospitals", ""
        if task.startswith("round "):
            item = f"{task}/{self.rounds}, {self.steps} local steps at each hospital"
            return "rounds", item
        return task, ""

    def show_rounds(self) -> None:
        from fedtwin.checkpoints import read_history

        try:
            history = read_history(self.out)
        except (OSError, ValueError):  # not written yet, or being replaced
            return
        for entry in history[self.shown :]:
            self.terminal.say(round_line(entry, self.rounds))
        self.shown = max(self.shown, len(history))


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
