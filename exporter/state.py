"""The durable state (SQLite, WAL): pending ids, dedupe memory, file positions and the ledger's rows."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from exporter.ids import Labels, Sighting
from exporter.ledger import Contribution, Ledger

SCHEMA_VERSION = 1
PENDING, DONE, ABANDONED = 0, 1, 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS generations (
    id TEXT PRIMARY KEY,
    status INTEGER NOT NULL,
    source TEXT NOT NULL,
    labels TEXT NOT NULL,
    first_seen REAL NOT NULL,
    due REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    finished REAL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pending_by_due ON generations (due) WHERE status = 0;
CREATE INDEX IF NOT EXISTS pending_by_age ON generations (first_seen) WHERE status = 0;
CREATE INDEX IF NOT EXISTS finished_by_time ON generations (finished) WHERE status != 0;
CREATE TABLE IF NOT EXISTS positions (
    source TEXT PRIMARY KEY,
    device INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    fingerprint BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ledger (
    metric TEXT NOT NULL,
    labels TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (metric, labels)
) WITHOUT ROWID;
"""


class StateError(Exception):
    """The state database cannot be used; the message says what to do."""


@dataclass(frozen=True, slots=True)
class FilePosition:
    """Where a file source stands: which file (device, inode, first bytes) and how far it has been read."""

    device: int
    inode: int
    offset: int
    fingerprint: bytes


@dataclass(frozen=True, slots=True)
class PendingId:
    id: str
    source: str
    labels: Labels
    first_seen: float
    attempts: int


@dataclass(frozen=True, slots=True)
class Resolved:
    id: str
    contribution: Contribution


@dataclass(frozen=True, slots=True)
class Retry:
    id: str
    due: float
    attempts: int


@dataclass(frozen=True, slots=True)
class Abandon:
    id: str
    reason: str
    # Metering without billing, counted when the give-up horizon passes (billing never arrived).
    contribution: Contribution | None = None


Settlement = Resolved | Retry | Abandon


@dataclass(frozen=True, slots=True)
class Enqueued:
    accepted: int
    duplicates: int
    rejected: int


class StateStore:
    """One SQLite connection, used from the event loop thread only; each call is one transaction."""

    def __init__(self, path: str | Path, *, max_pending: int) -> None:
        self.path = Path(path)
        self.max_pending = max_pending
        self._db = self._open()
        self.pending = int(self._db.execute("SELECT count(*) FROM generations WHERE status = 0").fetchone()[0])

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Created owner-only: the ids and the ledger are the team's spend.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            os.close(fd)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a process crash (kill -9); only an OS crash may lose the last commits.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=5000")
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check failed: {check}")
            db.executescript(SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise StateError(f"{self.path}: schema version {row[0]}, this exporter reads {SCHEMA_VERSION}")
            return db
        except sqlite3.DatabaseError as err:
            raise StateError(
                f"{self.path}: not a usable state database ({err}). Move it aside (keep it: it holds the ledger) "
                "and start again to begin with an empty state."
            ) from None
        except OSError as err:
            raise StateError(f"{self.path}: cannot open the state database: {err.strerror}") from None

    def close(self) -> None:
        self._db.close()

    # --- ingest -------------------------------------------------------------------------------------------

    def enqueue(
        self,
        source: str,
        sightings: Sequence[Sighting],
        now: float,
        due: float,
        position: FilePosition | None = None,
    ) -> Enqueued:
        """Adds ids (deduplicated) and, in the same transaction, the source's new position."""
        room = max(self.max_pending - self.pending, 0)
        admitted = sightings[:room]
        rows = [(s.id, source, json.dumps(s.labels) if s.labels else "", now, due) for s in admitted]
        with self._transaction():
            before = self._db.total_changes
            self._db.executemany(
                "INSERT INTO generations (id, status, source, labels, first_seen, due) VALUES (?, 0, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO NOTHING",
                rows,
            )
            accepted = self._db.total_changes - before
            if position is not None:
                self._save_position(source, position)
        self.pending += accepted
        return Enqueued(accepted, len(admitted) - accepted, len(sightings) - len(admitted))

    def position(self, source: str) -> FilePosition | None:
        row = self._db.execute(
            "SELECT device, inode, offset, fingerprint FROM positions WHERE source = ?", (source,)
        ).fetchone()
        return None if row is None else FilePosition(int(row[0]), int(row[1]), int(row[2]), bytes(row[3]))

    def save_position(self, source: str, position: FilePosition) -> None:
        with self._transaction():
            self._save_position(source, position)

    def _save_position(self, source: str, position: FilePosition) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO positions VALUES (?, ?, ?, ?, ?)",
            (source, position.device, position.inode, position.offset, position.fingerprint),
        )

    # --- resolving ----------------------------------------------------------------------------------------

    def due(self, now: float, limit: int, exclude: set[str]) -> list[PendingId]:
        """Up to `limit` pending ids due by `now`, oldest due first, skipping those in flight."""
        rows = self._db.execute(
            "SELECT id, source, labels, first_seen, attempts FROM generations "
            "WHERE status = 0 AND due <= ? ORDER BY due LIMIT ?",
            (now, limit + len(exclude)),
        ).fetchall()
        found = [
            PendingId(row[0], row[1], tuple(map(tuple, json.loads(row[2]))) if row[2] else (), row[3], row[4])
            for row in rows
            if row[0] not in exclude
        ]
        return found[:limit]

    def next_due(self, exclude: set[str]) -> float | None:
        rows = self._db.execute(
            "SELECT id, due FROM generations WHERE status = 0 ORDER BY due LIMIT ?", (len(exclude) + 1,)
        ).fetchall()
        return next((float(due) for id_, due in rows if id_ not in exclude), None)

    def oldest_pending(self) -> float | None:
        row = self._db.execute("SELECT min(first_seen) FROM generations WHERE status = 0").fetchone()
        return None if row[0] is None else float(row[0])

    def settle(self, settlements: Sequence[Settlement], ledger: Ledger, now: float) -> list[Settlement]:
        """Applies lookup results in one transaction; a result counts only if its id was still pending.

        Returns the settlements that took effect. The ledger sees the new values only after the commit,
        so /metrics never shows a value the database does not hold.
        """
        overlay = ledger.overlay()
        applied: list[Settlement] = []
        with self._transaction():
            for item in settlements:
                if isinstance(item, Retry):
                    cursor = self._db.execute(
                        "UPDATE generations SET due = ?, attempts = ? WHERE id = ? AND status = 0",
                        (item.due, item.attempts, item.id),
                    )
                else:
                    status = DONE if isinstance(item, Resolved) else ABANDONED
                    cursor = self._db.execute(
                        "UPDATE generations SET status = ?, finished = ?, attempts = attempts + 1 "
                        "WHERE id = ? AND status = 0",
                        (status, now, item.id),
                    )
                if cursor.rowcount != 1:
                    continue
                applied.append(item)
                if not isinstance(item, Retry) and item.contribution is not None:
                    ledger.add(overlay, item.contribution)
            self._db.executemany("INSERT OR REPLACE INTO ledger VALUES (?, ?, ?)", overlay.rows())
        ledger.apply(overlay)
        self.pending -= sum(1 for item in applied if not isinstance(item, Retry))
        return applied

    def ledger_rows(self) -> Iterator[tuple[str, str, str]]:
        yield from self._db.execute("SELECT metric, labels, value FROM ledger")

    def forget_finished(self, before: float) -> int:
        """Drops done/abandoned ids older than the dedupe window: the bound on the dedupe memory."""
        with self._transaction():
            cursor = self._db.execute("DELETE FROM generations WHERE status != 0 AND finished < ?", (before,))
        return cursor.rowcount

    def status(self, generation_id: str) -> int | None:
        row = self._db.execute("SELECT status FROM generations WHERE id = ?", (generation_id,)).fetchone()
        return None if row is None else int(row[0])

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error (the connection runs in autocommit mode)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        if kind is None:
            self._db.execute("COMMIT")
        else:
            self._db.execute("ROLLBACK")
