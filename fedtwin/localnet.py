"""A whole consortium on one machine (127.0.0.1), as real processes: a SuperLink over TLS
with SuperNode authentication and a SQLite state database, one SuperNode per hospital
with its own archive and privacy ledger, and the operator's ``flwr`` CLI.

The deployment tests and the deployment benchmark use it; it is also a quick way to try
docs/deployment.md end to end. Every process gets a free port and its own
process group, and ``stop`` ends them all by group.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from fedtwin import pki
from fedtwin.server.app_folder import write_app

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr
FLWR_POLL = 3.0  # seconds between checks that run the flwr CLI (see wait_for)
FLWR_IDLE_POLL = 20.0  # ... while a run has not written its twin (see Consortium.wait_run)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(
    what: str,
    check: Callable,
    timeout: float,
    proc: subprocess.Popen | None = None,
    every: float = 0.5,
):
    """Poll ``check`` every ``every`` s until it returns something true; TimeoutError after
    ``timeout`` s. A check that runs the ``flwr`` CLI costs about 2 s of CPU (the import), so
    such checks poll every few seconds: polled back to back, they would take a core from the
    processes being waited for."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


def healthy(port: int, ca: Path | None) -> bool:
    """The SuperLink on ``port`` answers its health check (over TLS when ``ca`` is given)."""
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    try:
        url = f"{'https' if ca else 'http'}://127.0.0.1:{port}/health"
        with urllib.request.urlopen(url, context=context, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


class Consortium:
    """The processes of one consortium under ``root`` (logs in ``root/<name>.log``)."""

    def __init__(self, root: Path):
        self.root, self.procs, self.nodes = Path(root), [], {}
        self.outs: dict[str, Path] = {}  # run id -> the run's output folder
        self.archives: dict[str, Path] = {}
        self.port = free_port()
        self.keys = self.root / "pki"
        self.ca = self.keys / "ca.pem"
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
        }

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        home = self.root / "homes" / name
        home.mkdir(parents=True, exist_ok=True)
        log = open(self.root / f"{name}.log", "a")
        proc = subprocess.Popen(
            cmd, env={**self.env, "FLWR_HOME": str(home)}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=self.root,
        )  # fmt: skip
        log.close()
        self.procs.append(proc)
        return proc

    def start_superlink(self, name: str = "superlink") -> subprocess.Popen:
        link = self.start(name, [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(self.ca),
            "--ssl-certfile", str(self.keys / "superlink.pem"),
            "--ssl-keyfile", str(self.keys / "superlink.key"),
            "--database", str(self.root / "state.db"), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
            "--port", str(self.port),
        ])  # fmt: skip
        wait_for("SuperLink health", lambda: healthy(self.port, self.ca), 120, link)
        self.link = link
        return link

    def start_supernode(self, name: str, epsilon: float = 10.0) -> subprocess.Popen:
        """Start hospital ``name``'s SuperNode: its archive, its ledger ``root/<name>/``."""
        ledger = self.root / name / "ledger.sqlite"
        config = f"data='{self.archives[name]}' ledger='{ledger}' epsilon={epsilon}"
        self.nodes[name] = self.start(name, [
            str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates", str(self.ca),
            "--auth-supernode-private-key", str(self.keys / f"{name}.node"),
            "--port", str(free_port()), "--node-config", config,
        ])  # fmt: skip
        return self.nodes[name]

    def start_simulation_link(self) -> subprocess.Popen:
        """A SuperLink on Flower's Simulation Engine: what ``flwr run .`` starts by itself,
        here on a free port, without TLS (nothing leaves 127.0.0.1), ended by ``stop``."""
        link = self.start("superlink", [
            str(BIN / "flower-superlink"), "--insecure", "--simulation",
            "--isolation", "subprocess", "--database", str(self.root / "state.db"),
            "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
            "--port", str(self.port),
        ])  # fmt: skip
        wait_for("SuperLink health", lambda: healthy(self.port, None), 120, link)
        self.link = link
        return link

    def connect_operator(self, tls: bool = True) -> None:
        """The operator's ``flwr`` connection "consortium" to this SuperLink."""
        home = self.root / "homes" / "operator"
        home.mkdir(parents=True, exist_ok=True)
        security = f'root-certificates = "{self.ca}"' if tls else "insecure = true"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "consortium"\n\n[superlink.consortium]\n'
            f'address = "127.0.0.1:{self.port}"\n{security}\n'
        )

    def register(self, name: str) -> None:
        out = self.flwr("supernode", "register", str(self.keys / f"{name}.node.pub"), "consortium")
        if out.returncode != 0:
            raise RuntimeError(f"registering {name}: {out.stdout}{out.stderr}")

    def start_run(self, out: Path, overrides: str) -> str:
        """``flwr run`` of an app folder (``fedtwin deploy app``) for ``out``; the run id."""
        app = write_app(self.root / f"app-{out.name}", out, overrides).parent
        return self.flwr_run(app, out)

    def flwr_run(self, app: Path, out: Path, *options: str) -> str:
        """``flwr run <app> consortium <options>`` of a run writing to ``out``; its id."""
        started = self.flwr("run", str(app), "consortium", *options, "--format", "json")
        if started.returncode != 0:
            raise RuntimeError(f"flwr run: {started.stdout}{started.stderr}")
        try:
            run_id = str(json.loads(started.stdout)["run-id"])
        except (json.JSONDecodeError, KeyError):
            raise RuntimeError(f"flwr run: {started.stdout}{started.stderr}") from None
        self.outs[run_id] = out
        return run_id

    def run(self, out: Path, overrides: str, timeout: float = 900) -> dict:
        """``flwr run`` of the app for ``out``; waits for the run to finish."""
        return self.wait_run(self.start_run(out, overrides), timeout)

    def wait_run(
        self,
        run_id: str,
        timeout: float,
        watch: Callable[[], None] | None = None,
        logs: bool = True,
    ) -> dict:
        """Wait for the run to finish; returns its ``flwr ls`` entry and, with ``logs``, its
        log (``run["logs"]``, another ``flwr`` call: ``run_logs``). Asking
        the SuperLink costs a ``flwr`` call (about 2 s of CPU), so it is asked every
        ``FLWR_IDLE_POLL`` s (a failed run is noticed then) until the run's twin manifest,
        the last file a run writes, is there, and every ``FLWR_POLL`` s after. ``watch`` is
        called every second meanwhile, and once at the end (progress lines)."""
        manifest = self.outs[run_id] / "twin" / "manifest.json" if run_id in self.outs else None
        asked = -math.inf

        def finished():
            nonlocal asked
            if watch is not None:
                watch()
            written = manifest is None or manifest.is_file()
            if time.monotonic() - asked < (FLWR_POLL if written else FLWR_IDLE_POLL):
                return None
            asked = time.monotonic()
            out = self.flwr("ls", "consortium", "--run-id", run_id, "--format", "json")
            try:
                run = json.loads(out.stdout)["runs"][0]
            except (json.JSONDecodeError, KeyError, IndexError):
                return None  # the SuperLink may be restarting
            return run if run["status"].startswith("finished") else None

        run = wait_for(f"run {run_id}", finished, timeout, every=1.0)
        if watch is not None:
            watch()
        if logs:
            run["logs"] = self.run_logs(run_id)
        return run

    def run_logs(self, run_id: str) -> str:
        return self.flwr("log", run_id, "consortium", "--show").stdout

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        env = {**self.env, "FLWR_HOME": str(self.root / "homes" / "operator")}
        return subprocess.run(
            [str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout
        )

    def stream_log(self, run_id: str) -> subprocess.Popen:
        """``flwr log <run> --stream`` to this terminal until ``stop``."""
        env = {**self.env, "FLWR_HOME": str(self.root / "homes" / "operator")}
        cmd = [str(BIN / "flwr"), "log", run_id, "consortium", "--stream"]
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def node_list(self) -> list[dict]:
        out = self.flwr("supernode", "list", "consortium", "--format", "json")
        try:
            return json.loads(out.stdout).get("nodes", [])
        except json.JSONDecodeError:
            return []

    def online(self) -> int:
        return sum(n.get("status") == "online" for n in self.node_list())

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL a process and everything it started, as a crashed machine would: its
        group, then what runs in sessions of its own (Flower's SuperExec, the ServerApp or
        ClientApp under it) if they outlive it; and reap it."""
        children = descendants(proc.pid)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while children and time.monotonic() < deadline:  # they notice their parent is gone
            children = [pid for pid in children if _alive(pid)]
            time.sleep(0.2)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        """End every process started here, and what they started in sessions of their own
        (the SuperLink's simulation process, a ServerApp, a ClientApp)."""
        running = [proc for proc in self.procs if proc.poll() is None]
        started = [pid for proc in running for pid in descendants(proc.pid)]
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for pid in started:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (from /proc), children first."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def simulation(root: Path) -> Consortium:
    """A SuperLink on Flower's Simulation Engine in ``root`` and the operator's connection
    "consortium" to it, for ``Consortium.flwr_run`` of the repository's own app."""
    c = Consortium(root)
    try:
        c.start_simulation_link()
        c.connect_operator(tls=False)
    except BaseException:
        c.stop()
        raise
    return c


def build(root: Path, source: Path, names: tuple[str, ...], per_hospital: int = 300) -> Consortium:
    """A consortium in ``root`` with its SuperNodes online: PKI, one DICOM archive per
    hospital (``per_hospital`` images of the MedMNIST file ``source``), a running SuperLink,
    the operator's connection and the hospitals' keys registered. A hospital's ledger is
    ``root/<name>/ledger.sqlite``; one written before ``build`` is kept."""
    import numpy as np

    from fedtwin.dicom import make_hospital_archives

    root = Path(root)
    d = np.load(source)
    n = per_hospital * len(names)
    np.savez(root / "source.npz", train_images=d["train_images"][:n],
             train_labels=d["train_labels"][:n])  # fmt: skip
    archives = make_hospital_archives(
        root / "source.npz", len(names), "iid", 0.5, 0.2, 0, root / "archives", progress=False
    )
    pki.init_ca(root / "pki")
    pki.issue_server(root / "pki", "superlink", ["127.0.0.1", "localhost"])
    for name in names:
        pki.make_node_keys(root / "pki", name)
    c = Consortium(root)
    c.archives = dict(zip(names, archives, strict=True))
    try:
        c.start_superlink()
        c.connect_operator()
        for name in names:  # the operator registers the hospitals' public keys
            c.register(name)
        for name in names:
            c.start_supernode(name)
        wait_for(f"{len(names)} SuperNodes online", lambda: c.online() == len(names), 180,
                 every=FLWR_POLL)  # fmt: skip
    except BaseException:
        c.stop()
        raise
    return c
