"""Where the catalog keeps twins: metadata in SQLite, file contents in a content-addressed
store on disk (``objects/ab/abcdef...``, named by sha256, shared between twins).

A twin becomes visible in one SQLite transaction after all its blobs are on disk, so a
half-uploaded twin is never listed; blobs are written to ``incoming/`` and renamed into
place, so a blob on disk is always whole. One store object holds a root at a time (a lock
file), so what it finds in ``incoming/`` when it opens was left by a killed upload and is
removed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from fedtwin.catalog.common import check_folder

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # 1 MiB: the unit of reads, writes and gRPC messages

SCHEMA = """
CREATE TABLE IF NOT EXISTS twins (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    modality TEXT NOT NULL,
    summary TEXT NOT NULL,          -- JSON: images, epsilon, audit verdict, ...
    manifest BLOB NOT NULL,
    signature BLOB NOT NULL,
    published_at TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS files (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    position INTEGER NOT NULL,      -- the pull order
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (name, version, position),
    FOREIGN KEY (name, version) REFERENCES twins (name, version)
);
"""


class AlreadyPublished(ValueError):
    pass


class BlobMismatch(ValueError):
    """Bytes received do not hash to what the manifest says; ``args[0]`` is their sha256."""


@dataclass(frozen=True)
class FileRecord:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class TwinRecord:
    name: str
    version: str
    modality: str
    summary: dict
    manifest: bytes
    signature: bytes
    published_at: str
    files: tuple[FileRecord, ...]


class CatalogStore:
    """The catalog's disk: ``root/catalog.db``, ``root/objects/``, ``root/incoming/``."""

    def __init__(self, root: Path):
        self.root = check_folder(Path(root))
        self.objects = self.root / "objects"
        self.incoming = self.root / "incoming"
        for d in (self.objects, self.incoming):
            check_folder(d).mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / "catalog.lock", "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise RuntimeError(f"{self.root}: another catalog serves this folder") from None
        stale = [p for p in self.incoming.iterdir() if p.is_file() or p.is_symlink()]
        for path in stale:
            path.unlink()
        if stale:
            log.info("removed %d unfinished upload(s) from %s", len(stale), self.incoming)
        try:
            with closing(self._connect()) as db, db:
                db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            self.close()
            raise ValueError(f"{self.root / 'catalog.db'}: not a catalog database ({e})") from e

    def close(self) -> None:
        """Let another store open the root."""
        self._lock.close()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.root / "catalog.db", timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA foreign_keys=ON")
        return db

    # ---- blobs -------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        return self.objects / sha256[:2] / sha256

    def put_blob(self, chunks: Iterable[bytes], expected: str | None = None) -> tuple[str, int]:
        """Store a stream of bytes; returns (sha256, size). Whole or not at all: with
        ``expected`` (a sha256) bytes that hash to anything else are dropped, and
        ``BlobMismatch`` is raised."""
        digest, size = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=self.incoming)
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            sha = digest.hexdigest()
            if expected is not None and sha != expected:
                raise BlobMismatch(sha)
            target = self.blob_path(sha)
            target.parent.mkdir(exist_ok=True)
            os.replace(tmp, target)
            return sha, size
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read_blob(self, sha256: str, start: int = 0) -> Iterator[bytes]:
        """The blob's bytes from ``start``, in chunks of at most ``CHUNK``."""
        with open(self.blob_path(sha256), "rb") as f:
            f.seek(start)
            while chunk := f.read(CHUNK):
                yield chunk

    # ---- twins -------------------------------------------------------------------------

    def add_twin(self, record: TwinRecord) -> None:
        """Make a twin visible; its blobs must already be stored."""
        for f in record.files:
            if not self.blob_path(f.sha256).is_file():
                raise FileNotFoundError(f"{f.path}: blob {f.sha256} is not in the store")
        try:
            with closing(self._connect()) as db, db:
                db.execute(
                    "INSERT INTO twins VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.name,
                        record.version,
                        record.modality,
                        json.dumps(record.summary),
                        record.manifest,
                        record.signature,
                        record.published_at,
                    ),
                )
                db.executemany(
                    "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (record.name, record.version, i, f.path, f.size, f.sha256)
                        for i, f in enumerate(record.files)
                    ],
                )
        except sqlite3.IntegrityError:
            raise AlreadyPublished(
                f"{record.name}:{record.version} is already published; use a new version"
            ) from None

    def has(self, name: str, version: str) -> bool:
        with closing(self._connect()) as db:
            row = db.execute(
                "SELECT 1 FROM twins WHERE name = ? AND version = ?", (name, version)
            ).fetchone()
        return row is not None

    def list_twins(self) -> list[TwinRecord]:
        with closing(self._connect()) as db:
            keys = db.execute("SELECT name, version FROM twins ORDER BY name, published_at")
            return [self.get(name, version, files=False) for name, version in keys.fetchall()]

    def get(self, name: str, version: str = "", files: bool = True) -> TwinRecord:
        """One twin; ``version`` empty = the latest published. ``files=False`` leaves the
        file list empty (a pull walks it with :meth:`iter_files` instead)."""
        with closing(self._connect()) as db:
            if version:
                row = db.execute(
                    "SELECT * FROM twins WHERE name = ? AND version = ?", (name, version)
                ).fetchone()
            else:
                row = db.execute(
                    "SELECT * FROM twins WHERE name = ? ORDER BY published_at DESC, rowid DESC "
                    "LIMIT 1",
                    (name,),
                ).fetchone()
        if row is None:
            what = f"{name}:{version}" if version else name
            raise KeyError(f"no twin {what} in the catalog")
        return TwinRecord(
            name=row[0],
            version=row[1],
            modality=row[2],
            summary=json.loads(row[3]),
            manifest=bytes(row[4]),
            signature=bytes(row[5]),
            published_at=row[6],
            files=tuple(self.iter_files(row[0], row[1])) if files else (),
        )

    def iter_files(self, name: str, version: str) -> Iterator[FileRecord]:
        """A twin's files in pull order, read from the database as they are consumed."""
        with closing(self._connect()) as db:
            rows = db.execute(
                "SELECT path, size, sha256 FROM files WHERE name = ? AND version = ? "
                "ORDER BY position",
                (name, version),
            )
            for row in rows:
                yield FileRecord(*row)

    def total_size(self, name: str, version: str) -> int:
        """Bytes of a twin's files (manifest and signature not included)."""
        with closing(self._connect()) as db:
            row = db.execute(
                "SELECT COALESCE(SUM(size), 0) FROM files WHERE name = ? AND version = ?",
                (name, version),
            ).fetchone()
        return int(row[0])
