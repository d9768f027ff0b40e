"""The twin catalog against a real ``fedtwin catalog serve`` process on 127.0.0.1 with
mutual TLS: roles from certificates, atomic publish, verified and resumable pulls."""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedtwin import TwinDataset, pki
from fedtwin.catalog.client import (
    Identity,
    TwinRejected,
    checked_files,
    connect,
    list_twins,
    publish,
    pull,
    resume_offset,
)
from fedtwin.catalog.common import CHANNEL_OPTIONS
from fedtwin.catalog.v1 import catalog_pb2 as pb
from fedtwin.catalog.v1 import catalog_pb2_grpc as pb_grpc
from fedtwin.cli import main
from fedtwin.signing import load_signing_key, make_signing_key, public_key_path, sign_twin
from fedtwin.twin import write_twin

FLAGS = ("--ca", "--cert", "--key")


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


@pytest.fixture(scope="module")
def server(world):
    """``fedtwin catalog serve`` on a free port; yields its address; ended by PID."""
    proc, address = start_server(world, world / "store")
    try:
        yield address
    finally:
        stop(proc)


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


@pytest.fixture(scope="module")
def published(world, server):
    summary = publish(stub(world, server, "op"), world / "twin", "pneumo", "1", "CR")
    assert summary.images == 400 and summary.audit_verdict == "pass"
    return summary


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


def test_researcher_lists_gets_and_pulls_a_verified_twin(world, server, published, capsys):
    assert main(["twins", *conn_args(world, server, "alice")]) == 0
    listed = capsys.readouterr().out
    assert "pneumo:1  400 images" in listed and "eps 9.90" in listed and "audit pass" in listed

    got = stub(world, server, "alice").GetManifest(
        pb.GetManifestRequest(twin=pb.TwinRef(name="pneumo"))
    )
    assert (
        got.summary.version == "1" and got.manifest == (world / "twin/manifest.json").read_bytes()
    )
    assert len(got.files) == 403  # images.npz, labels.csv, audit.json, 400 DICOM files

    out = world / "pulled" / "pneumo"
    assert main(["pull", "pneumo:1", "--out", str(out), *conn_args(world, server, "alice")]) == 0
    same_files(world / "twin", out)
    pub = public_key_path(world / "keys" / "signing.pem")
    assert main(["verify", str(out), "--public-key", str(pub)]) == 0

    ds = TwinDataset(out, public_key=None)
    image, label = ds[0]
    assert len(ds) == 400 and image.shape == (1, 28, 28) and label in (0, 1)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0


def test_refusals_carry_the_right_status(world, server, published):
    ca = (world / "pki" / "ca.pem").read_bytes()
    anonymous = pb_grpc.TwinCatalogStub(
        grpc.secure_channel(server, grpc.ssl_channel_credentials(ca), options=CHANNEL_OPTIONS)
    )
    # no client certificate, or one from another CA: the TLS handshake fails
    assert code(lambda: list_twins(anonymous)) == grpc.StatusCode.UNAVAILABLE
    eve = who(world, "eve", "other-pki")
    stranger = connect(Identity(server, world / "pki" / "ca.pem", eve.cert, eve.key))
    assert code(lambda: list_twins(stranger)) == grpc.StatusCode.UNAVAILABLE
    # a consortium certificate without a catalog role, and a researcher who publishes
    assert (
        code(lambda: list_twins(stub(world, server, "hosp"))) == grpc.StatusCode.PERMISSION_DENIED
    )
    alice = stub(world, server, "alice")
    denied = code(lambda: publish(alice, world / "twin", "mine", "1"))
    assert denied == grpc.StatusCode.PERMISSION_DENIED
    # what the operator may not do either
    op = stub(world, server, "op")
    again = code(lambda: publish(op, world / "twin", "pneumo", "1"))
    assert again == grpc.StatusCode.ALREADY_EXISTS
    missing = code(lambda: pull(alice, "no-such-twin", "", world / "nothing"))
    assert missing == grpc.StatusCode.NOT_FOUND
    assert [t.name for t in list_twins(alice)] == ["pneumo"]


def test_twin_signed_by_another_key_is_not_published(world, server, published):
    rogue = make_twin(world / "rogue-twin", n=5)
    sign_twin(rogue, load_signing_key(world / "keys" / "rogue.pem"))
    with pytest.raises(grpc.RpcError) as e:
        publish(stub(world, server, "op"), rogue, "rogue", "1")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not by the trusted key" in e.value.details()


def test_half_uploaded_twin_is_never_listed(world, server, published):
    twin = world / "twin"
    op = stub(world, server, "op")
    header = pb.PublishHeader(
        name="half", version="1", manifest=(twin / "manifest.json").read_bytes(),
        signature=(twin / "manifest.sig").read_bytes(),
    )  # fmt: skip

    def stops_early():
        yield pb.PublishRequest(header=header)
        for path in ("images.npz", "labels.csv"):
            data = (twin / path).read_bytes()
            yield pb.PublishRequest(data=pb.PublishData(path=path, data=data))

    with pytest.raises(grpc.RpcError) as e:
        op.PublishTwin(stops_early())
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not sent" in e.value.details()

    def crashes():
        yield from stops_early()
        raise ConnectionError("operator's machine went down")

    assert code(lambda: op.PublishTwin(crashes())) == grpc.StatusCode.UNKNOWN
    assert [t.name for t in list_twins(op)] == ["pneumo"]


def test_pull_killed_half_way_resumes_to_the_same_twin(world, server, published):
    out = world / "resumed" / "pneumo"
    partial = out.parent / ".pneumo.partial"
    files = list(
        stub(world, server, "alice")
        .GetManifest(pb.GetManifestRequest(twin=pb.TwinRef(name="pneumo", version="1")))
        .files
    )
    total = sum(f.size for f in files)
    cmd = [sys.executable, "-m", "fedtwin.cli", "pull", "pneumo:1", "--out", str(out),
           "--limit-rate", "300k", *conn_args(world, server, "alice")]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while du(partial) < total // 3:
            assert proc.poll() is None, "the pull ended before it could be interrupted"
            assert time.monotonic() < deadline, "the pull made no progress"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists()
    on_disk = resume_offset(partial, files)
    assert total // 3 <= on_disk < total

    result = pull(stub(world, server, "alice"), "pneumo", "1", out)
    assert result.ok and not partial.exists()
    same_files(world / "twin", out)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def test_tampered_store_is_refused_at_pull(world, server, published):
    twin = make_twin(world / "twin-2", n=20)
    sign_twin(twin, load_signing_key(world / "keys" / "signing.pem"))
    op = stub(world, server, "op")
    publish(op, twin, "pneumo", "2")
    labels = (twin / "labels.csv").read_bytes()
    blob = next((world / "store" / "objects").rglob(hashlib.sha256(labels).hexdigest()))
    blob.write_bytes(labels.replace(b",1", b",0", 1))  # one label flipped on the server's disk

    out = world / "tampered" / "pneumo"
    with pytest.raises(TwinRejected, match="labels.csv"):
        pull(stub(world, server, "alice"), "pneumo", "2", out)
    assert not out.exists() and not (out.parent / ".pneumo.partial").exists()


def test_health_check_is_served(world, server):
    ident = who(world, "alice")
    creds = grpc.ssl_channel_credentials(
        ident.ca.read_bytes(), ident.key.read_bytes(), ident.cert.read_bytes()
    )
    with grpc.secure_channel(server, creds) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="fedtwin.catalog.v1.TwinCatalog"), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# --- hostile and careless input -----------------------------------------------------------


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


def signed_manifest(world, out: Path, manifest: dict) -> tuple[bytes, bytes]:
    """``manifest`` as the consortium signs one; returns (manifest.json, manifest.sig)."""
    out.mkdir(parents=True)
    (out / "manifest.json").write_text(json.dumps(manifest))
    sign_twin(out, load_signing_key(world / "keys" / "signing.pem"))
    return (out / "manifest.json").read_bytes(), (out / "manifest.sig").read_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


def test_pull_into_a_path_under_a_file_is_a_clear_error(world, server, published, capsys):
    blocker = world / "a-file"
    blocker.write_text("not a folder")
    code = main(["pull", "pneumo:1", "--out", str(blocker / "sub"),
                 *conn_args(world, server, "alice")])  # fmt: skip
    assert code == 2 and f"{blocker} is a file" in capsys.readouterr().err


def test_catalog_root_under_a_file_is_a_clear_error(world, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    done = subprocess.run(
        [sys.executable, "-m", "fedtwin.cli", "catalog", "serve", "--root",
         str(blocker / "store"), "--address", "127.0.0.1:0", "--pki", str(world / "pki"),
         "--signing-key", str(public_key_path(world / "keys" / "signing.pem"))],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "catalog serving" not in done.stdout
    assert f"{blocker} is a file" in done.stderr and "Traceback" not in done.stderr


def test_pull_with_a_corrupt_marker_starts_afresh(world, server, published):
    out = world / "marked" / "pneumo"
    (out.parent / ".pneumo.partial" / "dicom").mkdir(parents=True)
    (out.parent / ".pneumo.partial" / "dicom" / "stray.dcm").write_bytes(b"x")
    (out.parent / ".pneumo.partial.json").write_text("{not json")
    assert pull(stub(world, server, "alice"), "pneumo", "1", out).ok
    same_files(world / "twin", out)


def test_committed_stubs_match_the_protos(tmp_path):
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, str(root / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    generated = sorted(tmp_path.rglob("*_pb2*.py*"))
    assert generated, "gen_protos.py wrote nothing"
    for path in generated:
        committed = root / path.relative_to(tmp_path)
        assert committed.is_file(), f"{committed.relative_to(root)} is not committed"
        assert path.read_bytes() == committed.read_bytes(), (
            f"{committed.relative_to(root)} differs from the .proto: run scripts/gen_protos.py"
        )
