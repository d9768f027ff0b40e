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
import re
import secrets
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

from fedtwin.review.names import class_names_problem, reader_name

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

MAX_READERS = 100  # readers a study takes: far beyond a reader study; bounds the file
MAX_SESSIONS = 10  # a reader's live logins (browsers, devices); a new one ends the oldest
SESSION_S = 12 * 3600  # a login lasts a working day; then the reader gives their name again
DAMAGED = "restore it from a backup, or make a new study with another --db"
# What a study's rows must hold, each a query finding the first that does not (a damaged or
# crafted file): (table, column, expected, query of its key and value). :last is the last class.
_ROW_CHECKS = (
    ("items", "source", "'real' or 'twin'",
     "SELECT id, source FROM items WHERE source IS NOT 'real' AND source IS NOT 'twin'"),
    ("items", "label", "a class number 0 to {last}",
     "SELECT id, label FROM items WHERE typeof(label) != 'integer' "
     "OR label NOT BETWEEN 0 AND :last"),
    ("items", "token", "a text token",
     "SELECT id, token FROM items WHERE typeof(token) != 'text'"),
    ("items", "png", "a PNG image",
     "SELECT id, typeof(png) FROM items WHERE typeof(png) != 'blob'"),
    ("readers", "seed", "a whole number from 0",
     "SELECT rowid, seed FROM readers WHERE typeof(seed) != 'integer' OR seed < 0"),
    ("readings", "reader", "a reader's name",
     "SELECT rowid, reader FROM readings WHERE typeof(reader) != 'text' OR reader = ''"),
    ("readings", "item", "an image of the study",
     "SELECT rowid, item FROM readings WHERE item NOT IN (SELECT id FROM items)"),
    ("readings", "said_real", "0 or 1",
     "SELECT rowid, said_real FROM readings WHERE typeof(said_real) != 'integer' "
     "OR said_real NOT IN (0, 1)"),
    ("readings", "realism", "a whole number 1 to 5",
     "SELECT rowid, realism FROM readings WHERE typeof(realism) != 'integer' "
     "OR realism NOT BETWEEN 1 AND 5"),
    ("readings", "label", "a class number 0 to {last}",
     "SELECT rowid, label FROM readings WHERE typeof(label) != 'integer' "
     "OR label NOT BETWEEN 0 AND :last"),
)  # fmt: skip


class StudyFull(ValueError):
    """The study has its ``MAX_READERS`` readers: a new name cannot join."""


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
        problem = class_names_problem(list(class_names))
        if problem:
            raise ValueError(f"the twin's class names {list(class_names)!r}: {problem}")
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
        """Check that the file is a study, and that what it holds is what a study can hold:
        a clear error naming the field and row, not sqlite's, or a traceback, or counts
        that cannot be, later."""
        try:
            with self._db() as db:
                n = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
                db.execute("SELECT COUNT(*) FROM readings, sessions, study, readers LIMIT 1")
        except sqlite3.Error as e:
            raise ValueError(f"{self.path}: not a fedtwin reader study ({e})") from None
        if n == 0:
            raise ValueError(f"{self.path}: the study has no images")
        try:
            self._check_contents()
        except sqlite3.Error as e:
            self._damaged(f"cannot be read ({e})")

    def _damaged(self, problem: str) -> NoReturn:
        raise ValueError(f"{self.path}: damaged reader study: {problem}; {DAMAGED}")

    def _check_contents(self) -> None:
        """The class names, the twin's sha256, every row (``_ROW_CHECKS``), the pairs."""
        try:
            names = json.loads(self.meta("class_names"))
        except (ValueError, TypeError):
            names = None
        problem = class_names_problem(names)
        if problem:
            self._damaged(f"study.class_names is {_shown(self.meta('class_names'))}: {problem}")
        sha = self.meta("twin_images_sha256")
        if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
            self._damaged(f"study.twin_images_sha256 is {_shown(sha)}: expected 64 hex digits")
        last = len(names) - 1
        with self._db() as db:
            for table, column, expected, query in _ROW_CHECKS:
                row = db.execute(query, {"last": last}).fetchone()
                if row is not None:
                    self._damaged(
                        f"{table} row {row[0]}: {column} is {_shown(row[1])}, expected "
                        + expected.format(last=last)
                    )
            self._check_pairs(db, names)

    def _check_pairs(self, db: sqlite3.Connection, names: list[str]) -> None:
        """No reading twice of an image by one reader, as many real as twin images a class."""
        twice = db.execute(
            "SELECT reader, item FROM readings GROUP BY reader, item HAVING COUNT(*) > 1"
        ).fetchone()
        if twice is not None:
            self._damaged(f"readings: reader {_shown(twice[0])} read item {twice[1]} twice")
        unpaired = db.execute(
            "SELECT label, SUM(source = 'real'), SUM(source = 'twin') FROM items GROUP BY label "
            "HAVING SUM(source = 'real') != SUM(source = 'twin')"
        ).fetchone()
        if unpaired is not None:
            label, real, twin = unpaired
            self._damaged(
                f"items: class {names[label]!r} has {real} real and {twin} twin images; a study "
                "shows as many of each"
            )

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
        """A new session token for reader ``name``, as ``reader_name`` keeps it. A new name
        joins while the study has fewer than ``MAX_READERS`` (else ``StudyFull``); a reader
        keeps their ``MAX_SESSIONS`` latest logins, an older one ends."""
        name, token, now = reader_name(name), secrets.token_urlsafe(24), time.time()
        with self._db() as db:
            db.execute(  # one statement: concurrent logins cannot pass the bound together
                "INSERT OR IGNORE INTO readers SELECT ?, ?, ? "
                "WHERE (SELECT COUNT(*) FROM readers) < ?",
                (name, secrets.randbelow(2**62), now, MAX_READERS),
            )
            if db.execute("SELECT 1 FROM readers WHERE name = ?", (name,)).fetchone() is None:
                raise StudyFull(f"This study has its {MAX_READERS} readers; only they can log in.")
            db.execute("INSERT INTO sessions VALUES (?, ?, ?)", (token, name, now))
            db.execute(
                "DELETE FROM sessions WHERE reader = ? AND token NOT IN (SELECT token FROM "
                "sessions WHERE reader = ? ORDER BY created DESC, rowid DESC LIMIT ?)",
                (name, name, MAX_SESSIONS),
            )
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


def _shown(value: object) -> str:
    """A value read from a study file, short enough for one line of an error."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
