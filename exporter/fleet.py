"""Fleet mode's coordination through the shared state: one rate limit for the account, one exposer leading."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from exporter.ledger import Ledger
from exporter.store import StateError, Store

log = logging.getLogger(__name__)

# Tokens are taken from the shared bucket a few at a time (one round trip per batch, not per lookup) and
# must be used soon: kept longer, a replica could spend them later in a burst the account does not allow.
GRANT_SECONDS = 0.25
GRANT_TTL_SECONDS = 1.0
STATE_RETRY_SECONDS = 1.0
# An exposer reads the ledger rows other replicas changed this often, and takes or renews the lead as often.
EXPOSE_REFRESH_SECONDS = 1.0
# The lead is a lease on the database's clock: a leader that stops renewing (dead, frozen, cut off) leads no more
# after this, by its own clock too, and a standby takes over within this plus one refresh.
LEADER_LEASE_SECONDS = 5.0


class SharedRateLimit:
    """The account's rate limit, held in the state database for every resolver (resolver.RateLimit).

    Each batch of tokens is taken in one statement that also returns the fleet's 429/422 pause: `acquire`
    waits out the pause, then the debt the batch left (a bucket in debt means others took tokens first)."""

    def __init__(
        self,
        store: Store,
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


class Exposer:
    """Keeps an exposer's ledger current from the shared database and tells whether it leads.

    Leadership is a lease in the database (PostgreSQL: a row with an expiry on the database's clock): the
    leader serves the business series, followers only their own metrics, so the fleet's series exist once.
    Every exposer follows the ledger, so a follower that takes over serves current values at once."""

    def __init__(
        self,
        store: Store,
        ledger: Ledger,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._ledger = ledger
        self._monotonic = monotonic
        self._leading = False
        self._lead_until = 0.0  # monotonic: when the lease last granted runs out, as this process can tell

    @property
    def leading(self) -> bool:
        """Leading, and within the lease: a leader frozen or cut off past it stops serving the fleet's series
        at once when it wakes (a standby may lead by then), not at its next renewal."""
        return self._leading and self._monotonic() < self._lead_until

    async def run(self, stop: asyncio.Event) -> None:
        loaded = False  # an exposer that never read the ledger does not lead: it would serve zeros
        while not stop.is_set():
            with contextlib.suppress(StateError):  # the store logs and /readyz reports the outage
                self._ledger.load(await self._store.ledger_changes())
                loaded = True
            if loaded:
                # The lease is counted from before the request: the database granted it no earlier than that.
                asked = self._monotonic()
                try:
                    leading = await self._store.try_lead(LEADER_LEASE_SECONDS)
                except StateError:
                    leading = False
                if leading:
                    self._lead_until = asked + LEADER_LEASE_SECONDS
                if leading != self._leading:
                    log.info("%s the exposers: %s the fleet's business series",
                             "leading" if leading else "following", "serving" if leading else "not serving")
                self._leading = leading
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), EXPOSE_REFRESH_SECONDS)
