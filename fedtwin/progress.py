"""Where a run is, told as it runs: each phase with its elapsed time and, where the work is
counted, an estimate of what is left; and the seconds each phase took.

The federation runs in other processes (the ServerApp under Flower's SuperExec, the
hospitals in Ray actors), so they append events to a file named by the run config's
``progress`` setting (``Events``; only ``fedtwin demo`` sets it, so a deployment writes
none), and the demo's terminal reads them (``Terminal``). Events are JSON lines:

    {"t": 1733550000.1, "phase": "warm start", "total": 300, "unit": "steps"}
    {"t": 1733550004.9, "done": 42}
    {"t": 1733550031.2, "hospital": "hospital-1", "task": "round 2", "finished": true}
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

EVENTS_FILE = "progress.jsonl"  # in the demo's output folder
HEARTBEAT_S = 10.0  # the longest the terminal stays silent while a phase runs
COUNT_EVERY_S = 1.0  # the most often a count is written to the events file


class Events:
    """Appends progress events to ``path``, one JSON object a line; does nothing when
    ``path`` is None. Counts (``count``) are written at most every ``COUNT_EVERY_S``."""

    def __init__(self, path: Path | None):
        self.path, self._counted = path, -float("inf")

    @classmethod
    def from_run(cls, run_config: Mapping[str, Any]) -> Events:
        """The events of a Flower run: to the file its ``progress`` setting names, if any."""
        path = str(run_config.get("progress", ""))
        return cls(Path(path) if path else None)

    def phase(self, name: str, *, total: int | None = None, unit: str = "") -> None:
        self.write({"phase": name, "total": total, "unit": unit})

    def count(self, done: int) -> None:
        if time.monotonic() - self._counted >= COUNT_EVERY_S:
            self._counted = time.monotonic()
            self.write({"done": done})

    def hospital(self, name: str, task: str, *, finished: bool) -> None:
        """Hospital ``name`` started (or finished) ``task``: "round 3", "audit"."""
        self.write({"hospital": name, "task": task, "finished": finished})

    def write(self, event: dict) -> None:
        if self.path is None:
            return
        line = json.dumps({"t": time.time(), **event}) + "\n"
        with open(self.path, "a") as f:  # one short append: whole lines even from many writers
            f.write(line)


class BarRelay(io.TextIOBase):
    """A file for tqdm: the count each bar draws to it goes out as ``Events.count``."""

    COUNT = re.compile(r"(\d+)/\d+ \[")  # "120/300 [00:20<00:30, ...]"

    def __init__(self, events: Events):
        self.events = events

    def write(self, text: str) -> int:
        counts = self.COUNT.findall(text)
        if counts:
            self.events.count(int(counts[-1]))
        return len(text)


@contextlib.contextmanager
def relay_bars(events: Events) -> Iterator[None]:
    """While inside, tqdm bars drawn to stderr in this process (a model's warm start) are
    sent as counts instead; what else goes to stderr meanwhile is dropped."""
    with contextlib.redirect_stderr(BarRelay(events)):
        yield


def read_events(path: Path, offset: int) -> tuple[list[dict], int]:
    """The whole event lines of ``path`` after byte ``offset``, and the offset after them."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    whole = data[: data.rfind(b"\n") + 1]
    events = [json.loads(line) for line in whole.splitlines() if line.strip()]
    return events, offset + len(whole)


class Terminal:
    """The terminal of a run: a line as each phase starts and ends; while one runs, its
    status at least every ``heartbeat`` s (a tqdm bar on a terminal, a line in a log) with
    its elapsed time and, where counted, an estimate of what is left. ``seconds``: the
    seconds of each phase so far. Use it as a context manager (the heartbeat's thread).

    A phase may have items (``rounds``: "round 1/5", "round 2/5", ...): each gets its own
    count; the phase's seconds are their sum."""

    def __init__(self, stream: TextIO | None = None, heartbeat: float = HEARTBEAT_S):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.heartbeat, self.seconds, self.born = heartbeat, {}, time.time()
        self.name = self.item = self.unit = ""
        self.total: int | None = None
        self.done, self.started, self.told = 0, 0.0, 0.0
        self.bar: tqdm | None = None
        self.stopping = threading.Event()
        self.lock = threading.RLock()

    def __enter__(self) -> Terminal:
        threading.Thread(target=self._beat, daemon=True, name="terminal").start()
        return self

    def __exit__(self, kind, *exc) -> None:
        self.stopping.set()
        self.end(word="stopped after" if kind else "done in")

    def phase(
        self,
        name: str,
        *,
        item: str = "",
        total: int | None = None,
        unit: str = "",
        at: float | None = None,
    ) -> None:
        """Start phase ``name`` (or its next ``item``) at time ``at`` (now if None)."""
        with self.lock:
            at = time.time() if at is None else at
            if (name, item) == (self.name, self.item):
                return
            if name == self.name:
                self._add(at)  # the item before
            else:
                self.end(at)
                self.say(f"{name}{': ' + item if item else ''}", at)
            self._close_bar()
            self.name, self.item, self.total, self.unit = name, item, total, unit
            self.done, self.started, self.told = 0, at, time.monotonic()
            if self.live:
                self.bar = tqdm(total=total, desc=self.label(), file=self.stream, leave=False,
                                bar_format=self._bar_format())  # fmt: skip

    def count(self, done: int) -> None:
        with self.lock:
            self.done = done
            if self.bar is not None:
                self.bar.n = done
                self.bar.refresh()

    def end(self, at: float | None = None, word: str = "done in") -> None:
        """End the phase now running (if any): its line with its seconds."""
        with self.lock:
            self._close_bar()
            if not self.name:
                return
            at = time.time() if at is None else at
            self._add(at)
            self.say(f"{self.name} {word} {self.seconds[self.name]:.0f} s", at)
            self.name = self.item = ""

    def status(self) -> str:
        """``warm start: 120/300 steps, 00:20, about 00:30 left``."""
        elapsed = time.time() - self.started
        line = f"{self.label()}: "
        if self.total:
            line += f"{self.done}/{self.total} {self.unit}, "
        line += f"{tqdm.format_interval(elapsed)}"
        if self.total and self.done:
            left = elapsed / self.done * (self.total - self.done)
            line += f", about {tqdm.format_interval(left)} left"
        return line

    def say(self, text: str, at: float | None = None) -> None:
        """A line; with ``at``, after the run's elapsed time then: ``[01:05] warm start``."""
        with self.lock:
            if at is not None:
                text = f"[{tqdm.format_interval(max(0.0, at - self.born))}] {text}"
            tqdm.write(text, file=self.stream)
            self.stream.flush()
            self.told = time.monotonic()

    def label(self) -> str:
        return self.item or self.name

    def _beat(self) -> None:
        while not self.stopping.wait(1.0):
            with self.lock:
                if not self.name:
                    continue
                if self.bar is not None:
                    self.bar.refresh()  # its elapsed time and rate
                elif time.monotonic() - self.told >= self.heartbeat:
                    self.say(f"  {self.status()}")

    def _bar_format(self) -> str:
        """``warm start:  40%|####      | 120/300 steps [00:20<00:30]``; uncounted:
        ``flower start: 00:20``."""
        if not self.total:
            return "{desc}: {elapsed}"
        return "{l_bar}{bar}| {n_fmt}/{total_fmt} " + self.unit + " [{elapsed}<{remaining}]"

    def _add(self, at: float) -> None:
        self.seconds[self.name] = self.seconds.get(self.name, 0.0) + max(0.0, at - self.started)
        self.started = at

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
