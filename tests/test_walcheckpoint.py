"""The SQLite state's log is checkpointed by a worker thread, never by the connection that commits (below the bound)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from exporter.state import StateStore
from exporter.walcheckpoint import WAL_LIMIT_PAGES, WalCheckpointer
from tests.support import wait_until


def _writer(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")  # only the worker may copy the log into the file
    db.execute("CREATE TABLE t (x BLOB)")
    return db


def _write(db: sqlite3.Connection, rows: int) -> None:
    db.execute("BEGIN IMMEDIATE")
    db.executemany("INSERT INTO t VALUES (?)", [(b"x" * 1000,) for _ in range(rows)])
    db.execute("COMMIT")


async def test_a_commit_is_copied_into_the_database_file_by_the_worker(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    db = _writer(path)
    now = [0.0]
    checkpointer = WalCheckpointer(path, interval=1.0, clock=lambda: now[0])
    try:
        _write(db, 500)
        size = path.stat().st_size
        assert size < 100_000  # the rows are only in the log
        checkpointer.committed()
        await wait_until(lambda: path.stat().st_size > 500_000, what="the log copied into the file")
        assert checkpointer.checkpoints == 1
        _write(db, 500)
        checkpointer.committed()  # within the interval: no second checkpoint yet
        now[0] += 1.0
        _write(db, 500)
        checkpointer.committed()
        await wait_until(lambda: checkpointer.checkpoints == 2, what="a checkpoint once the interval passed")
        await wait_until(lambda: path.stat().st_size > 1_400_000, what="both later commits in the file")
    finally:
        checkpointer.close()
        db.close()


def test_close_stops_the_worker(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    db = _writer(path)
    checkpointer = WalCheckpointer(path)
    before = set(threading.enumerate())
    assert any(t.name == "sqlite-checkpoint" for t in before)
    checkpointer.close()
    assert not [t for t in before - set(threading.enumerate()) if t.is_alive()]
    assert len([t for t in threading.enumerate() if t.name == "sqlite-checkpoint"]) == (
        len([t for t in before if t.name == "sqlite-checkpoint"]) - 1
    )
    db.close()


async def test_the_state_checkpoints_inline_only_past_the_bound(tmp_path: Path) -> None:
    def workers() -> int:
        return len([t for t in threading.enumerate() if t.name == "sqlite-checkpoint"])

    before = workers()
    store = StateStore(tmp_path / "state.db", max_pending=1000)
    try:
        assert store._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == WAL_LIMIT_PAGES
        assert workers() == before + 1
    finally:
        await store.close()
    assert workers() == before
