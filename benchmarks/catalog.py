"""Part (f): the catalog: concurrent pulls of a 20k-image twin from a `fedtwin catalog
serve` process over mutual TLS on 127.0.0.1: throughput (MB/s) vs a plain local copy of
the same files, and the server's memory (RSS) before, during and after.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def part_f(cfg: dict) -> dict:
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    from fedtwin import pki
    from fedtwin.catalog.client import Identity, connect, publish, pull
    from fedtwin.signing import make_signing_key, public_key_path, sign_twin
    from fedtwin.twin import write_twin

    n, clients = (500, 4) if cfg.get("quick") else (20000, 8)
    root = Path(tempfile.mkdtemp(prefix="fedtwin-catalog-bench-"))
    try:
        rng = np.random.default_rng(0)
        twin = root / "twin"
        start = time.time()
        write_twin(
            twin,
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            rng.integers(0, 2, n),
            class_names=list(cfg["data"]["classes"]),
            provenance={"gate": {"audit_verdict": "pass", "signed": True, "override": None}},
        )
        sign_twin(twin, make_signing_key(root / "signing.pem"))
        files = [p for p in twin.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        pki.init_ca(root / "pki")
        pki.issue_server(root / "pki", "catalog", ["127.0.0.1"])
        for name, role in (("op", "operator"), ("alice", "researcher")):
            pki.issue_client(root / "pki", name, role)
        out: dict = {
            "twin_images": n,
            "twin_files": len(files),
            "twin_mb": size / 1e6,
            "make_twin_s": time.time() - start,
            "concurrent_pulls": clients,
        }

        server = subprocess.Popen(
            [sys.executable, "-m", "fedtwin.cli", "catalog", "serve", "--root",
             str(root / "store"), "--address", "127.0.0.1:0", "--pki", str(root / "pki"),
             "--signing-key", str(public_key_path(root / "signing.pem"))],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        try:
            address = server.stdout.readline().split(" on ")[1].split()[0]

            def stub(name):
                d = root / "pki"
                return connect(
                    Identity(address, d / "ca.pem", d / f"{name}.pem", d / f"{name}.key")
                )

            start = time.time()
            publish(stub("op"), twin, "bench", "1")
            out["publish_s"] = time.time() - start
            out["publish_mb_per_s"] = size / 1e6 / out["publish_s"]
            rss = RssSampler(server.pid)
            out["server_rss_mb_idle"] = rss.now()

            def timed(fn, k):
                with rss, ThreadPoolExecutor(k) as pool:
                    start = time.time()
                    list(pool.map(fn, range(k)))
                    return time.time() - start

            def one_pull(i, tag):
                pull(stub("alice"), "bench", "1", root / tag / str(i))

            def one_copy(i, tag):
                shutil.copytree(twin, root / tag / str(i))

            single_pull = timed(lambda i: one_pull(i, "p1"), 1)
            out["server_rss_mb_peak_1_pull"] = rss.peak
            waves = []  # repeated waves: memory that keeps growing would be a leak
            for wave in range(3):
                seconds = timed(lambda i, w=wave: one_pull(i, f"p{clients}-{w}"), clients)
                waves.append({"s": seconds, "server_rss_mb_peak": rss.peak})
                shutil.rmtree(root / f"p{clients}-{wave}")
            out["concurrent_waves"] = waves
            out["server_rss_mb_peak_concurrent"] = max(w["server_rss_mb_peak"] for w in waves)
            out["server_rss_mb_after"] = rss.now()
            many_pull = min(w["s"] for w in waves)
            single_copy = timed(lambda i: one_copy(i, "c1"), 1)
            copies = []
            for wave in range(3):
                copies.append(timed(lambda i, w=wave: one_copy(i, f"c-{w}"), clients))
                shutil.rmtree(root / f"c-{wave}")
            many_copy = min(copies)
        finally:
            server.terminate()
            server.wait(10)
        out |= {
            "one_pull_s": single_pull,
            "one_pull_mb_per_s": size / 1e6 / single_pull,
            "one_local_copy_mb_per_s": size / 1e6 / single_copy,
            "concurrent_pulls_s": many_pull,  # the fastest of the waves, as for the copies
            "concurrent_pulls_total_mb_per_s": clients * size / 1e6 / many_pull,
            "concurrent_local_copies_total_mb_per_s": clients * size / 1e6 / many_copy,
            "pull_over_copy_throughput_one": single_copy / single_pull,
            "pull_over_copy_throughput_concurrent": many_copy / many_pull,
            "note": "a pull includes TLS, gRPC streaming, writing every file and verifying "
            "every sha256 and the signature; client threads and server share this machine",
        }
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


class RssSampler:
    """Samples a process's resident memory (Linux /proc) every 50 ms inside ``with``."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0.0, None

    def now(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            line = next(x for x in f if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    def __enter__(self):
        import threading

        self.peak, self._stop = self.now(), threading.Event()

        def sample():
            while not self._stop.wait(0.05):
                self.peak = max(self.peak, self.now())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
