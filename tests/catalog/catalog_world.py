"""What the catalog tests share: a consortium's PKI and signing key, twins, a running
``fedtwin catalog serve`` process, and the clients that talk to it."""

from __future__ import annotations

import hashlib
import json
import selectors
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedtwin.catalog.client import (
    Identity,
    connect,
)
from fedtwin.signing import load_signing_key, public_key_path, sign_twin
from fedtwin.twin import write_twin

FLAGS = ("--ca", "--cert", "--key")


def make_twin(out: Path, n: int) -> Path:
    rng = np.random.default_rng(1)
    write_twin(
        out,
        rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        rng.integers(0, 2, n),
        class_names=["normal", "pneumonia"],
        provenance={
            "privacy": {"dp": True, "delta": 1e-5, "epsilon_per_hospital": {"h0": 9.5, "h1": 9.9}},
            "gate": {"audit_verdict": "pass", "signed": True, "override": None},
        },
        documents={"audit.json": {"verdict": "pass"}},
    )
    return out


def who(world, name: str, pki_dir: str = "pki") -> Identity:
    d = world / pki_dir
    return Identity("", d / "ca.pem", d / f"{name}.pem", d / f"{name}.key")


def start_server(world: Path, root: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """``fedtwin catalog serve`` on a free port; returns the process and its address."""
    log = open(world / f"server-{root.name}.log", "a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedtwin.cli", "catalog", "serve", "--root", str(root),
         "--address", "127.0.0.1:0", "--pki", str(world / "pki"),
         "--signing-key", str(public_key_path(world / "keys" / "signing.pem")), *flags],
        stdout=subprocess.PIPE, stderr=log, text=True,
    )  # fmt: skip
    log.close()
    line = read_line(proc, timeout=60)
    if "catalog serving" not in line:
        stop(proc)
        raise AssertionError(f"the catalog did not start: {line!r}")
    return proc, line.split(" on ")[1].split()[0]


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def read_line(proc, timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        proc.kill()
        raise TimeoutError("catalog server did not start")
    return proc.stdout.readline()


def stub(world, server, name: str, pki_dir: str = "pki"):
    ident = who(world, name, pki_dir)
    return connect(Identity(server, ident.ca, ident.cert, ident.key))


def conn_args(world, server, name: str) -> list[str]:
    ident = who(world, name)
    return ["--catalog", server, "--ca", str(ident.ca), "--cert", str(ident.cert)]


def same_files(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 400 + 5
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def signed_manifest(world, out: Path, manifest: dict) -> tuple[bytes, bytes]:
    """``manifest`` as the consortium signs one; returns (manifest.json, manifest.sig)."""
    out.mkdir(parents=True)
    (out / "manifest.json").write_text(json.dumps(manifest))
    sign_twin(out, load_signing_key(world / "keys" / "signing.pem"))
    return (out / "manifest.json").read_bytes(), (out / "manifest.sig").read_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
