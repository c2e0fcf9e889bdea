"""The storage interface every state backend implements (SQLite, PostgreSQL), its records and its one error."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

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
    zenmux_exporter_state_errors_total counter; "" for opening."""

    def __init__(self, message: str, operation: str = "") -> None:
        super().__init__(message)
        self.operation = operation


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
    # source -> position
    positions: dict[str, FilePosition]
    ledger: list[LedgerRow]


class Store(Protocol):
    """The durable state: the queue of pending ids, the dedupe memory, file positions and the ledger.

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
        position: FilePosition | None = None,
        *,
        bounded: bool = True,
    ) -> Enqueued:
        """Adds ids not pending nor finished and, in the same transaction, the source's new position."""
        ...

    async def position(self, source: str) -> FilePosition | None: ...

    async def save_position(self, source: str, position: FilePosition) -> None: ...

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

    async def refresh(self) -> None:
        """Housekeeping: re-counts what `pending` reports (a shared queue changes under us)."""
        ...

    def coordination(self) -> Coordination:
        """What the processes of this state agree on (rate limit, pause, label values, the lead)."""
        ...

    async def close(self) -> None: ...
