"""Fleet mode's exposers: each follows the shared ledger, and the one holding the lead serves it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from exporter.ledger import Ledger
from exporter.store import StateError, Store

log = logging.getLogger(__name__)

# An exposer reads the ledger rows other replicas changed this often, and takes or renews the lead as often.
EXPOSE_REFRESH_SECONDS = 1.0
# The lead is a lease on the database's clock: a leader that stops renewing (dead, frozen, cut off) leads no more
# after this, by its own clock too, and a standby takes over within this plus one refresh.
LEADER_LEASE_SECONDS = 5.0


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
        self._coordination = store.coordination()
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
                    leading = await self._coordination.try_lead(LEADER_LEASE_SECONDS)
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
