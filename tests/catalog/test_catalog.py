"""The twin catalog against a real ``fedtwin catalog serve`` process on 127.0.0.1 with
mutual TLS: roles from certificates, atomic publish, verified and resumable pulls
(fixtures: ``tests/catalog/conftest.py``)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from catalog_world import (
    code,
    conn_args,
    du,
    make_twin,
    same_files,
    stub,
    who,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedtwin import TwinDataset
from fedtwin.catalog.client import (
    Identity,
    TwinRejected,
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
from fedtwin.signing import load_signing_key, public_key_path, sign_twin


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

    ds = TwinDataset(out, public_key=pub)  # a path: the consortium's key, no warning
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
    root = Path(__file__).resolve().parents[2]
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
