"""The hospital's privacy ledger: SQLite on the hospital's own disk.

Every release derived from the hospital's images is an entry: the noisy class counts once,
then each local training round (noise multiplier, sample rate, steps) with the epsilon of
the whole ledger after it. An entry is committed together with the exact reply it pays
for, in one transaction, before the reply leaves the hospital. Hence:

- epsilon is recomputed from all entries (every run, every restart) by an Opacus
  accountant, never carried in process memory: a restarted node spends from where it was;
- a request the hospital has already answered (same kind, same request digest: the global
  weights and the round it asks for) gets the same reply again from the ledger and costs
  nothing more: sending an output twice is post-processing, so a round retried after a
  crash is not counted twice;
- a request that would pass the budget is refused, and the refusal is recorded.

The budget (``privacy.epsilon`` at ``privacy.delta`` in the hospital's own configuration)
is never read from the server.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from fedtwin.privacy import History, epsilon_spent

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,             -- labels | train
    request TEXT NOT NULL,          -- sha256 of what was asked (weights, round, config)
    run TEXT NOT NULL,              -- the federation run that asked, for the record
    round INTEGER NOT NULL,
    noise_multiplier REAL NOT NULL, -- 0: DP off (epsilon = inf)
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    epsilon REAL NOT NULL,          -- of the whole ledger after this entry, at delta
    delta REAL NOT NULL,
    at TEXT NOT NULL,
    reply BLOB,                     -- what was sent for it; kept for a retried request
    UNIQUE (kind, request)
);
CREATE TABLE IF NOT EXISTS federations (
    federation TEXT PRIMARY KEY,    -- the id the server sends with every round
    prior TEXT NOT NULL,            -- JSON: the accountant history before it joined
    at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS refusals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run TEXT NOT NULL,
    round INTEGER NOT NULL,
    reason TEXT NOT NULL,
    at TEXT NOT NULL
);
"""


# What ``fedtwin ledger show`` reads: a file without these is not a fedtwin ledger.
_COLUMNS = {
    "entries": {"id", "kind", "run", "round", "noise_multiplier", "sample_rate", "steps",
                "epsilon", "delta", "at"},
    "refusals": {"run", "round", "reason", "at"},
}  # fmt: skip


@dataclass(frozen=True)
class Entry:
    id: int
    kind: str
    request: str
    run: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon: float
    delta: float
    at: str


def digest(*parts: bytes | str) -> str:
    """sha256 over ``parts`` (length-prefixed, so the split between parts counts)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else bytes(part)
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _history(db: sqlite3.Connection) -> History:
    rows = db.execute("SELECT noise_multiplier, sample_rate, steps FROM entries ORDER BY id")
    return [tuple(r) for r in rows.fetchall()]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Ledger:
    """One hospital's ledger file. Opening it makes it if needed; it is never truncated.

    ``read_only`` opens an existing ledger without writing anything, not even the journal
    mode, and refuses a file that is not a fedtwin ledger (``fedtwin ledger show``).
    """

    def __init__(
        self, path: Path | str, delta: float, accountant: str = "rdp", *, read_only: bool = False
    ):
        self.path = Path(path)
        self.delta, self.accountant, self.read_only = float(delta), accountant, read_only
        if read_only:
            self._check_tables()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.executescript(SCHEMA)

    @classmethod
    def existing(cls, path: Path | str, delta: float | None = None) -> Ledger:
        """Open a ledger that must exist, read-only (``fedtwin ledger show``); ``delta``
        defaults to the one its latest entry was recorded at."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no privacy ledger here (a hospital's ledger is the path its node "
                f"config names as 'ledger'; the demo keeps them in <out>/ledgers/)"
            )
        if delta is not None and not 0 < delta < 1:
            raise ValueError(f"--delta {delta:g}: must lie between 0 and 1, e.g. 1e-5")
        ledger = cls(path, 1e-5 if delta is None else delta, read_only=True)
        if delta is None:
            with closing(ledger._connect()) as db:
                row = db.execute("SELECT delta FROM entries ORDER BY id DESC LIMIT 1").fetchone()
            if row is not None and not (isinstance(row[0], float) and 0 < row[0] < 1):
                raise ValueError(f"{path}: its entries record delta {row[0]!r}; pass --delta")
            ledger.delta = row[0] if row else ledger.delta
        return ledger

    def _check_tables(self) -> None:
        """Raise ValueError unless the file is a fedtwin ledger (its tables and columns)."""
        try:
            with closing(self._connect()) as db:
                for table, columns in _COLUMNS.items():
                    found = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                    if not columns <= found:
                        raise ValueError(
                            f"{self.path}: not a fedtwin privacy ledger (no table {table!r} "
                            f"with {', '.join(sorted(columns))}); nothing was changed"
                        )
        except sqlite3.Error as e:
            raise ValueError(f"{self.path}: not a fedtwin privacy ledger ({e})") from None

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:  # the URI's mode=ro: SQLite itself refuses any write
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            return sqlite3.connect(uri, uri=True, timeout=30)
        db = sqlite3.connect(self.path, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the reply leaves
        return db

    # ---- reading -----------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        with closing(self._connect()) as db:
            rows = db.execute(
                "SELECT id, kind, request, run, round, noise_multiplier, sample_rate, steps, "
                "epsilon, delta, at FROM entries ORDER BY id"
            ).fetchall()
        return [Entry(*row) for row in rows]

    def refusals(self) -> list[dict]:
        with closing(self._connect()) as db:
            rows = db.execute("SELECT run, round, reason, at FROM refusals ORDER BY id").fetchall()
        return [dict(zip(("run", "round", "reason", "at"), r, strict=True)) for r in rows]

    def history(self) -> History:
        """The accountant history of every entry: ``[(sigma, q, steps), ...]``."""
        with closing(self._connect()) as db:
            return _history(db)

    def epsilon(self, history: History | None = None) -> float:
        """Epsilon of ``history`` (default: the whole ledger) at the ledger's delta."""
        history = self.history() if history is None else history
        if any(sigma <= 0 for sigma, _, _ in history):
            return math.inf
        return epsilon_spent(history, self.delta, self.accountant)

    def answered(self, kind: str, request: str) -> bytes | None:
        """The reply already sent for this request, if there was one."""
        with closing(self._connect()) as db:
            row = db.execute(
                "SELECT reply FROM entries WHERE kind = ? AND request = ?", (kind, request)
            ).fetchone()
        return None if row is None else bytes(row[0] or b"")

    def last_reply(self, kind: str) -> bytes | None:
        """The newest reply still kept for ``kind`` (the weights a hospital last sent, for
        its canary audit), or None."""
        with closing(self._connect()) as db:
            row = db.execute(
                "SELECT reply FROM entries WHERE kind = ? AND reply IS NOT NULL "
                "ORDER BY id DESC LIMIT 1",
                (kind,),
            ).fetchone()
        return None if row is None else bytes(row[0])

    def prior(self, federation: str) -> History:
        """What the ledger had spent when ``federation`` first asked: the plan for that
        federation calibrates its noise for what is left. Recorded on first use, so the
        same federation (resumed, say) always plans from the same point."""
        with closing(self._connect()) as db, db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT prior FROM federations WHERE federation = ?", (federation,)
            ).fetchone()
            if row is not None:
                return [tuple(h) for h in json.loads(row[0])]
            history = _history(db)
            db.execute(
                "INSERT INTO federations VALUES (?, ?, ?)",
                (federation, json.dumps(history), _now()),
            )
            return history

    # ---- writing -----------------------------------------------------------------------

    def commit(
        self,
        kind: str,
        request: str,
        release: tuple[float, float, int],
        reply: bytes,
        *,
        run: str = "",
        round: int = 0,
    ) -> Entry:
        """Record one release (sigma, q, steps) and the reply it pays for, atomically.

        Raises ``ValueError`` if this request was answered already (use ``answered``)."""
        sigma, q, steps = (float(release[0]), float(release[1]), int(release[2]))
        at = _now()
        with closing(self._connect()) as db, db:
            db.execute("BEGIN IMMEDIATE")  # no other writer between reading and writing
            after = self.epsilon([*_history(db), (sigma, q, steps)])
            try:
                cur = db.execute(
                    "INSERT INTO entries (kind, request, run, round, noise_multiplier, "
                    "sample_rate, steps, epsilon, delta, at, reply) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (kind, request, str(run), int(round), sigma, q, steps,
                     after if math.isfinite(after) else -1.0, self.delta, at, reply),
                )  # fmt: skip
            except sqlite3.IntegrityError:
                raise ValueError(
                    f"{kind} request {request[:12]} is already in the ledger"
                ) from None
            return Entry(cur.lastrowid, kind, request, str(run), int(round), sigma, q, steps,
                         after, self.delta, at)  # fmt: skip

    def refuse(self, reason: str, *, run: str = "", round: int = 0) -> None:
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT INTO refusals (run, round, reason, at) VALUES (?, ?, ?, ?)",
                (str(run), int(round), reason, _now()),
            )

    def forget_old_replies(self, keep: int = 2) -> None:
        """Drop the stored replies of all but the newest ``keep`` training entries (the
        entries themselves stay: they are the accounting)."""
        with closing(self._connect()) as db, db:
            db.execute(
                "UPDATE entries SET reply = NULL WHERE kind = 'train' AND id NOT IN "
                "(SELECT id FROM entries WHERE kind = 'train' ORDER BY id DESC LIMIT ?)",
                (keep,),
            )

    # ---- showing -----------------------------------------------------------------------

    def describe(self, budget: float | None = None) -> str:
        lines = [f"privacy ledger {self.path} (delta {self.delta:g}, {self.accountant})"]
        lines.append(f"{'#':>4}  {'kind':<6} {'run':<12} {'round':>5}  {'sigma':>7} "
                     f"{'q':>7} {'steps':>5}  {'epsilon':>8}  at")  # fmt: skip
        for e in self.entries():
            eps = "inf" if e.epsilon < 0 else f"{e.epsilon:.3f}"
            lines.append(
                f"{e.id:>4}  {e.kind:<6} {e.run[:12]:<12} {e.round:>5}  {e.noise_multiplier:>7.3f} "
                f"{e.sample_rate:>7.4f} {e.steps:>5}  {eps:>8}  {e.at}"
            )
        total = self.epsilon()
        spent = "inf (DP off in some entry)" if math.isinf(total) else f"{total:.3f}"
        lines.append(f"spent: epsilon {spent}" + (f" of budget {budget:g}" if budget else ""))
        for r in self.refusals():
            lines.append(f"refused run {r['run']} round {r['round']} at {r['at']}: {r['reason']}")
        return "\n".join(lines)
