"""The one path from any source into the durable queue: due times, dedupe, bounds and their counters."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import cast

from exporter.clock import Clock
from exporter.ids import QUEUE_FULL, Sighting
from exporter.store import Checkpoint, Enqueued, StateError, Store
from exporter.telemetry import SelfMetrics


class Ingest:
    """Sources hand parsed lines here; ids become pending, due after the billing delay."""

    def __init__(
        self,
        state: Store,
        metrics: SelfMetrics,
        clock: Clock,
        billing_delay_seconds: float,
        on_new_ids: Callable[[], None] = lambda: None,
    ) -> None:
        self._state = state
        self._metrics = metrics
        self._clock = clock
        self._delay = billing_delay_seconds
        self._on_new_ids = on_new_ids

    @property
    def full(self) -> bool:
        return self._state.pending >= self._state.max_pending

    async def submit(
        self,
        source: str,
        parsed: Iterable[Sighting | str],
        checkpoint: Checkpoint | None = None,
        *,
        bounded: bool = True,
    ) -> Enqueued:
        """Queues the sightings and counts the rejections; the checkpoint is saved in the same transaction.

        Raises StateError when the database cannot be written (disk full, read-only): then nothing of the
        batch was recorded or counted, and the source must keep it (or its checkpoint) to submit again.
        """
        items = parsed if isinstance(parsed, list) else list(parsed)
        # Two comprehensions (the second only when something was rejected) rather than a loop with a branch.
        rejections = [item for item in items if type(item) is str]
        # (mypy cannot narrow `type(item) is not str`: what is not a reason is a Sighting)
        sightings = cast(list[Sighting], [item for item in items if type(item) is not str] if rejections else items)
        rejected = Counter(rejections)
        now = self._clock.time()
        try:
            result = await self._state.enqueue(source, sightings, now, now + self._delay, checkpoint, bounded=bounded)
        except StateError as err:
            self._metrics.state_errors.labels("enqueue").inc()
            raise StateError(f"cannot record ids from {source}: {err}", "enqueue", reported=err.reported) from None
        if result.rejected:
            rejected[QUEUE_FULL] += result.rejected
        for reason, count in rejected.items():
            self._metrics.ids_rejected.labels(source, reason).inc(count)
        if sightings:
            self._metrics.ids_received.labels(source).inc(len(sightings) - result.rejected)
        if result.duplicates:
            self._metrics.ids_duplicate.labels(source).inc(result.duplicates)
        if result.accepted:
            self._on_new_ids()
        return result
