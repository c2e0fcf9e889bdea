"""The storage interface every state backend implements (SQLite, PostgreSQL), its records and its one error."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from exporter.contribution import Contribution
from exporter.ids import Labels, Sighting
from exporter.ledger import Ledger

if TYPE_CHECKING:
    from exporter.coordination import Coordination

PENDING, DONE, ABANDONED = 0, 1, 2

# A ledger row as stored: metric name, labels as a JSON array, value as JSON (a number, or {"b": buckets, "s": sum}).
LedgerRow = tuple[str, str, str]


class StateError(Exception):
    """The state database cannot be used; the message says which one and what to do (never a password).

    `operation` names the store call that failed (enqueue, position, settle, forget, ...), for the
    zenmux_exporter_state_errors_total counter; "" for opening. `reported`: the store has logged it (a shared
    database's outage is said once, by its store, not by every caller that meets it)."""

    def __init__(self, message: str, operation: str = "", *, reported: bool = False) -> None:
        super().__init__(message)
        self.operation = operation
        self.reported = reported


# What each store call was doing, in the log's words (the operation names are metric labels).
DOING = {
    "enqueue": "record new ids",
    "position": "read or save a file checkpoint",
    "instance": "hold this process's instance name",
    "due": "read the ids due for lookup",
    "oldest": "read the oldest pending id",
    "settle": "record lookup results",
    "ledger": "read the ledger",
    "forget": "forget old resolved ids",
    "status": "check the database",
    "count": "count the pending ids",
    "rate_limit": "share the rate limit",
    "leader election": "elect the leading exposer",
    "import": "import a state",
    "dump": "read the whole state",
}


def cannot(operation: str) -> str:
    """"cannot <what the operation was doing>", for a StateError's message."""
    return f"cannot {DOING.get(operation, operation)}"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """How far a file source has read one generation of its log (one life of the file's content, whatever its
    name or compression is now), and whether it has read all of it.

    A generation is known by its content: `head` digests its first min(offset, fingerprint bytes) bytes and
    `tail` the bytes just before `offset` (b"": not known, a position saved by an older exporter). Where it
    was last read (device, inode) and its mtime then are hints: the first spares decompressing a known copy
    again, the second orders files and bounds the history kept.
    """

    generation: int  # the source's serial number of this generation: the checkpoint's key
    head: bytes
    tail: bytes
    offset: int
    finished: bool
    device: int
    inode: int
    mtime_ns: int


def checkpoint_from_row(row: Sequence[Any]) -> Checkpoint:
    """A checkpoint from a row (generation, head, tail, offset, finished, device, inode, mtime_ns) of either
    backend."""
    generation, head, tail, offset, finished, device, inode, mtime_ns = row
    return Checkpoint(
        int(generation), bytes(head), bytes(tail), int(offset), bool(finished), int(device), int(inode), int(mtime_ns)
    )


@dataclass(frozen=True, slots=True)
class FileHistory:
    """A file source's checkpoints, and its horizon: a rotated file of no known generation last written at or
    before `horizon_ns` is history (read before its checkpoint expired, or there before the source's first
    start with start_at: end) and is never read. None: not set yet (a first start, or a state written by an
    exporter that kept one position per source)."""

    horizon_ns: int | None
    checkpoints: tuple[Checkpoint, ...]


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


@dataclass(frozen=True, slots=True)
class Grant:
    """Tokens taken from the fleet's rate limit: the bucket's balance once they were taken (below 0: owed, to
    be waited for at the configured rate), and how long the whole fleet is paused by a 429/422 (0: not)."""

    balance: float
    paused_seconds: float


@dataclass(frozen=True)
class StateDump:
    """A whole state, moved from a sidecar's SQLite file into a fleet's PostgreSQL database (import-state)."""

    # (id, source, labels as stored, first_seen, due, attempts)
    queue: list[tuple[str, str, str, float, float, int]]
    # (id, status, attempts, finished)
    finished: list[tuple[str, int, int, float]]
    # source -> its checkpoints and horizon
    files: dict[str, FileHistory]
    ledger: list[LedgerRow]


class Store(Protocol):
    """The durable state: the queue of pending ids, the dedupe memory, file checkpoints and the ledger.

    Every method that touches the database is a coroutine (PostgreSQL round trips must not block the event
    loop; SQLite answers at once) and raises only StateError. Each call is one transaction.
    """

    max_pending: int
    # True when other processes share this state (PostgreSQL): the ledger is the database's, not this process's.
    shared: bool

    @property
    def description(self) -> str:
        """Where the state lives, for log lines: a path, or host:port/database (never a password)."""
        ...

    @property
    def pending(self) -> int:
        """Ids waiting (SQLite: exact; PostgreSQL: the last count plus what this process added since)."""
        ...

    @property
    def problem(self) -> str | None:
        """Why the last database call failed, until one succeeds again (for /readyz)."""
        ...

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
        """Adds ids not pending nor finished and, in the same transaction, the source's checkpoint."""
        ...

    async def file_history(self, source: str) -> FileHistory: ...

    async def save_checkpoint(self, source: str, checkpoint: Checkpoint) -> None: ...

    async def forget_checkpoints(self, source: str, generations: Sequence[int], horizon_ns: int) -> None:
        """Drops those checkpoints and raises the source's horizon to at least `horizon_ns` (one transaction)."""
        ...

    async def due(self, now: float, limit: int, exclude: set[str]) -> list[PendingId]:
        """Up to `limit` ids due by `now`, oldest due first, not in `exclude` (this process's ids in flight).

        A shared backend claims them under a lease: no other process gets them until the lease expires. Ids
        claimed earlier by this instance and not in `exclude` (a settle that failed, a restart under the same
        name) are taken again at once."""
        ...

    async def next_due(self, now: float, exclude: set[str]) -> float | None:
        """When the next id not in `exclude` becomes due (None: nothing pending). A shared backend answers
        for ids no other process holds a claim on at `now` (a claim that runs out wakes the resolver's
        periodic check, not this)."""
        ...

    async def oldest_pending(self) -> float | None: ...

    async def settle(self, settlements: Sequence[Settlement], ledger: Ledger, now: float) -> list[Settlement]:
        """Applies lookup results in one transaction; a result counts only if its id was still pending.

        Returns the settlements that took effect. A local ledger sees the new values only after the commit."""
        ...

    async def ledger_rows(self) -> list[LedgerRow]:
        """Every ledger row (start-up; an exposer then follows `ledger_changes`)."""
        ...

    async def ledger_changes(self) -> list[LedgerRow]:
        """Ledger rows changed by any process since the previous call (the first call: every row).

        A backend whose ledger only this process writes returns nothing: its settle already updated it."""
        ...

    async def drop_daily_outside(self, first: str, last: str) -> int:
        """Deletes the per-day ledger rows (DAILY_METRICS) of days (YYYYMMDD) not in [first, last], whichever
        process wrote them; returns how many (the bound on the per-day rows)."""

    async def forget_finished(self, before: float, limit: int = 10_000) -> int:
        """Drops up to `limit` finished ids older than `before`; call again while it returns `limit`."""
        ...

    async def status(self, generation_id: str) -> int | None: ...

    async def keep_instance(self) -> None:
        """Renews this process's hold on its state (SQLite: the file's lock, held while open; PostgreSQL: the
        instance name's row); raises StateError("instance") if another process holds it now."""
        ...

    async def refresh(self) -> None:
        """Housekeeping: re-counts what `pending` reports (a shared queue changes under us)."""
        ...

    def coordination(self) -> Coordination:
        """What the processes of this state agree on (rate limit, pause, label values, the lead)."""
        ...

    async def close(self) -> None: ...
