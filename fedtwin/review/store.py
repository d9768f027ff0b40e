"""A reader study on the hospital's disk: one SQLite file.

``items`` holds the images shown (the hospital's own and the twin's, as PNG, each under a
random token that says nothing of its source), ``readers`` each reader's private shuffle
of them, ``readings`` one row per image a reader answered, and ``study`` what the study was
made of (the twin's images' sha256, the class names). The file holds copies of real images:
it stays at the hospital, like the archive it came from.
"""

from __future__ import annotations

import io
import json
import secrets
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS study (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    token TEXT UNIQUE NOT NULL,
    source TEXT NOT NULL CHECK (source IN ('real', 'twin')),
    label INTEGER NOT NULL,
    png BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS readers (
    name TEXT PRIMARY KEY, seed INTEGER NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (token TEXT PRIMARY KEY, reader TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS readings (
    reader TEXT NOT NULL,
    item INTEGER NOT NULL REFERENCES items(id),
    said_real INTEGER NOT NULL CHECK (said_real IN (0, 1)),
    realism INTEGER NOT NULL CHECK (realism BETWEEN 1 AND 5),
    label INTEGER NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (reader, item)
);
"""

MAX_NAME = 64  # a reader's name: what the login form accepts


@dataclass(frozen=True)
class Item:
    id: int
    token: str


def png(image: np.ndarray) -> bytes:
    """An (H, W) or (H, W, 3) uint8 image as PNG bytes, with no metadata."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def per_class_choice(
    labels: np.ndarray, n_classes: int, n: int, rng: np.random.Generator
) -> np.ndarray:
    """Indices of up to ``n`` images, as evenly over the classes as ``labels`` allows."""
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(n_classes)]
    chosen: list[int] = []
    taken = [0] * n_classes
    while len(chosen) < n and any(taken[c] < len(pools[c]) for c in range(n_classes)):
        for c in range(n_classes):
            if len(chosen) < n and taken[c] < len(pools[c]):
                chosen.append(int(pools[c][taken[c]]))
                taken[c] += 1
    return np.array(sorted(chosen), dtype=np.int64)


class Study:
    """One reader study (``path``, an SQLite file). Thread-safe enough for one web
    server: every call opens its own connection."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"{self.path}: no reader study here; `fedtwin review serve` makes one"
            )
        with self._db() as db:
            if db.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 0:
                raise ValueError(f"{self.path}: the study has no images")

    @classmethod
    def create(
        cls,
        path: Path,
        real: tuple[np.ndarray, np.ndarray],
        twin: tuple[np.ndarray, np.ndarray],
        class_names: Sequence[str],
        n_images: int,
        seed: int,
        twin_sha256: str,
    ) -> Study:
        """A new study of ``n_images`` images, half the hospital's (``real``), half the
        twin's, each half spread evenly over the classes. ``twin_sha256`` names the twin:
        the sha256 of its ``images.npz``, as its manifest lists it."""
        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path}: already exists")
        if n_images < 2:
            raise ValueError(f"--images {n_images}: a study needs at least 2 images")
        rng = np.random.default_rng(seed)
        rows = []
        for source, (images, labels), n in (
            ("real", real, n_images // 2),
            ("twin", twin, n_images - n_images // 2),
        ):
            labels = np.asarray(labels).reshape(-1)
            for i in per_class_choice(labels, len(class_names), n, rng):
                rows.append((source, int(labels[i]), png(images[i])))
        order = rng.permutation(len(rows))  # ids say nothing of the source either
        path.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(path) as db:
            db.executescript(SCHEMA)
            db.executemany(
                "INSERT INTO items (id, token, source, label, png) VALUES (?, ?, ?, ?, ?)",
                [(k + 1, secrets.token_hex(12), *rows[j]) for k, j in enumerate(order)],
            )
            meta = {
                "class_names": json.dumps(list(class_names)),
                "twin_images_sha256": twin_sha256,
                "created": str(time.time()),
            }
            db.executemany("INSERT INTO study VALUES (?, ?)", meta.items())
        return cls(path)

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.execute("PRAGMA foreign_keys = ON")
        return db

    def meta(self, key: str) -> str:
        with self._db() as db:
            row = db.execute("SELECT value FROM study WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise ValueError(f"{self.path}: the study lacks {key!r} (not a fedtwin study?)")
        return row[0]

    @property
    def class_names(self) -> list[str]:
        return json.loads(self.meta("class_names"))

    def image(self, token: str) -> bytes | None:
        with self._db() as db:
            row = db.execute("SELECT png FROM items WHERE token = ?", (token,)).fetchone()
        return None if row is None else row[0]

    # readers and their sessions

    def login(self, name: str) -> str:
        """A new session token for reader ``name`` (made on first login)."""
        name = name.strip()
        if not name or len(name) > MAX_NAME:
            raise ValueError(f"a reader's name is 1 to {MAX_NAME} characters")
        token = secrets.token_urlsafe(24)
        with self._db() as db:
            db.execute(
                "INSERT OR IGNORE INTO readers VALUES (?, ?, ?)",
                (name, secrets.randbelow(2**62), time.time()),
            )
            db.execute("INSERT INTO sessions VALUES (?, ?)", (token, name))
        return token

    def reader_of(self, session: str | None) -> str | None:
        if not session:
            return None
        with self._db() as db:
            row = db.execute("SELECT reader FROM sessions WHERE token = ?", (session,)).fetchone()
        return None if row is None else row[0]

    def order(self, reader: str) -> list[Item]:
        """Every image, in ``reader``'s own shuffled order (the same at every resume)."""
        with self._db() as db:
            (seed,) = db.execute("SELECT seed FROM readers WHERE name = ?", (reader,)).fetchone()
            items = db.execute("SELECT id, token FROM items ORDER BY id").fetchall()
        shuffle = np.random.default_rng(seed).permutation(len(items))
        return [Item(*items[i]) for i in shuffle]

    def answered(self, reader: str) -> set[int]:
        with self._db() as db:
            rows = db.execute("SELECT item FROM readings WHERE reader = ?", (reader,))
            return {r[0] for r in rows}

    def next_item(self, reader: str) -> tuple[Item | None, int, int]:
        """The reader's next unanswered image (None when done), how many they answered and
        how many there are."""
        order, done = self.order(reader), self.answered(reader)
        following = next((item for item in order if item.id not in done), None)
        return following, len(done), len(order)

    def record(self, reader: str, token: str, said_real: bool, realism: int, label: int) -> None:
        """One reading. A second answer to the same image (a double submit) is ignored."""
        if not 1 <= realism <= 5:
            raise ValueError(f"realism {realism}: expected 1 to 5")
        if not 0 <= label < len(self.class_names):
            raise ValueError(f"class {label}: expected 0 to {len(self.class_names) - 1}")
        with self._db() as db:
            row = db.execute("SELECT id FROM items WHERE token = ?", (token,)).fetchone()
            if row is None:
                raise ValueError("no such image in this study")
            db.execute(
                "INSERT OR IGNORE INTO readings VALUES (?, ?, ?, ?, ?, ?)",
                (reader, row[0], int(said_real), realism, label, time.time()),
            )

    def readings(self) -> list[dict]:
        """Every reading with its image's truth (source, label): for ``stats``, at the
        hospital. Reader names stay here."""
        with self._db() as db:
            rows = db.execute(
                "SELECT r.reader, i.source, i.label, r.said_real, r.realism, r.label "
                "FROM readings r JOIN items i ON i.id = r.item ORDER BY r.reader, r.at"
            ).fetchall()
        keys = ("reader", "source", "label", "said_real", "realism", "read_label")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def counts(self) -> dict:
        with self._db() as db:
            images = dict(db.execute("SELECT source, COUNT(*) FROM items GROUP BY source"))
            readers = db.execute("SELECT COUNT(DISTINCT reader) FROM readings").fetchone()[0]
        return {"images": images, "readers": readers}
