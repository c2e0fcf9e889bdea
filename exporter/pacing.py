"""Pacing requests: the RateLimit interface, a process's own token bucket, and the fleet's shared one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from exporter.store import Grant, StateError

# Tokens are taken from the shared bucket a few at a time (one round trip per batch, not per lookup) and
# must be used soon: kept longer, a replica could spend them later in a burst the account does not allow.
GRANT_SECONDS = 0.25
GRANT_TTL_SECONDS = 1.0
STATE_RETRY_SECONDS = 1.0


class RateLimit(Protocol):
    """Paces lookups: `acquire` returns when one more request may go (TokenBucket, or the fleet's SharedRateLimit)."""

    async def acquire(self) -> None: ...


class TokenBucket:
    """At most `rate` acquisitions a second on average, bursts up to `burst`.

    It paces real requests, so it reads a monotonic clock and sleeps on the event loop; tests pass their own.
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._monotonic = monotonic
        self._sleep = sleep
        self._last = monotonic()

    async def acquire(self) -> None:
        now = self._monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate) - 1
        self._last = now
        if self._tokens < 0:
            # The token is taken now and owed: wait until it has been earned. (Waiting and then checking again
            # could spin on rounding: a wait of 1e-15 s may not move a float clock at all.)
            await self._sleep(-self._tokens / self._rate)


class TokenSource(Protocol):
    """Where a fleet's tokens are kept (PostgresStore)."""

    async def take_tokens(self, wanted: int, rate: float, burst: float) -> Grant: ...


class SharedRateLimit:
    """The account's rate limit, held in the state database for every resolver.

    Each batch of tokens is taken in one statement that also returns the fleet's 429/422 pause: `acquire`
    waits out the pause, then the debt the batch left (a bucket in debt means others took tokens first)."""

    def __init__(
        self,
        store: TokenSource,
        rate: float,
        burst: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._store = store
        self._rate = rate
        self._burst = burst
        self._batch = max(1, min(int(burst), int(rate * GRANT_SECONDS)))
        self._monotonic = monotonic
        self._sleep = sleep
        # Tokens in hand: when each may be used (monotonic), and when the grant expires.
        self._slots: list[float] = []
        self._expires = 0.0

    async def acquire(self) -> None:
        while True:
            now = self._monotonic()
            if self._slots and now < self._expires:
                at = self._slots.pop()
                if at > now:
                    await self._sleep(at - now)
                return
            try:
                grant = await self._store.take_tokens(self._batch, self._rate, self._burst)
            except StateError:
                await self._sleep(STATE_RETRY_SECONDS)  # no tokens without the database: nothing goes out
                continue
            if grant.paused_seconds > 0:
                await self._sleep(grant.paused_seconds)  # these tokens are spent: the pause is the fleet's
                continue
            now = self._monotonic()
            balance = grant.balance
            # The i-th token of the batch is owed until the bucket has refilled past it; the last popped first.
            self._slots = [now + max(-(balance + i), 0.0) / self._rate for i in range(self._batch)]
            self._expires = now + GRANT_TTL_SECONDS + max(-balance, 0.0) / self._rate
