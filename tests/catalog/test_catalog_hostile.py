"""The catalog under hostile and careless input: stalled pulls, a catalog started twice,
manifests that lie about their files (fixtures: ``tests/catalog/conftest.py``)."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from catalog_world import (
    make_twin,
    sha,
    signed_manifest,
    start_server,
    stop,
    stub,
    who,
)

from fedtwin.catalog.client import (
    TwinRejected,
    checked_files,
    list_twins,
    publish,
    pull,
)
from fedtwin.catalog.common import CHANNEL_OPTIONS
from fedtwin.catalog.v1 import catalog_pb2 as pb
from fedtwin.catalog.v1 import catalog_pb2_grpc as pb_grpc
from fedtwin.signing import load_signing_key, public_key_path, sign_twin
from fedtwin.twin import write_twin


@pytest.fixture(scope="module")
def big_twin(world):
    """A signed twin of one 13 MB file and labels: a pull of it does not fit in the buffers
    of a client that stops reading, so the server has to wait for that client."""
    rng = np.random.default_rng(2)
    out = world / "big-twin"
    write_twin(
        out,
        rng.integers(0, 256, (200, 256, 256), dtype=np.uint8),
        rng.integers(0, 2, 200),
        class_names=["normal", "pneumonia"],
        provenance={"gate": {"audit_verdict": "pass", "signed": True, "override": None}},
        dicom=False,
    )
    sign_twin(out, load_signing_key(world / "keys" / "signing.pem"))
    return out


def stall_pulls(world, address: str, name: str, twin: str, n: int) -> list:
    """``n`` pulls of ``twin`` by ``name``, each on its own connection, that read one chunk
    and then nothing; returns (call, status) pairs, status None for a pull that started."""
    ident = who(world, name)
    creds = grpc.ssl_channel_credentials(
        ident.ca.read_bytes(), ident.key.read_bytes(), ident.cert.read_bytes()
    )
    own_connection = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    calls = []
    for _ in range(n):
        channel = grpc.secure_channel(address, creds, options=own_connection)
        call = pb_grpc.TwinCatalogStub(channel).PullTwin(
            pb.PullTwinRequest(twin=pb.TwinRef(name=twin)), timeout=120
        )
        try:
            next(call)
            calls.append((call, None))
        except grpc.RpcError as e:
            calls.append((call, e.code()))
    return calls


def test_stalled_pulls_of_one_researcher_leave_the_catalog_to_the_others(world, server, big_twin):
    publish(stub(world, server, "op"), big_twin, "big", "1")
    calls = stall_pulls(world, server, "carol", "big", 16)
    try:
        # another researcher still gets an answer at once (a deadline, not a timing) ...
        reply = stub(world, server, "bob").ListTwins(pb.ListTwinsRequest(), timeout=2)
        assert "big" in [t.name for t in reply.twins]
        # ... because one certificate may only hold so many pulls
        refused = [code for _, code in calls if code is not None]
        assert refused and set(refused) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    finally:
        for call, _ in calls:
            call.cancel()


@pytest.fixture(scope="module")
def strict_server(world, big_twin):
    """A catalog that cancels a stream after 3 s without data and allows 2 per certificate,
    with a stale upload left in its incoming/ folder before it starts."""
    root = world / "strict-store"
    (root / "incoming").mkdir(parents=True)
    (root / "incoming" / "tmpkilled").write_bytes(b"half an upload")
    proc, address = start_server(world, root, "--stall-timeout", "3", "--streams-per-peer", "2")
    try:
        publish(stub(world, address, "op"), big_twin, "big", "1")
        yield root, address
    finally:
        stop(proc)


def test_stalled_pull_is_cancelled_and_frees_its_place(world, strict_server):
    _, address = strict_server
    calls = stall_pulls(world, address, "alice", "big", 3)
    try:
        assert [code for _, code in calls] == [None, None, grpc.StatusCode.RESOURCE_EXHAUSTED]
        deadline = time.monotonic() + 60
        while True:  # the stalled pulls are cancelled: alice may pull again
            (again, code), *_ = stall_pulls(world, address, "alice", "big", 1)
            again.cancel()
            if code is None:
                break
            assert time.monotonic() < deadline, "stalled pulls were never cancelled"
            time.sleep(0.5)
    finally:
        for call, _ in calls:
            call.cancel()


def test_finished_pulls_give_their_place_back(world, strict_server, tmp_path):
    _, address = strict_server
    twin = make_twin(tmp_path / "small", n=3)
    sign_twin(twin, load_signing_key(world / "keys" / "signing.pem"))
    publish(stub(world, address, "op"), twin, "small", "1")
    for i in range(4):  # twice the two pulls bob may have open at once
        assert pull(stub(world, address, "bob"), "small", "1", tmp_path / f"pull-{i}").ok


def test_unfinished_uploads_are_removed_when_the_catalog_starts(strict_server):
    root, _ = strict_server
    assert list((root / "incoming").iterdir()) == []


def test_second_catalog_on_a_port_or_root_in_use_refuses_to_start(world, server, tmp_path):
    base = [sys.executable, "-m", "fedtwin.cli", "catalog", "serve", "--pki", str(world / "pki"),
            "--signing-key", str(public_key_path(world / "keys" / "signing.pem"))]  # fmt: skip
    for where, why in (
        (["--root", str(tmp_path / "other"), "--address", server], "in use"),
        (["--root", str(world / "store"), "--address", "127.0.0.1:0"], "another catalog"),
    ):
        proc = subprocess.Popen(
            base + where, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == 2 and "catalog serving" not in out, (out, err)
        assert why in err and "Traceback" not in err


def test_twin_with_an_empty_file_is_published_and_pulled(world, server):
    twin = world / "twin-empty"
    (twin / "notes").mkdir(parents=True)
    (twin / "notes" / "empty.txt").write_bytes(b"")
    make_twin(twin, n=3)
    sign_twin(twin, load_signing_key(world / "keys" / "signing.pem"))
    publish(stub(world, server, "op"), twin, "with-empty", "1")
    out = world / "pulled-empty" / "twin"
    assert pull(stub(world, server, "alice"), "with-empty", "1", out).ok
    assert (out / "notes" / "empty.txt").read_bytes() == b""


NPZ, CSV = b"not really an npz", b"file,label\n"
BAD_MANIFESTS = {
    "dot": {"files": {".": "x"}},
    "nul": {"files": {"a\x00b": "x"}},
    "file-and-folder": {"files": {"a": "x", "a/b": "y"}},
    "signature": {"files": {"manifest.sig": "x"}},
    "parent": {"files": {"../x": "x"}},
    "absolute": {"files": {"/etc/outside": "x"}},
    "size-text": {"size": "many"},
    "epsilon-list": {"privacy": {"dp": True, "epsilon_per_hospital": {"h0": [1]}}},
    "privacy-list": {"privacy": []},
    "size-huge": {"size": 1e300},
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_bad_manifest_is_refused_before_anything_is_stored(world, server, case, tmp_path):
    bad = BAD_MANIFESTS[case]
    payload = {path: f"{case} {path}".encode() for path in bad.get("files", {})}
    files = {"images.npz": sha(NPZ), "labels.csv": sha(CSV)}
    files |= {path: sha(data) for path, data in payload.items()}
    manifest, signature = signed_manifest(
        world, tmp_path / "twin", {**bad, "files": files, "kind": f"test {case}"}
    )
    header = pb.PublishHeader(name=f"bad-{case}", version="1", manifest=manifest,
                              signature=signature)  # fmt: skip

    def requests():
        yield pb.PublishRequest(header=header)
        for path, data in {"images.npz": NPZ, "labels.csv": CSV, **payload}.items():
            yield pb.PublishRequest(data=pb.PublishData(path=path, data=data))

    objects = world / "store" / "objects"
    before = sorted(objects.rglob("*"))
    with pytest.raises(grpc.RpcError) as e:
        stub(world, server, "op").PublishTwin(requests(), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert "manifest.json" in e.value.details()
    assert sorted(objects.rglob("*")) == before
    assert f"bad-{case}" not in [t.name for t in list_twins(stub(world, server, "alice"))]


def test_catalog_file_list_must_match_the_manifest_before_anything_is_written(world, tmp_path):
    manifest, signature = signed_manifest(
        world, tmp_path / "dot-twin", {"files": {"images.npz": sha(NPZ), ".": sha(CSV)}}
    )
    got = pb.GetManifestResponse(
        manifest=manifest,
        signature=signature,
        files=[pb.FileEntry(path="images.npz", size=len(NPZ), sha256=sha(NPZ)),
               pb.FileEntry(path=".", size=len(CSV), sha256=sha(CSV))],
    )  # fmt: skip
    with pytest.raises(TwinRejected, match="nothing written"):
        checked_files(got, "dot:1")
    good = {"images.npz": sha(NPZ), "labels.csv": sha(CSV)}
    manifest, signature = signed_manifest(world, tmp_path / "fine-twin", {"files": good})
    other = pb.FileEntry(path="elsewhere.npz", size=1, sha256=sha(NPZ))
    got = pb.GetManifestResponse(manifest=manifest, signature=signature, files=[other])
    with pytest.raises(TwinRejected, match="does not match"):
        checked_files(got, "fine:1")
