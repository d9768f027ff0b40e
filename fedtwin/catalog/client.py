"""The researcher's (and operator's) side of the catalog: list, pull, publish.

A pull streams into ``.<out>.partial`` beside the destination, with a marker file saying
which twin it holds; started again, it resumes after the bytes already on disk. Only when
every file's sha256 and the signature check out is the directory renamed into place, so
``out`` either does not exist or holds a verified twin. Nothing is written before the
catalog's file list is checked against the manifest: only plain paths inside the twin.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from tqdm import tqdm

from fedtwin.catalog.common import CHANNEL_OPTIONS, check_folder, check_name
from fedtwin.catalog.store import CHUNK
from fedtwin.catalog.v1 import catalog_pb2 as pb
from fedtwin.catalog.v1 import catalog_pb2_grpc as pb_grpc
from fedtwin.signing import MANIFEST, SIGNATURE, Verification, manifest_files, verify_twin

UNARY_TIMEOUT = 60.0  # seconds, for list / get / the end of a publish


@dataclass(frozen=True)
class Identity:
    """Where the catalog is and who we are: the consortium CA and our certificate."""

    address: str
    ca: Path
    cert: Path
    key: Path


def connect(identity: Identity) -> pb_grpc.TwinCatalogStub:
    for what, path in (("--ca", identity.ca), ("--cert", identity.cert), ("--key", identity.key)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{what} {path}: no such file")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(identity.ca).read_bytes(),
        private_key=Path(identity.key).read_bytes(),
        certificate_chain=Path(identity.cert).read_bytes(),
    )
    channel = grpc.secure_channel(identity.address, credentials, options=CHANNEL_OPTIONS)
    return pb_grpc.TwinCatalogStub(channel)


def list_twins(stub: pb_grpc.TwinCatalogStub) -> list[pb.TwinSummary]:
    return list(stub.ListTwins(pb.ListTwinsRequest(), timeout=UNARY_TIMEOUT).twins)


class TwinRejected(RuntimeError):
    """A pulled twin failed verification; nothing was kept."""


def pull(
    stub: pb_grpc.TwinCatalogStub,
    name: str,
    version: str,
    out: Path,
    *,
    trusted: Ed25519PublicKey | None = None,
    limit_rate: float | None = None,
    progress: bool = False,
) -> Verification:
    """Pull twin ``name`` (``version`` empty: the latest) into the new directory ``out``.

    Resumes a pull of the same twin that was interrupted; ``limit_rate`` caps bytes/s.
    Raises ``TwinRejected`` naming what failed if the twin does not verify.
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise FileExistsError(f"{out} exists; pull into a new directory")
    check_folder(out.parent)
    got = stub.GetManifest(
        pb.GetManifestRequest(twin=pb.TwinRef(name=name, version=version)),
        timeout=UNARY_TIMEOUT,
    )
    version = got.summary.version  # pinned: "latest" must not move during the pull
    files = checked_files(got, f"{name}:{version}")
    partial = out.parent / f".{out.name}.partial"
    marker = out.parent / f".{out.name}.partial.json"
    holds = {"twin": f"{name}:{version}", "manifest": hashlib.sha256(got.manifest).hexdigest()}
    if (partial.exists() or partial.is_symlink()) and _held(marker) != holds:
        _remove(partial)  # left from another twin, or its marker is unreadable: start afresh
    partial.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(holds) + "\n")

    total = sum(f.size for f in files)
    offset = resume_offset(partial, files)
    paths = {f.path for f in files}
    request = pb.PullTwinRequest(twin=pb.TwinRef(name=name, version=version), offset=offset)
    started, sent = time.monotonic(), 0
    with (
        tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            desc=f"pull {name}:{version}",
            disable=not progress,
        ) as bar,
        _Appender(partial) as write,
    ):
        for chunk in stub.PullTwin(request):
            if chunk.offset != offset or chunk.path not in paths:
                raise RuntimeError(
                    f"catalog sent {chunk.path!r} at byte {chunk.offset}, expected byte {offset}"
                )
            write(chunk.path, chunk.data)
            offset += len(chunk.data)
            sent += len(chunk.data)
            bar.update(len(chunk.data))
            if limit_rate:
                time.sleep(max(0.0, sent / limit_rate - (time.monotonic() - started)))
    if offset != total:
        raise RuntimeError(
            f"the catalog stopped at byte {offset} of {total}; run the same pull to resume"
        )
    for f in files:
        if f.size == 0:  # an empty file sends no chunk
            (partial / f.path).parent.mkdir(parents=True, exist_ok=True)
            (partial / f.path).touch()
    (partial / MANIFEST).write_bytes(got.manifest)
    (partial / SIGNATURE).write_bytes(got.signature)
    result = verify_twin(partial, trusted)
    if not result.ok:
        shutil.rmtree(partial)
        marker.unlink()
        raise TwinRejected(f"{name}:{version} refused, nothing kept: " + "; ".join(result.problems))
    os.replace(partial, out)
    marker.unlink()
    return result


def checked_files(got: pb.GetManifestResponse, twin: str) -> list[pb.FileEntry]:
    """The catalog's file list, if it is exactly what the manifest lists (so every path is
    a plain path inside the twin); raises TwinRejected otherwise."""
    try:
        listed = manifest_files(json.loads(got.manifest))
    except (ValueError, RecursionError) as e:
        raise TwinRejected(f"{twin} refused, nothing written: {MANIFEST}: {e}") from None
    files = list(got.files)
    paths = [f.path for f in files]
    if sorted(paths) != sorted(listed) or any(f.size < 0 for f in files):
        raise TwinRejected(
            f"{twin} refused, nothing written: the catalog's file list does not match "
            f"{MANIFEST} ({len(paths)} files listed, {len(listed)} in the manifest)"
        )
    return files


def _held(marker: Path) -> dict | None:
    """Which twin a partial pull holds, by its marker file (None: unknown or unreadable)."""
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def resume_offset(partial: Path, files: list[pb.FileEntry]) -> int:
    """Bytes of the pull already on disk: whole files in order, then a partial one."""
    position = 0
    for f in files:
        path = partial / f.path
        size = path.stat().st_size if path.is_file() else 0
        if size > f.size:  # cannot be ours: fetch that file again
            path.unlink()
            size = 0
        if size < f.size:
            return position + size
        position += f.size
    return position


class _Appender:
    """Appends chunks to files under ``root``, keeping the current one open."""

    def __init__(self, root: Path):
        self.root, self.path, self.file = root, None, None

    def __enter__(self):
        return self

    def __call__(self, path: str, data: bytes) -> None:
        if path != self.path:
            self.close()
            target = self.root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            self.path, self.file = path, open(target, "ab")
        self.file.write(data)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.path, self.file = None, None

    def __exit__(self, *exc):
        self.close()


def publish(
    stub: pb_grpc.TwinCatalogStub,
    twin_dir: Path,
    name: str,
    version: str,
    modality: str = "OT",
    progress: bool = False,
) -> pb.TwinSummary:
    """Upload a signed twin. It is checked here first (as ``fedtwin verify``) and again
    at the catalog, against the consortium's key."""
    twin_dir = Path(twin_dir)
    check_name(name, "--name")
    check_name(version, "--version")
    local = verify_twin(twin_dir)
    if not local.ok:
        raise TwinRejected(f"{twin_dir} does not verify: " + "; ".join(local.problems))
    manifest = (twin_dir / MANIFEST).read_bytes()
    files = list(json.loads(manifest)["files"])
    header = pb.PublishHeader(
        name=name,
        version=version,
        modality=modality,
        manifest=manifest,
        signature=(twin_dir / SIGNATURE).read_bytes(),
    )

    def requests() -> Iterator[pb.PublishRequest]:
        yield pb.PublishRequest(header=header)
        for path in tqdm(files, desc=f"publish {name}:{version}", disable=not progress):
            with open(twin_dir / path, "rb") as f:
                data = f.read(CHUNK)
                yield pb.PublishRequest(data=pb.PublishData(path=path, data=data))  # even if empty
                while data := f.read(CHUNK):
                    yield pb.PublishRequest(data=pb.PublishData(path=path, data=data))

    return stub.PublishTwin(requests()).summary
