"""The SQLite state backend (WAL), the default: pending ids, dedupe memory, file checkpoints, the ledger's rows."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sqlite3
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from operator import itemgetter
from pathlib import Path

import orjson

from exporter.contribution import DAILY_METRICS
from exporter.coordination import Coordination, LocalCoordination
from exporter.ids import Labels, Sighting
from exporter.ledger import Ledger
from exporter.store import (
    ABANDONED,
    DONE,
    PENDING,
    Abandon,
    Checkpoint,
    Enqueued,
    FileHistory,
    LedgerRow,
    PendingId,
    Resolved,
    Retry,
    Settlement,
    StateDump,
    StateError,
    cannot,
    checkpoint_from_row,
)
from exporter.walcheckpoint import WAL_LIMIT_PAGES, WalCheckpointer

__all__ = [  # the records are the interface's (exporter.store); re-exported for the tests that import them here
    "ABANDONED", "DONE", "PENDING", "Abandon", "Checkpoint", "Enqueued", "FileHistory", "PendingId", "Resolved",
    "Retry", "Settlement", "StateError", "StateStore",
]

SCHEMA_VERSION = 3

# Pending ids live in an append-only log (rowid = arrival order). New ids are due `billing delay` after they
# arrive, so the due index is appended to as well: ingest never inserts into a B-tree at a random
# key, which caps a keyed table near 80k ids/s. Dedupe is done before the insert: against the pending ids by a
# 128-bit fingerprint kept in memory, and against finished ids (written at lookup rate) in their keyed table.
SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    source TEXT NOT NULL,
    labels TEXT NOT NULL,
    first_seen REAL NOT NULL,
    due REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS queue_by_due ON queue (due);
CREATE TABLE IF NOT EXISTS finished (
    id TEXT PRIMARY KEY,
    status INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    finished REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS finished_by_age ON finished (finished);
CREATE TABLE IF NOT EXISTS checkpoints (
    source TEXT NOT NULL,
    generation INTEGER NOT NULL,
    head BLOB NOT NULL,
    tail BLOB NOT NULL,
    offset INTEGER NOT NULL,
    finished INTEGER NOT NULL,
    device INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    PRIMARY KEY (source, generation)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS file_horizons (
    source TEXT PRIMARY KEY,
    horizon_ns INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ledger (
    metric TEXT NOT NULL,
    labels TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (metric, labels)
) WITHOUT ROWID;
-- Every id the state knows, as one relation (for people and tools reading the database).
CREATE VIEW IF NOT EXISTS generations (id, status, source, labels, first_seen, due, attempts, finished) AS
    SELECT id, 0, source, labels, first_seen, due, attempts, NULL FROM queue
    UNION ALL SELECT id, status, NULL, NULL, NULL, NULL, attempts, finished FROM finished;
"""

# Version 1 kept every id in one table keyed by id; its rows move to the queue and the finished table.
MIGRATE_FROM_1 = """
INSERT INTO queue (id, source, labels, first_seen, due, attempts)
    SELECT id, source, labels, first_seen, due, attempts FROM generations WHERE status = 0 ORDER BY first_seen;
INSERT INTO finished (id, status, attempts, finished)
    SELECT id, status, attempts, coalesce(finished, first_seen) FROM generations WHERE status != 0;
DROP TABLE generations;
"""

# Versions 1 and 2 kept one position per file source: it becomes the source's first checkpoint, unfinished, with
# no horizon yet (the file source sets it at its first scan: what was rotated before that position's file was
# read by the older exporter). Its fingerprint was the head's digest, then (from version 2) the tail's.
MIGRATE_POSITIONS = """
INSERT INTO checkpoints (source, generation, head, tail, offset, finished, device, inode, mtime_ns)
    SELECT source, 1, substr(fingerprint, 1, 18), substr(fingerprint, 19, 18), offset, 0, device, inode, 0
    FROM positions;
DROP TABLE positions;
"""


# A file up to this size is checked (PRAGMA quick_check, ~0.1 s at most) before the exporter starts; a larger
# one right after /readyz, in the background (0.4-0.8 s at a million pending ids).
CHECK_AT_OPEN_BYTES = 16 * 1024 * 1024
# Pending ids' fingerprints read per step at start-up (a short stall of the event loop each).
LOAD_CHUNK = 20_000

SET_VERSION = f"INSERT OR REPLACE INTO meta VALUES ('schema_version', '{SCHEMA_VERSION:d}');"  # noqa: S608 (a constant int)


@lru_cache(maxsize=4096)  # label values repeat (a few features, teams): encoded once, not per id
def _labels_text(labels: Labels) -> str:
    return json.dumps(labels) if labels else ""


@lru_cache(maxsize=4096)
def _labels_value(text: str) -> Labels:
    return tuple((str(k), str(v)) for k, v in json.loads(text)) if text else ()


def _integrity(db: sqlite3.Connection, *, close: bool = False) -> None:
    try:
        check = db.execute("PRAGMA quick_check").fetchone()[0]
    finally:
        if close:
            db.close()
    if check != "ok":
        raise sqlite3.DatabaseError(f"integrity check failed: {check}")


def fingerprint(generation_id: str) -> int:
    """128 bits from two independent SipHash values: the in-memory dedupe key of a pending id.

    64 bits would be expected to drop a real id as a "duplicate" about once a fleet-year at a million
    pending ids; at 128 bits a collision is far below the rate of undetected hardware errors.
    """
    return fingerprints((generation_id,))[0]


def fingerprints(generation_ids: Iterable[str]) -> list[int]:
    """`fingerprint` of each id, in one comprehension: a function call per id was a third of the dedupe's cost."""
    return [hash(i) & 0xFFFFFFFFFFFFFFFF | hash(i + "\x00") << 64 for i in generation_ids]


class StateStore:
    """The Store on one SQLite connection, used from the event loop thread only; each call is one transaction.

    Its coroutines do not wait for the database: SQLite answers in microseconds, so they do their work at once
    (the interface is async for PostgreSQL's round trips). The one exception is start-up: enqueue, settle and
    status first finish reading the dedupe memory (`complete_open`), yielding to the event loop between chunks.
    Driver errors leave as StateError naming the file and the operation.
    """

    shared = False

    def __init__(self, path: str | Path, *, max_pending: int) -> None:
        self.path = Path(path)
        self.max_pending = max_pending
        self._problem: str | None = None
        self._damage: str | None = None  # what the integrity check found: sticks until the file is moved aside
        self._checked = False
        self._paused_until = 0.0
        self.pending = 0  # counted by _open: this process is the queue's only writer, so it stays exact
        self._holder = self._hold()
        try:
            self._db = self._open()
        except BaseException:
            os.close(self._holder)
            raise
        # Fingerprints of the pending ids (the in-memory half of the dedupe), read after /readyz by
        # `complete_open` (a million take seconds); where the ids handed out by `due` sit in the queue.
        self._pending_ids: set[int] = set()
        self._loaded_upto: int | None = 0  # the last seq whose fingerprint is in _pending_ids; None: all are
        self._seq: dict[str, int] = {}

    def _hold(self) -> int:
        """An exclusive lock on the state file for as long as this process has it open (the kernel drops it with
        the process, kill -9 too): a second exporter on the same file would read each log twice."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)  # owner-only: the team's spend
        except OSError as err:
            raise StateError(f"{self.path}: cannot open the state database: {err.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # SQLite's own locks are fcntl's: no interference
        except OSError:
            os.close(fd)
            raise StateError(
                f"{self.path}: used by another running exporter: two processes on one state file would read each "
                "log twice. Give each its own state.path (or stop the other one).", "instance",
            ) from None
        return fd

    async def keep_instance(self) -> None:
        return None  # the lock is held while the file is open

    def _open(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a process crash (kill -9); only an OS crash may lose the last commits.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=5000")
            # Checkpoints run in WalCheckpointer's thread; this connection checkpoints only past the bound.
            db.execute(f"PRAGMA wal_autocheckpoint={WAL_LIMIT_PAGES:d}")
            # A small file is checked before anything else reads it; a large one after /readyz (complete_open).
            page_count, page_size = (db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_count", "page_size"))
            if page_count * page_size <= CHECK_AT_OPEN_BYTES:
                _integrity(db)
                self._checked = True
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID")
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = None if row is None else int(row[0])
            if version not in (None, 1, 2, SCHEMA_VERSION):
                raise StateError(f"{self.path}: schema version {version}, this exporter reads {SCHEMA_VERSION}")
            if version != SCHEMA_VERSION:
                script = SCHEMA.replace("CREATE VIEW", MIGRATE_FROM_1 + "CREATE VIEW") if version == 1 else SCHEMA
                if version is not None:
                    script += MIGRATE_POSITIONS
                db.executescript("BEGIN IMMEDIATE;" + script + SET_VERSION + "COMMIT;")
            self.pending = int(db.execute("SELECT count(*) FROM queue").fetchone()[0])
            self._checkpointer = WalCheckpointer(self.path)
            return db
        except sqlite3.OperationalError as err:
            # Full, read-only, unopenable or locked: the file is fine, its surroundings are not.
            raise StateError(f"{self.path}: cannot use the state database: {err}") from None
        except sqlite3.DatabaseError as err:
            raise self._unusable(err) from None
        except OSError as err:
            raise StateError(f"{self.path}: cannot open the state database: {err.strerror}") from None

    def _unusable(self, err: sqlite3.DatabaseError) -> StateError:
        return StateError(
            f"{self.path}: not a usable state database ({err}). Move it aside (keep it: it holds the ledger) "
            "and start again to begin with an empty state."
        )

    async def complete_open(self) -> None:
        """The part of opening that may follow /readyz: the dedupe memory (enqueue, settle and status wait for
        it), then, for a file too large to check at open, the integrity check.

        A damaged file raises StateError, as at open, and `problem` says so from then on."""
        await self._load_pending_ids()
        if self._checked:
            return
        # On a read-only connection of its own, in a thread: SQLite releases the GIL while it reads, so the event
        # loop keeps serving, and WAL lets it read while the main connection writes.
        db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        try:
            await asyncio.to_thread(_integrity, db, close=True)
        except asyncio.CancelledError:
            db.interrupt()  # the thread stops at once and closes it
            raise
        except sqlite3.OperationalError as err:  # locked or unreadable: the file may well be fine
            raise StateError(f"{self.path}: cannot check the state database: {err}", "status") from None
        except sqlite3.DatabaseError as err:
            error = self._unusable(err)
            self._damage = str(error)
            raise error from None
        self._checked = True

    async def _load_pending_ids(self) -> None:
        """Reads the pending ids' fingerprints in chunks, yielding to the event loop between them. Callers may
        run it side by side: each chunk is read and added in one step, so they share the work."""
        while self._loaded_upto is not None:
            try:
                rows = self._db.execute(
                    "SELECT seq, id FROM queue WHERE seq > ? ORDER BY seq LIMIT ?", (self._loaded_upto, LOAD_CHUNK)
                ).fetchall()
            except sqlite3.Error as err:
                raise self._error("count", err) from None
            self._pending_ids.update(fingerprints(map(itemgetter(1), rows)))
            self._loaded_upto = rows[-1][0] if len(rows) == LOAD_CHUNK else None
            if self._loaded_upto is not None:
                await asyncio.sleep(0)

    @property
    def problem(self) -> str | None:
        return self._damage or self._problem

    @problem.setter
    def problem(self, value: str | None) -> None:
        self._problem = value

    @property
    def description(self) -> str:
        return str(self.path)

    def _error(self, operation: str, err: sqlite3.Error) -> StateError:
        message = self.problem = f"{self.path}: {cannot(operation)}: {err}"
        return StateError(message, operation)

    async def close(self) -> None:
        self._checkpointer.close()
        self._db.close()
        os.close(self._holder)

    # --- ingest -------------------------------------------------------------------------------------------

    async def enqueue(
        self,
        source: str,
        sightings: Sequence[Sighting],
        now: float,
        due: float,
        checkpoint: Checkpoint | None = None,
        *,
        bounded: bool = True,
    ) -> Enqueued:
        """Adds ids (deduplicated) and, in the same transaction, the source's checkpoint."""
        await self._load_pending_ids()
        try:
            result = self._enqueue(source, sightings, now, due, checkpoint, bounded)
        except sqlite3.Error as err:
            raise self._error("enqueue", err) from None
        self.problem = None
        return result

    def _enqueue(
        self,
        source: str,
        sightings: Sequence[Sighting],
        now: float,
        due: float,
        checkpoint: Checkpoint | None,
        bounded: bool,
    ) -> Enqueued:
        # A file source waits instead (it checks `full` before each chunk), so it may pass one chunk beyond
        # the bound and loses nothing; UDP cannot wait, so its overflow is rejected and counted.
        room = max(self.max_pending - self.pending, 0) if bounded else len(sightings)
        admitted = sightings[:room]
        fresh = self._fresh(admitted)
        # Rows of one label set are inserted by one statement that reads the ids from a JSON array and skips
        # those already finished: SQLite does the per-id work, Python none.
        by_labels: dict[Labels, list[str]] = defaultdict(list)
        label_sets = set(map(itemgetter(1), fresh.values()))
        if len(label_sets) == 1:  # one label set (every UDP id, most files): no Python loop over the ids
            by_labels[label_sets.pop()] = list(map(itemgetter(0), fresh.values()))
        else:
            for generation_id, labels in fresh.values():
                by_labels[labels].append(generation_id)  # (a defaultdict: ~1/3 less than setdefault)
        with self._transaction():
            for labels, ids in by_labels.items():
                ids_json = orjson.dumps(ids).decode()  # (~5x less CPU than json.dumps; a blob is not JSON to SQLite)
                cursor = self._db.execute(
                    "INSERT INTO queue (id, source, labels, first_seen, due) SELECT value, ?, ?, ?, ? "
                    "FROM json_each(?) WHERE NOT EXISTS (SELECT 1 FROM finished WHERE finished.id = value)",
                    (source, _labels_text(labels), now, due, ids_json),
                )
                if cursor.rowcount != len(ids):  # some were resolved already (a file read again after a crash)
                    for (finished_id,) in self._db.execute(
                        "SELECT id FROM finished WHERE id IN (SELECT value FROM json_each(?))", (ids_json,)
                    ):
                        del fresh[fingerprint(finished_id)]
            if checkpoint is not None:
                self._save_checkpoint(source, checkpoint)
        self._pending_ids.update(fresh)
        accepted = len(fresh)
        self.pending += accepted
        return Enqueued(accepted, len(admitted) - accepted, len(sightings) - len(admitted))

    def _fresh(self, sightings: Sequence[Sighting]) -> dict[int, Sighting]:
        """The sightings whose ids are not pending, once each, by fingerprint."""
        keys = fingerprints(map(itemgetter(0), sightings))
        fresh = dict(zip(keys, sightings, strict=True))
        if len(fresh) == len(keys) and self._pending_ids.isdisjoint(keys):
            return fresh  # the usual batch: all new, no repeats (set operations in C, no loop here)
        pending = self._pending_ids
        fresh = {}
        for key, sighting in zip(keys, sightings, strict=True):
            if key not in pending and key not in fresh:
                fresh[key] = sighting
        return fresh

    async def file_history(self, source: str) -> FileHistory:
        try:
            rows = self._db.execute(
                "SELECT generation, head, tail, offset, finished, device, inode, mtime_ns FROM checkpoints "
                "WHERE source = ? ORDER BY generation",
                (source,),
            ).fetchall()
            horizon = self._db.execute("SELECT horizon_ns FROM file_horizons WHERE source = ?", (source,)).fetchone()
        except sqlite3.Error as err:
            raise self._error("position", err) from None
        return FileHistory(None if horizon is None else int(horizon[0]), tuple(map(checkpoint_from_row, rows)))

    async def save_checkpoint(self, source: str, checkpoint: Checkpoint) -> None:
        try:
            with self._transaction():
                self._save_checkpoint(source, checkpoint)
        except sqlite3.Error as err:
            raise self._error("position", err) from None

    def _save_checkpoint(self, source: str, c: Checkpoint) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (source, c.generation, c.head, c.tail, c.offset, int(c.finished), c.device, c.inode, c.mtime_ns),
        )

    async def forget_checkpoints(self, source: str, generations: Sequence[int], horizon_ns: int) -> None:
        try:
            with self._transaction():
                self._db.execute(
                    "DELETE FROM checkpoints WHERE source = ? AND generation IN (SELECT value FROM json_each(?))",
                    (source, json.dumps(list(generations))),
                )
                self._db.execute(
                    "INSERT INTO file_horizons VALUES (?, ?) ON CONFLICT (source) "
                    "DO UPDATE SET horizon_ns = max(horizon_ns, excluded.horizon_ns)",
                    (source, horizon_ns),
                )
        except sqlite3.Error as err:
            raise self._error("position", err) from None

    # --- resolving ----------------------------------------------------------------------------------------

    async def due(self, now: float, limit: int, exclude: set[str]) -> list[PendingId]:
        """Up to `limit` pending ids due by `now`, oldest due first, skipping those in flight."""
        try:
            rows = self._db.execute(
                "SELECT seq, id, source, labels, first_seen, attempts FROM queue WHERE due <= ? ORDER BY due LIMIT ?",
                (now, limit + len(exclude)),
            ).fetchall()
        except sqlite3.Error as err:
            raise self._error("due", err) from None
        found: list[PendingId] = []
        for seq, generation_id, source, labels, first_seen, attempts in rows:
            if generation_id in exclude:
                continue
            self._seq[generation_id] = seq
            found.append(PendingId(generation_id, source, _labels_value(labels), first_seen, attempts))
            if len(found) == limit:
                break
        return found

    async def next_due(self, now: float, exclude: set[str]) -> float | None:
        try:
            rows = self._db.execute("SELECT id, due FROM queue ORDER BY due LIMIT ?", (len(exclude) + 1,)).fetchall()
        except sqlite3.Error as err:
            raise self._error("due", err) from None
        return next((float(due) for id_, due in rows if id_ not in exclude), None)

    async def oldest_pending(self) -> float | None:
        # Arrival order is first-seen order: the oldest pending id is the first one left in the log.
        try:
            row = self._db.execute("SELECT first_seen FROM queue ORDER BY seq LIMIT 1").fetchone()
        except sqlite3.Error as err:
            raise self._error("oldest", err) from None
        return None if row is None else float(row[0])

    def _locate(self, generation_id: str) -> int | None:
        """Where a pending id sits in the queue: known for ids handed out by `due`, else looked for."""
        seq = self._seq.pop(generation_id, None)
        if seq is not None or fingerprint(generation_id) not in self._pending_ids:
            return seq
        row = self._db.execute("SELECT seq FROM queue WHERE id = ?", (generation_id,)).fetchone()
        return None if row is None else int(row[0])

    async def settle(self, settlements: Sequence[Settlement], ledger: Ledger, now: float) -> list[Settlement]:
        """Applies lookup results in one transaction; a result counts only if its id was still pending.

        Returns the settlements that took effect. The ledger sees the new values only after the commit,
        so /metrics never shows a value the database does not hold.
        """
        await self._load_pending_ids()
        try:
            applied = self._settle(settlements, ledger, now)
        except sqlite3.Error as err:
            raise self._error("settle", err) from None
        self.problem = None
        return applied

    def _settle(self, settlements: Sequence[Settlement], ledger: Ledger, now: float) -> list[Settlement]:
        overlay = ledger.overlay()
        applied: list[Settlement] = []
        finished: list[str] = []
        located = [(item, self._locate(item.id)) for item in settlements]
        # Resolved and abandoned ids leave the queue in one statement; the RETURNING rows say which were
        # still there (a result counts once) and how often each was tried.
        ending: dict[int, Resolved | Abandon] = {}
        for item, seq in located:
            if seq is not None and not isinstance(item, Retry):
                ending.setdefault(seq, item)  # two results for one id: the first counts, as it always did
        try:
            with self._transaction():
                if ending:
                    rows = self._db.execute(
                        "DELETE FROM queue WHERE seq IN (SELECT value FROM json_each(?)) RETURNING seq, attempts",
                        (json.dumps(list(ending)),),
                    ).fetchall()
                    records = []
                    for seq, attempts in sorted(rows):
                        ended = ending[seq]
                        status = DONE if isinstance(ended, Resolved) else ABANDONED
                        records.append((ended.id, status, attempts + 1, now))
                        finished.append(ended.id)
                        applied.append(ended)
                        if ended.contribution is not None:
                            ledger.add(overlay, ended.contribution)
                    self._db.executemany("INSERT OR REPLACE INTO finished VALUES (?, ?, ?, ?)", records)
                for item, seq in located:  # an id that ended above is not retried
                    if seq is not None and isinstance(item, Retry):
                        cursor = self._db.execute(
                            "UPDATE queue SET due = ?, attempts = ? WHERE seq = ?", (item.due, item.attempts, seq)
                        )
                        if cursor.rowcount == 1:
                            applied.append(item)
                self._db.executemany("INSERT OR REPLACE INTO ledger VALUES (?, ?, ?)", overlay.rows())
        except BaseException:
            for item, seq in located:  # nothing was written: these ids are still pending where they were
                if seq is not None and item.id not in self._seq:
                    self._seq[item.id] = seq
            raise
        ledger.apply(overlay)
        for generation_id in finished:
            self._pending_ids.discard(fingerprint(generation_id))
        self.pending -= len(finished)
        return applied

    async def ledger_rows(self) -> list[LedgerRow]:
        try:
            return self._db.execute("SELECT metric, labels, value FROM ledger").fetchall()
        except sqlite3.Error as err:
            raise self._error("ledger", err) from None

    async def drop_daily_outside(self, first: str, last: str) -> int:
        try:
            with self._transaction():
                cursor = self._db.execute(
                    "DELETE FROM ledger WHERE metric IN (SELECT value FROM json_each(?)) "
                    "AND json_extract(labels, '$[0]') NOT BETWEEN ? AND ?",
                    (json.dumps(sorted(DAILY_METRICS)), first, last),
                )
        except sqlite3.Error as err:
            raise self._error("forget", err) from None
        return cursor.rowcount

    async def dump(self) -> StateDump:
        """Everything the file holds, for import-state (read in one transaction)."""
        try:
            with self._transaction():
                queue = self._db.execute(
                    "SELECT id, source, labels, first_seen, due, attempts FROM queue ORDER BY seq"
                ).fetchall()
                finished = self._db.execute("SELECT id, status, attempts, finished FROM finished").fetchall()
                sources = {row[0] for row in self._db.execute("SELECT source FROM checkpoints")}
                sources |= {row[0] for row in self._db.execute("SELECT source FROM file_horizons")}
                ledger = self._db.execute("SELECT metric, labels, value FROM ledger").fetchall()
            files = {source: await self.file_history(source) for source in sorted(sources)}
        except sqlite3.Error as err:
            raise self._error("dump", err) from None
        return StateDump(queue, finished, files, ledger)

    async def ledger_changes(self) -> list[LedgerRow]:
        return []  # only this process writes the ledger, and settle has updated it already

    async def forget_finished(self, before: float, limit: int = 10_000) -> int:
        """Drops up to `limit` done/abandoned ids older than the dedupe window (the bound on the dedupe memory),
        in one short transaction; call again while it returns `limit`, yielding to the event loop in between."""
        try:
            with self._transaction():
                cursor = self._db.execute(
                    "DELETE FROM finished WHERE id IN (SELECT id FROM finished WHERE finished < ? LIMIT ?)",
                    (before, limit),
                )
        except sqlite3.Error as err:
            raise self._error("forget", err) from None
        return cursor.rowcount

    async def status(self, generation_id: str) -> int | None:
        await self._load_pending_ids()
        try:
            row = self._db.execute("SELECT status FROM finished WHERE id = ?", (generation_id,)).fetchone()
            if row is not None:
                return int(row[0])
            return PENDING if self._locate_pending(generation_id) else None
        except sqlite3.Error as err:
            raise self._error("status", err) from None

    async def refresh(self) -> None:
        """Nothing to re-count: `pending` is exact, this process being the queue's only writer."""

    def coordination(self) -> Coordination:
        return LocalCoordination()

    def _locate_pending(self, generation_id: str) -> bool:
        if fingerprint(generation_id) not in self._pending_ids:
            return False
        return self._db.execute("SELECT 1 FROM queue WHERE id = ?", (generation_id,)).fetchone() is not None

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db, self._checkpointer.committed)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error (the connection runs in autocommit mode)."""

    def __init__(self, db: sqlite3.Connection, committed: Callable[[], None]) -> None:
        self._db = db
        self._committed = committed

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        if kind is None:
            try:
                self._db.execute("COMMIT")
            except BaseException:
                # A COMMIT that fails (disk full, read-only) may leave the transaction open, and then every
                # later BEGIN would fail too: end it so the next write can succeed once the disk recovers.
                self._rollback()
                raise
            self._committed()
        else:
            self._rollback()

    def _rollback(self) -> None:
        if self._db.in_transaction:  # SQLite rolls back by itself after some errors (SQLITE_FULL, IOERR)
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
