"""Progress: events written by the federation's processes, read back whole; the terminal
names each phase, counts its work, estimates what is left and keeps each phase's seconds."""

from __future__ import annotations

import io
import json

from tqdm import tqdm

from fedtwin.progress import Events, Terminal, read_events, relay_bars
from fedtwin.server.simulation import Progress


def test_events_go_to_the_file_the_run_config_names_and_nowhere_without_one(tmp_path):
    path = tmp_path / "progress.jsonl"
    Events.from_run({"progress": str(path)}).phase("warm start", total=300, unit="steps")
    Events.from_run({}).phase("warm start")  # a deployment: no file, no error
    [event] = [json.loads(line) for line in path.read_text().splitlines()]
    assert event["phase"] == "warm start" and event["total"] == 300 and event["t"] > 0


def test_only_whole_lines_are_read_and_the_rest_waits_for_the_next_read(tmp_path):
    path = tmp_path / "progress.jsonl"
    assert read_events(path, 0) == ([], 0)  # not written yet
    path.write_text('{"done": 1}\n{"do')
    events, offset = read_events(path, 0)
    assert events == [{"done": 1}]
    with open(path, "a") as f:
        f.write('ne": 2}\n')
    assert read_events(path, offset)[0] == [{"done": 2}]


def test_a_tqdm_bar_inside_relay_bars_is_sent_as_counts(tmp_path):
    events = Events(tmp_path / "progress.jsonl")
    with relay_bars(events):
        for _ in tqdm(range(5), mininterval=0):
            pass
    counts = [json.loads(line)["done"] for line in events.path.read_text().splitlines()]
    assert counts and counts[0] == 0  # one a second at most: the first, then none so soon


def test_the_terminal_names_phases_in_order_and_keeps_their_seconds():
    stream = io.StringIO()
    terminal = Terminal(stream)
    terminal.born = 40.0
    terminal.phase("rounds", item="round 1/2", total=2, unit="hospitals", at=100.0)
    terminal.phase("rounds", item="round 2/2", total=2, unit="hospitals", at=110.0)
    terminal.count(1)
    assert terminal.status().startswith("round 2/2: 1/2 hospitals, ")
    assert "left" in terminal.status()
    terminal.phase("report", at=125.0)
    terminal.end(at=126.0)
    assert terminal.seconds == {"rounds": 25.0, "report": 1.0}
    lines = stream.getvalue().splitlines()
    assert lines == [
        "[01:00] rounds: round 1/2",
        "[01:25] rounds done in 25 s",
        "[01:25] report",
        "[01:26] report done in 1 s",
    ]


def test_a_running_phase_is_told_at_least_every_heartbeat():
    stream = io.StringIO()
    with Terminal(stream, heartbeat=0.0) as terminal:
        terminal.phase("evaluation")
        terminal.stopping.wait(2.5)  # the heartbeat thread ticks every second
    assert stream.getvalue().count("  evaluation: 00:0") >= 1


def test_the_federations_events_become_phases_with_hospitals_counted(tmp_path):
    cfg = {"federation": {"rounds": 2, "local_steps": 3, "hospitals": 2}}
    terminal = Terminal(io.StringIO())
    watch = Progress(tmp_path, cfg, terminal)
    events = Events(tmp_path / "progress.jsonl")
    events.hospital("hospital-0", "feature release", finished=True)
    events.phase("warm start", total=5, unit="steps")
    events.count(5)
    events.hospital("hospital-1", "round 1", finished=False)
    events.hospital("hospital-1", "round 1", finished=True)
    watch()
    assert terminal.name == "rounds" and terminal.done == 1
    assert terminal.item == "round 1/2, 3 local steps at each hospital"
    assert list(terminal.seconds) == ["feature release", "warm start"]


def test_a_simulated_hospital_tells_its_task_and_a_deployed_one_writes_nothing(tmp_path):
    from flwr.app import Context, RecordDict

    from fedtwin.client.client_app import told

    path = tmp_path / "progress.jsonl"
    for node_config in ({"partition-id": 0}, {"data": "/archive"}):  # simulated, deployed
        context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                          run_config={"progress": str(path)})  # fmt: skip
        with told(context, "hospital-0", "round 1"):
            pass
    events = read_events(path, 0)[0]
    assert [(e["hospital"], e["task"], e["finished"]) for e in events] == [
        ("hospital-0", "round 1", False),
        ("hospital-0", "round 1", True),
    ]
