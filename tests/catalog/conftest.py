"""The catalog tests' fixtures: the world (PKI, keys, a signed twin), a running catalog,
and that twin published to it. Each test file gets its own (module scope)."""

from __future__ import annotations

import pytest
from catalog_world import make_twin, start_server, stop, stub

from fedtwin import pki
from fedtwin.catalog.client import (
    publish,
)
from fedtwin.signing import load_signing_key, make_signing_key, sign_twin


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A consortium PKI, a stranger's PKI, the signing key, and one signed twin."""
    root = tmp_path_factory.mktemp("catalog")
    ours, theirs = root / "pki", root / "other-pki"
    pki.init_ca(ours)
    pki.issue_server(ours, "catalog", ["127.0.0.1"])
    for name, role in (
        ("alice", "researcher"),
        ("bob", "researcher"),
        ("carol", "researcher"),
        ("op", "operator"),
        ("hosp", "hospital"),
    ):
        pki.issue_client(ours, name, role)
    pki.init_ca(theirs, name="someone else's CA")
    pki.issue_client(theirs, "eve", "researcher")
    key = root / "keys" / "signing.pem"
    make_signing_key(key)
    make_signing_key(root / "keys" / "rogue.pem")
    twin = make_twin(root / "twin", n=400)
    sign_twin(twin, load_signing_key(key))
    return root


@pytest.fixture(scope="module")
def server(world):
    """``fedtwin catalog serve`` on a free port; yields its address; ended by PID."""
    proc, address = start_server(world, world / "store")
    try:
        yield address
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def published(world, server):
    summary = publish(stub(world, server, "op"), world / "twin", "pneumo", "1", "CR")
    assert summary.images == 400 and summary.audit_verdict == "pass"
    return summary
