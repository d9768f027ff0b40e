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
CREATE TABLE IF NOT EXISTS sessions (
    token TEXT PRIMARY KEY, reader TEXT NOT NULL, created REAL NOT NULL
);
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
SESSION_S = 12 * 3600  # a login lasts a working day; then the reader gives their name again


@dataclass(frozen=True)
class Item:
    id: int
    token: str


def png(image: np.ndarray) -> bytes:
    """An (H, W) or (H, W, 3) uint8 image as PNG bytes, with no metadata and no
    compression: the length depends on the shape alone, so a real image's file cannot be
    told from a twin image's by its size (compressed, smoother twins were smaller)."""
    from PIL import Image

    buf = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    image.save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def paired_choice(
    real_labels: np.ndarray, twin_labels: np.ndarray, n_classes: int, n: int, rng
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of real and of twin images, as many of each in every class (so that 0.5 is
    chance in every class, not only overall), up to ``n`` in all, spread as evenly over the
    classes as the scarcer source allows."""
    real = [rng.permutation(np.flatnonzero(real_labels == c)) for c in range(n_classes)]
    twin = [rng.permutation(np.flatnonzero(twin_labels == c)) for c in range(n_classes)]
    pairs = [min(len(r), len(t)) for r, t in zip(real, twin, strict=True)]
    taken = [0] * n_classes
    while 2 * sum(taken) + 2 <= n and any(taken[c] < pairs[c] for c in range(n_classes)):
        for c in range(n_classes):
            if 2 * sum(taken) + 2 <= n and taken[c] < pairs[c]:
                taken[c] += 1
    pick = [np.concatenate([src[c][: taken[c]] for c in range(n_classes)]) for src in (real, twin)]
    return pick[0].astype(np.int64), pick[1].astype(np.int64)


class Study:
    """One reader study (``path``, an SQLite file). Thread-safe enough for one web
    server: every call opens its own connection."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"{self.path}: no reader study here; `fedtwin review serve` makes one"
            )
        self._open()

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
        """A new study of up to ``n_images`` images, half the hospital's (``real``), half
        the twin's, as many of each in every class (``paired_choice``; fewer images when a
        class is short of either). ``twin_sha256`` names the twin: the sha256 of its
        ``images.npz``, as its manifest lists it."""
        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path}: already exists")
        if n_images < 2:
            raise ValueError(f"--images {n_images}: a study needs at least 2 images")
        if real[0].shape[1:] != twin[0].shape[1:]:
            raise ValueError(
                f"the hospital's images are {real[0].shape[1:]} and the twin's "
                f"{twin[0].shape[1:]}: a reader would tell them apart by their shape"
            )
        rng = np.random.default_rng(seed)
        real_labels, twin_labels = (np.asarray(x[1]).reshape(-1) for x in (real, twin))
        picks = paired_choice(real_labels, twin_labels, len(class_names), n_images, rng)
        if len(picks[0]) == 0:
            raise ValueError("no class has both real and twin images to show")
        rows = []
        for source, (images, labels), index in zip(
            ("real", "twin"), ((real[0], real_labels), (twin[0], twin_labels)), picks, strict=True
        ):
            for i in index:
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

    def _open(self) -> None:
        """Check that the file is a study (a clear error, not sqlite's, if it is not)."""
        try:
            with self._db() as db:
                n = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
                db.execute("SELECT COUNT(*) FROM readings, sessions, study LIMIT 1")
        except sqlite3.Error as e:
            raise ValueError(f"{self.path}: not a fedtwin reader study ({e})") from None
        if n == 0:
            raise ValueError(f"{self.path}: the study has no images")

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
            db.execute("INSERT INTO sessions VALUES (?, ?, ?)", (token, name, time.time()))
        return token

    def logout(self, session: str | None) -> None:
        with self._db() as db:
            db.execute("DELETE FROM sessions WHERE token = ?", (session or "",))

    def reader_of(self, session: str | None) -> str | None:
        """The reader logged in with ``session``; None if unknown, ended or expired."""
        if not session:
            return None
        with self._db() as db:
            db.execute("DELETE FROM sessions WHERE created < ?", (time.time() - SESSION_S,))
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
        """The reader's answer for the image they are reading (their next unanswered one).
        A second answer to an image already answered (a double submit) is ignored."""
        if not 1 <= realism <= 5:
            raise ValueError(f"realism {realism}: expected 1 to 5")
        if not 0 <= label < len(self.class_names):
            raise ValueError(f"class {label}: expected 0 to {len(self.class_names) - 1}")
        following, _, _ = self.next_item(reader)
        if following is None or token != following.token:
            with self._db() as db:
                done = db.execute(
                    "SELECT 1 FROM readings r JOIN items i ON i.id = r.item "
                    "WHERE r.reader = ? AND i.token = ?",
                    (reader, token),
                ).fetchone()
            if done:
                return
            raise ValueError("that is not the image you are reading; here is your next one")
        with self._db() as db:
            db.execute(
                "INSERT OR IGNORE INTO readings VALUES (?, ?, ?, ?, ?, ?)",
                (reader, following.id, int(said_real), realism, label, time.time()),
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
