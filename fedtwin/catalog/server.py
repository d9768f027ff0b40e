"""``fedtwin catalog serve``: the TwinCatalog gRPC service over mutual TLS.

Who may do what comes from the caller's client certificate, which must chain to the
consortium CA (the TLS layer refuses anything else) and carry a role in its subject OU
(``fedtwin.pki``): researchers and operators list, inspect and pull; only operators
publish. A published twin must be signed by the consortium's signing key, its manifest
must hold only plain paths inside the twin and well-typed fields (checked before anything is
stored), and every file must match the manifest's sha256; it is listed only once all of it
is stored. What one certificate may hold of the server is bounded (``limits``).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import math
import signal
import threading
from collections.abc import Iterable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedtwin.catalog.common import CHANNEL_OPTIONS, SERVICE, check_name
from fedtwin.catalog.limits import Stream, StreamGuard
from fedtwin.catalog.store import (
    AlreadyPublished,
    BlobMismatch,
    CatalogStore,
    FileRecord,
    TwinRecord,
)
from fedtwin.catalog.v1 import catalog_pb2 as pb
from fedtwin.catalog.v1 import catalog_pb2_grpc as pb_grpc
from fedtwin.pki import role_of
from fedtwin.signing import MANIFEST, check_signature, manifest_files, signer

log = logging.getLogger(__name__)

READ, PUBLISH = ("researcher", "operator"), ("operator",)
# Threads kept for listing, manifests and health checks: pulls and publishes may use the
# others (StreamGuard's total).
UNARY_WORKERS = 16


def refuse(context: grpc.ServicerContext, code: grpc.StatusCode, message: str):
    """Log the refusal for the operator and end the call with ``code``."""
    log.warning("refused %s: %s: %s", context.peer(), code.name, message)
    context.abort(code, message)


def caller(context: grpc.ServicerContext, allowed: tuple[str, ...]) -> str:
    """Who calls: the name and fingerprint of their certificate; aborts PERMISSION_DENIED
    unless its role is ``allowed``."""
    pems = context.auth_context().get("x509_pem_cert") or []
    cert = x509.load_pem_x509_certificate(pems[0]) if pems else None
    role = role_of(cert) if cert is not None else None
    if role not in allowed:
        refuse(
            context,
            grpc.StatusCode.PERMISSION_DENIED,
            f"certificate role {role or 'none'} may not do this (needs {' or '.join(allowed)})",
        )
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(names[0].value) if names else "?"
    return f"{name} ({cert.fingerprint(hashes.SHA256()).hex()[:12]})"


def summary_message(record: TwinRecord) -> pb.TwinSummary:
    s = record.summary
    return pb.TwinSummary(
        name=record.name,
        version=record.version,
        modality=record.modality,
        images=s["images"],
        size_bytes=s["size_bytes"],
        epsilon_max=s["epsilon_max"],
        delta=s["delta"],
        audit_verdict=s["audit_verdict"],
        published_at=record.published_at,
        key_fingerprint=s["key_fingerprint"],
    )


def summarize(manifest: dict, signature: bytes) -> dict:
    """The catalog's listing fields, read from a (signed) manifest; ValueError names a field
    of the wrong type."""
    privacy, gate = _object(manifest, "privacy"), _object(manifest, "gate")
    epsilons = [
        _number(float, e, f"privacy.epsilon_per_hospital.{h}")
        for h, e in _object(privacy, "epsilon_per_hospital", "privacy.").items()
    ]
    verdict = gate.get("audit_verdict", "unknown")
    if not isinstance(verdict, str) or len(verdict) > 64:
        raise ValueError(f"gate.audit_verdict: expected a short text, got {verdict!r:.40}")
    return {
        "images": _number(int, manifest.get("size", 0), "size", low=0, high=2**62),
        # < 0 says "no DP guarantee" (DP off: epsilon is infinite) in a double field
        "epsilon_max": max(epsilons, default=-1.0) if privacy.get("dp") else -1.0,
        "delta": _number(float, privacy.get("delta", 0.0), "privacy.delta"),
        "audit_verdict": verdict,
        "key_fingerprint": signer(signature),
    }


def _object(parent: dict, key: str, prefix: str = "") -> dict:
    value = parent.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"{prefix}{key}: expected an object, got {type(value).__name__}")
    return value


def _number(kind: type, value: object, field: str, low: float = -math.inf, high: float = math.inf):
    """``value`` as an int or float (JSON numbers, or text such as "inf" as fedtwin writes)."""
    try:
        if isinstance(value, (bool, dict, list)) or value is None:
            raise TypeError
        number = kind(value)
        if number == number and not low <= number <= high:  # NaN passes: "not known"
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{field}: expected a number, got {value!r:.40}") from None
    return number


def _moving(requests: Iterable, stream: Stream) -> Iterator:
    """``requests``, telling ``stream`` that data moved at each one."""
    for request in requests:
        stream.moved()
        yield request


class CatalogService(pb_grpc.TwinCatalogServicer):
    def __init__(self, store: CatalogStore, signing_key: Ed25519PublicKey, guard: StreamGuard):
        self.store = store
        self.signing_key = signing_key
        self.guard = guard

    def _record(self, ref: pb.TwinRef, context, files: bool = True) -> TwinRecord:
        try:
            return self.store.get(ref.name, ref.version, files)
        except KeyError as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e.args[0]))

    def ListTwins(self, request, context):
        caller(context, READ)
        return pb.ListTwinsResponse(twins=[summary_message(r) for r in self.store.list_twins()])

    def GetManifest(self, request, context):
        caller(context, READ)
        record = self._record(request.twin, context)
        return pb.GetManifestResponse(
            summary=summary_message(record),
            manifest=record.manifest,
            signature=record.signature,
            files=[pb.FileEntry(path=f.path, size=f.size, sha256=f.sha256) for f in record.files],
        )

    def PullTwin(self, request, context) -> Iterator[pb.TwinChunk]:
        peer = caller(context, READ)
        record = self._record(request.twin, context, files=False)
        total = self.store.total_size(record.name, record.version)
        if not 0 <= request.offset <= total:
            context.abort(
                grpc.StatusCode.OUT_OF_RANGE,
                f"offset {request.offset} outside the twin's {total} bytes",
            )
        stream = self.guard.open(peer, context)
        log.info("pull %s:%s from byte %d by %s", record.name, record.version, request.offset, peer)
        return self._chunks(record, request.offset, stream)

    def _chunks(self, record: TwinRecord, offset: int, stream: Stream) -> Iterator[pb.TwinChunk]:
        start = 0
        for f in self.store.iter_files(record.name, record.version):
            if start + f.size > offset:
                skip = max(0, offset - start)
                position = start + skip
                for data in self.store.read_blob(f.sha256, skip):
                    yield pb.TwinChunk(offset=position, path=f.path, data=data)
                    stream.moved()
                    position += len(data)
            start += f.size

    def PublishTwin(self, request_iterator, context):
        peer = caller(context, PUBLISH)
        requests = _moving(request_iterator, self.guard.open(peer, context))
        first = next(requests, None)
        if first is None or first.WhichOneof("part") != "header":
            refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "publish starts with a header")
        header = first.header
        try:
            check_name(header.name, "name")
            check_name(header.version, "version")
            check_name(header.modality or "OT", "modality")
        except ValueError as e:
            refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        problems, _ = check_signature(header.signature, header.manifest, self.signing_key)
        if problems:
            refuse(context, grpc.StatusCode.FAILED_PRECONDITION, "; ".join(problems))
        try:  # the whole manifest, before anything is stored
            manifest = json.loads(header.manifest)
            expected = manifest_files(manifest)
            summary = summarize(manifest, header.signature)
        except (ValueError, RecursionError) as e:
            refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"{MANIFEST}: {e}")
        if self.store.has(header.name, header.version):
            refuse(
                context,
                grpc.StatusCode.ALREADY_EXISTS,
                f"{header.name}:{header.version} is already published; use a new version",
            )

        files: list[FileRecord] = []
        waiting = dict(expected)  # the files not received yet
        for path, group in itertools.groupby(requests, key=lambda r: r.data.path):
            if path not in waiting:
                why = "sent twice" if path in expected else f"not in {MANIFEST}"
                refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"{path!r}: {why}")
            want = waiting.pop(path)
            try:
                sha, size = self.store.put_blob((r.data.data for r in group), want)
            except BlobMismatch as e:
                refuse(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{path}: sha256 {e.args[0]} does not match {MANIFEST} ({want})",
                )
            files.append(FileRecord(path, size, sha))
        if waiting:
            refuse(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(waiting)} file(s) of {MANIFEST} not sent, e.g. {min(waiting)}",
            )
        record = TwinRecord(
            name=header.name,
            version=header.version,
            modality=header.modality or "OT",
            summary=summary
            | {
                "size_bytes": sum(f.size for f in files)
                + len(header.manifest)
                + len(header.signature)
            },
            manifest=header.manifest,
            signature=header.signature,
            published_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            files=tuple(files),
        )
        try:
            self.store.add_twin(record)
        except AlreadyPublished as e:
            refuse(context, grpc.StatusCode.ALREADY_EXISTS, str(e))
        log.info("published %s:%s (%d files)", record.name, record.version, len(files))
        return pb.PublishTwinResponse(summary=summary_message(record))


def serve(
    root: Path,
    address: str,
    *,
    ca: Path,
    cert: Path,
    key: Path,
    signing_key: Ed25519PublicKey,
    workers: int = 64,
    streams_per_peer: int = 8,
    stall_s: float = 60.0,
) -> None:
    """Serve the catalog in ``root`` on ``address`` until SIGINT/SIGTERM.

    ``address`` may end in ``:0`` for a free port; the chosen one is printed. Of the
    ``workers`` threads, pulls and publishes may hold all but ``UNARY_WORKERS``, one
    certificate at most ``streams_per_peer``; a stream that moves no data for ``stall_s``
    seconds is cancelled.
    """
    if workers <= UNARY_WORKERS:
        raise ValueError(f"workers: need more than {UNARY_WORKERS}, got {workers}")
    guard = StreamGuard(per_peer=streams_per_peer, total=workers - UNARY_WORKERS, stall_s=stall_s)
    credentials = grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(cert).read_bytes())],
        root_certificates=Path(ca).read_bytes(),
        require_client_auth=True,
    )
    store = CatalogStore(root)
    try:
        _serve(store, address, credentials, signing_key, guard, workers)
    finally:
        store.close()


def _serve(
    store: CatalogStore,
    address: str,
    credentials: grpc.ServerCredentials,
    signing_key: Ed25519PublicKey,
    guard: StreamGuard,
    workers: int,
) -> None:
    # gRPC shares a port with any other process that asks (SO_REUSEPORT) unless told not to:
    # two catalogs would then split the requests between them at random.
    options = [*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=options)
    pb_grpc.add_TwinCatalogServicer_to_server(CatalogService(store, signing_key, guard), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    host = address.rpartition(":")[0]
    try:
        port = server.add_secure_port(address, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise RuntimeError(
            f"cannot listen on {address}: the port is in use (another catalog?) or the host "
            f"is not an address of this machine; choose another --address"
        )
    server.start()
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    print(f"catalog serving {store.root} on {host}:{port} (mutual TLS)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    health_servicer.enter_graceful_shutdown()
    server.stop(grace=5).wait()
