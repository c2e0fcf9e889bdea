"""Checkpoints a SQLite state's write-ahead log from a thread of its own, so the event loop never waits for one."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# A checkpoint copies the log's pages into the database file and syncs it: tens of milliseconds on a slow
# disk. Run by SQLite on the connection that commits (every 1,000 pages by default), it stalled the event
# loop long enough for the kernel's UDP buffer to overflow at 100,000 datagrams/s (hundreds of datagrams lost
# per 10 s; none with the checkpoints moved here). The worker checkpoints at most this often while commits
# come in: about as often as SQLite's own 1,000 pages came round under load (each checkpoint syncs the file,
# so 0.1 s cost resolve ~10 % more CPU), and a second of writes is well under the bound even at 100k ids/s.
CHECKPOINT_INTERVAL_SECONDS = 1.0
# The bound on the log's size if the worker falls behind (a disk slower than the writes): past it, SQLite
# checkpoints on the committing connection itself, as it did before, and the loop waits for it.
WAL_LIMIT_PAGES = 16_384  # 64 MiB of 4 KiB pages


class WalCheckpointer:
    """Owns a second connection to the state file and a thread that runs PASSIVE checkpoints on it (they never
    block the writer) when `committed` has been called since the last one, at most every interval."""

    def __init__(
        self,
        path: Path,
        *,
        interval: float = CHECKPOINT_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval = interval
        self._clock = clock
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._wake = threading.Event()
        self._stopping = False
        self._last_wake = -interval
        self.checkpoints = 0
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def committed(self) -> None:
        """Called after each commit on the writer's connection: cheap, wakes the worker at most every interval."""
        now = self._clock()
        if now - self._last_wake >= self._interval:
            self._last_wake = now
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            try:
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                self.checkpoints += 1
            except sqlite3.Error as err:  # the writer's own commits report a failing disk; this stays quiet
                log.debug("background checkpoint of the state database failed: %s", err)

    def close(self) -> None:
        """Stops the worker and closes its connection (before the writer's: the last to close checkpoints)."""
        self._stopping = True
        self._wake.set()
        self._thread.join()
        self._db.close()
