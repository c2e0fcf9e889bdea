"""What the processes sharing a state agree on: the account's rate limit and 429/422 pause, the label values
the fleet names, and who leads the exposers. Alone (a local state) or through the database (a fleet)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from exporter.pacing import RateLimit, SharedRateLimit, TokenBucket
from exporter.store import Grant

# Decides (label, value, cap) for every resolver: answers those named (the rest become "other").
LabelAdmission = Callable[[Sequence[tuple[str, str, int]]], Awaitable[set[tuple[str, str]]]]


class Coordination(Protocol):
    """One interface for both: callers never ask which backend they have."""

    # None: this process's LabelLimiter decides alone (nothing to agree with).
    label_admission: LabelAdmission | None

    def rate_limit(self, rate: float, burst: float) -> RateLimit:
        """What paces this process's lookups at `rate` a second (the whole fleet's, in a fleet)."""
        ...

    async def pause(self, seconds: float) -> None:
        """Tells every other resolver to pause `seconds` (the API said 429/422); this one pauses itself."""
        ...

    async def try_lead(self, lease_seconds: float) -> bool:
        """Whether this process leads the exposers for the next `lease_seconds` (alone: always)."""
        ...


class LocalCoordination:
    """The only process of its state: its own token bucket, no one to tell, always the leader."""

    label_admission: LabelAdmission | None = None

    def rate_limit(self, rate: float, burst: float) -> RateLimit:
        return TokenBucket(rate, burst)

    async def pause(self, seconds: float) -> None:
        return None

    async def try_lead(self, lease_seconds: float) -> bool:
        return True


class FleetState(Protocol):
    """The database calls a fleet coordinates through (PostgresStore)."""

    async def take_tokens(self, wanted: int, rate: float, burst: float) -> Grant: ...

    async def pause(self, seconds: float) -> None: ...

    async def try_lead(self, lease_seconds: float) -> bool: ...

    async def admit_labels(self, wanted: Sequence[tuple[str, str, int]]) -> set[tuple[str, str]]: ...


class SharedCoordination:
    """A fleet's: the account's rate limit and pause, label values and the lead held in the database."""

    def __init__(self, state: FleetState) -> None:
        self._state = state
        self.label_admission: LabelAdmission | None = state.admit_labels

    def rate_limit(self, rate: float, burst: float) -> RateLimit:
        return SharedRateLimit(self._state, rate, burst)

    async def pause(self, seconds: float) -> None:
        await self._state.pause(seconds)

    async def try_lead(self, lease_seconds: float) -> bool:
        return await self._state.try_lead(lease_seconds)
