"""Scheduling lookups: due ids, bounded concurrency, a token bucket, and settling results (as exporter/policy.py
decides them)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Coroutine, Mapping
from operator import attrgetter, itemgetter
from typing import Any

from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from exporter.clock import Clock
from exporter.config import ResolveConfig
from exporter.contribution import Contribution, contribution, labels_asked
from exporter.ledger import Ledger
from exporter.policy import Count, GiveUp, decide
from exporter.records import GenerationRecord, LookupResult, Outcome
from exporter.store import Abandon, PendingId, Resolved, Retry, Settlement, StateError, Store
from exporter.telemetry import SelfMetrics
from exporter.zenmux import ZenMuxClient

log = logging.getLogger(__name__)

STATE_ERROR_PAUSE_SECONDS = 1.0
MAX_WAIT_SECONDS = 5.0
# OpenMetrics caps an exemplar's label names and values at 128 characters in all.
EXEMPLAR_MAX_CHARS = 128
# Results are written together: a transaction (BEGIN/COMMIT, the ledger rows of every series touched) costs
# about as much as several lookups, so one per loop iteration (a few results) was ~20 % of the CPU per lookup.
# An id stays out of dispatch until its result is written, so batching never re-sends a lookup. At 50 ms a
# batch's fixed part (the commit, a ledger row per touched series) was still ~7 % of the CPU per lookup at
# ~500 lookups/s; 0.2 s quarters it, and a generation is counted at most 0.2 s later. (A failed write once left
# the run loop asleep for MAX_WAIT_SECONDS with the batch's ids due again: `_flush` wakes it either way.)
SETTLE_WINDOW_SECONDS = 0.2
# A shared database is a network round trip away and serves the whole fleet: results wait longer to be written
# in bigger batches (an id's billing delay is minutes; a second more before it is counted is nothing, and an
# exposer reads the ledger once a second anyway). A batch writes one ledger row per series it touches, and at a
# few hundred lookups a second a batch touches most of the series whatever its size: at 0.25 s the ledger rows
# were ~60 % of PostgreSQL's time per generation; a 1 s window writes each row a quarter as often.
SHARED_SETTLE_WINDOW_SECONDS = 1.0
SETTLE_MAX_BATCH = 512
# Due ids are read from the queue this many at a time and handed out from memory as slots free up, instead
# of one query (skipping every id in flight) per finished lookup.
DUE_PREFETCH = 256
CLAIM_FRACTION = 4


def exemplar_labels(generation_id: str, trace_id: str | None) -> dict[str, str]:
    """The exemplar's labels, the last dropped first while they are over OpenMetrics' 128 characters."""
    labels = {"generation_id": generation_id}
    size = len("generation_id") + len(generation_id)
    if trace_id is not None:
        labels["trace_id"] = trace_id
        size += len("trace_id") + len(trace_id)
    while labels and size > EXEMPLAR_MAX_CHARS:
        name, value = labels.popitem()
        size -= len(name) + len(value)
    return labels


# Label values already in the ledger are named whatever the caps say now.
SEEDED_CAP = 2**62


class Resolver:
    """Looks up due ids and settles each result in the state database, in batches."""

    def __init__(
        self,
        state: Store,
        ledger: Ledger,
        client: ZenMuxClient,
        config: ResolveConfig,
        *,
        concurrency: int,
        max_requests_per_second: float,
        metrics: SelfMetrics,
        tracer: Tracer,
        clock: Clock,
        rng: random.Random,
    ) -> None:
        self._state = state
        self._ledger = ledger
        self._client = client
        self._config = config
        self._concurrency = concurrency
        # The state's coordination: in a fleet the rate limit, a 429's pause and the label caps are the fleet's.
        self._coordination = state.coordination()
        self._bucket = self._coordination.rate_limit(
            max_requests_per_second, max(1.0, min(max_requests_per_second, concurrency))
        )
        self._metrics = metrics
        self._tracer = tracer
        self._clock = clock
        self._rng = rng
        self._inflight: dict[str, asyncio.Task[None]] = {}
        # Read when scraped, not set twice a lookup (each set takes the gauge's lock).
        metrics.inflight.set_function(self._inflight.__len__)
        self._wake = asyncio.Event()
        self.settled = asyncio.Event()  # set after every batch of results is recorded
        self._settling: list[Settlement] = []
        self._flush_handle: asyncio.Handle | None = None
        self._flushing: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[None]] = set()
        # Ids whose result waits in `_settling`, and due ids read ahead (oldest first), not yet dispatched.
        self._unsettled: set[str] = set()
        self._ready: deque[PendingId] = deque()
        self._paused_until = 0.0
        self._overflows_reported: dict[str, int] = {}
        self._warned: set[str] = set()
        self.draining = False
        self._children: dict[Outcome, tuple[Any, Any]] = {}
        self._admission = self._coordination.label_admission
        self._labels_seeded = False
        # The lookups that finish first all find the labels unseeded: one seeds, the others wait for it (each
        # read the whole ledger and asked the fleet about every value in it: 64 reads at concurrency 64).
        self._seeding = asyncio.Lock()

    def wake(self) -> None:
        self._wake.set()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def run(self, stop: asyncio.Event) -> None:
        """Dispatches due ids until `stop` is set; in-flight lookups are left to `finish`."""
        while not stop.is_set():
            self._wake.clear()
            now = self._clock.time()
            if now >= self._paused_until:
                free = self._concurrency - len(self._inflight)
                if free > 0 and len(self._ready) < free and not self._claim_later(free):
                    # A shared queue is claimed under a lease: take no more than can go soon (other replicas
                    # want work too); a local one is read ahead.
                    want = free if self._state.shared else max(free, DUE_PREFETCH)
                    try:
                        self._ready.extend(await self._state.due(now, want, self._busy_ids()))
                    except StateError as err:
                        self._state_error(err)
                ready = self._ready
                while ready and len(self._inflight) < self._concurrency:
                    await self._bucket.acquire()
                    if stop.is_set() or self._clock.time() < self._paused_until:
                        break
                    pending = ready.popleft()
                    self._inflight[pending.id] = asyncio.create_task(self._attempt(pending))
            await self._sleep(stop, await self._seconds_to_next_work())

    def _claim_later(self, free: int) -> bool:
        """A shared queue is claimed once a quarter of the slots are free (or none is busy), not for each slot
        that frees up: a claim is a round trip to the database, and a batch costs it little more than one id."""
        return self._state.shared and bool(self._inflight) and free < max(1, self._concurrency // CLAIM_FRACTION)

    def _busy_ids(self) -> set[str]:
        """Ids not to hand out again: in flight, read ahead, or with a result not yet written."""
        return self._inflight.keys() | self._unsettled | {pending.id for pending in self._ready}

    async def _seconds_to_next_work(self) -> float:
        now = self._clock.time()
        if now < self._paused_until:
            return min(self._paused_until - now, MAX_WAIT_SECONDS)
        if len(self._inflight) >= self._concurrency or self._claim_later(self._concurrency - len(self._inflight)):
            return MAX_WAIT_SECONDS  # a finishing lookup wakes us
        if self._ready:
            return 0.0
        try:
            due = await self._state.next_due(now, self._busy_ids())
        except StateError as err:
            self._state_error(err)
            return STATE_ERROR_PAUSE_SECONDS
        if due is None:
            return MAX_WAIT_SECONDS
        return min(max(due - now, 0.0), MAX_WAIT_SECONDS)

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def finish(self, grace_seconds: float) -> int:
        """Waits for in-flight lookups; those still running after the grace are cancelled and stay pending."""
        tasks = list(self._inflight.values())
        if tasks:
            _done, running = await asyncio.wait(tasks, timeout=grace_seconds)
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        if self._flushing:
            await asyncio.gather(*self._flushing, return_exceptions=True)
        await self._flush()
        if self._state.shared and self._ready:
            # Claimed but never sent: back to the fleet's queue now rather than when the lease runs out.
            now = self._clock.time()
            with contextlib.suppress(StateError):
                await self._state.settle([Retry(p.id, now, p.attempts) for p in self._ready], self._ledger, now)
            self._ready.clear()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        return len(tasks)

    async def _attempt(self, pending: PendingId) -> None:
        attempt = pending.attempts + 1
        started = time.monotonic()
        start_ns = time.time_ns()
        try:
            # The span is made once the answer is in, started when the lookup was (one attribute validation pass
            # and no context manager: a span started first and annotated after cost a quarter more). It is not
            # made the current one: nothing runs beneath it.
            try:
                result = await self._client.lookup(pending.id)
            except BaseException as err:
                # Cancelled (at shutdown, past the grace): recorded as the context manager would have.
                span = self._span(pending, attempt, start_ns, None)
                if span.is_recording():
                    span.record_exception(err, escaped=True)
                    span.set_status(Status(StatusCode.ERROR, f"{type(err).__name__}: {err}"))
                span.end()
                raise
            span = self._span(pending, attempt, start_ns, result)
            if result.outcome not in (Outcome.RESOLVED, Outcome.NOT_READY):
                span.set_status(Status(StatusCode.ERROR, f"{result.outcome.value}: {result.detail}"[:256]))
            span.end()
            context = span.get_span_context()
            sampled = context.is_valid and context.trace_flags.sampled
            trace_id = format(context.trace_id, "032x") if sampled else None
            duration = time.monotonic() - started
            children = self._children.get(result.outcome)
            if children is None:  # label lookups hash and lock every time: once per outcome
                value = result.outcome.value
                children = (self._metrics.lookups.labels(value), self._metrics.lookup_duration.labels(value))
                self._children[result.outcome] = children
            children[0].inc()
            # The health dashboard's lookup-duration panel shows exemplars: each links to its attempt's trace.
            exemplar = exemplar_labels(pending.id, trace_id)  # also the generation's (never changed once made)
            children[1].observe(duration, exemplar)
            if self._admission is not None and result.record is not None and not await self._admit_labels(
                result.record, pending
            ):
                return  # the fleet's caps cannot be asked: nothing written, the id is looked up again
            paused = self._paused_until
            self._settle(self._decide(pending, result, exemplar))
            if self._paused_until > paused:  # the limit is the account's: all pause
                self._in_background(self._coordination.pause(self._paused_until - self._clock.time()))
        finally:
            self._inflight.pop(pending.id, None)
            self._wake.set()

    def _span(self, pending: PendingId, attempt: int, start_ns: int, result: LookupResult | None) -> Span:
        return self._tracer.start_span(
            "zenmux.generation.lookup",
            kind=SpanKind.CLIENT,
            attributes=_attributes(pending, attempt, result),
            start_time=start_ns,
            record_exception=True,
        )

    def _decide(self, pending: PendingId, result: LookupResult, exemplar: Mapping[str, str]) -> Settlement:
        """The policy's settlement of `result`, with what goes around it: the auth gauge and log, pausing."""
        outcome = result.outcome
        if outcome is Outcome.UNAUTHORIZED:
            self._metrics.auth_failing.set(1)
            self._warn_once(
                "auth",
                "ZenMux rejects the API key (%s, request id %s): ids stay pending until the key is fixed",
                result.detail,
                result.request_id,
            )
        elif outcome in (Outcome.RESOLVED, Outcome.NOT_READY) and "auth" in self._warned:
            log.info("ZenMux accepts the API key again")
            self._metrics.auth_failing.set(0)
            self._warned.discard("auth")
        elif outcome is Outcome.MALFORMED:
            log.warning("malformed response for %s (request id %s): %s", pending.id, result.request_id, result.detail)
        decision = decide(pending, result, self._clock.time(), self._config, rng=self._rng, draining=self.draining)
        if isinstance(decision, Count):
            return Resolved(pending.id, self._contribution(decision.record, pending, exemplar))
        if isinstance(decision, GiveUp):
            metering = decision.metering
            counted = None if metering is None else self._contribution(metering, pending, exemplar)
            return Abandon(pending.id, decision.reason, counted)
        if decision.pause_until is not None:
            self._pause(decision.pause_until)
        return Retry(pending.id, decision.due, decision.attempts)

    async def _admit_labels(self, record: GenerationRecord, pending: PendingId) -> bool:
        """Has the fleet decide the label values of `record` this resolver has not seen decided (a round trip
        only for those: a fleet's first sightings of a model, a feature, ...); False if it cannot be asked."""
        assert self._admission is not None
        limiter = self._ledger.limiter
        try:
            if not self._labels_seeded:
                async with self._seeding:
                    if not self._labels_seeded:
                        # What the ledger already names is named for good (a database from before the fleet's caps).
                        Ledger(self._ledger.shape, limiter).load(await self._state.ledger_rows())
                        await self._admission([(label, value, SEEDED_CAP) for label, value in limiter.known()])
                        self._labels_seeded = True
            undecided = {
                (label, value[: limiter.max_length])
                for label, value in labels_asked(record, dict(pending.labels), self._ledger.shape)
                if not limiter.decided(label, value)
            }
            if not undecided:
                return True
            wanted = [(label, value, limiter.cap(label)) for label, value in sorted(undecided)]
            named = await self._admission(wanted)
        except StateError as err:
            self._state_error(err)
            return False
        for label, value, _cap in wanted:
            if (label, value) in named:
                limiter.remember(label, value)
            else:
                limiter.refuse(label, value)
        return True

    def _contribution(self, record: GenerationRecord, pending: PendingId, exemplar: Mapping[str, str]) -> Contribution:
        extra: Mapping[str, str] = dict(pending.labels)
        return contribution(record, extra, self._ledger.shape, self._ledger.limiter, exemplar)

    def _pause(self, until: float) -> None:
        self._paused_until = max(self._paused_until, until)

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and isinstance(error := task.exception(), StateError):
            self._state_error(error)

    def _state_error(self, err: StateError) -> None:
        """A read that failed: logged once until the state answers again (settle failures count separately)."""
        if not err.reported:
            self._warn_once("state", "%s; retrying", err)

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    def _settle(self, settlement: Settlement) -> None:
        self._settling.append(settlement)
        self._unsettled.add(settlement.id)
        if len(self._settling) >= SETTLE_MAX_BATCH:
            if self._flush_handle is not None:
                self._flush_handle.cancel()
            self._flush_handle = asyncio.get_running_loop().call_soon(self._start_flush)
        elif self._flush_handle is None:
            window = SHARED_SETTLE_WINDOW_SECONDS if self._state.shared else SETTLE_WINDOW_SECONDS
            self._flush_handle = asyncio.get_running_loop().call_later(window, self._start_flush)

    def _start_flush(self) -> None:
        task = asyncio.get_running_loop().create_task(self._flush())
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        batch, self._settling = self._settling, []
        if not batch:
            return
        try:
            applied = await self._state.settle(batch, self._ledger, self._clock.time())
        except Exception as err:
            # Nothing was written: the ids are still pending and will be looked up again.
            self._metrics.state_errors.labels("settle").inc()
            if not getattr(err, "reported", False):
                log.error("cannot record %d lookup results in the state database: %s", len(batch), err)
            self._pause(self._clock.time() + STATE_ERROR_PAUSE_SECONDS)
            return
        finally:
            self._unsettled.difference_update(map(_ID, batch))  # written or not, they may go out again
            # The run loop left these ids out of its next due time: it may be asleep for MAX_WAIT_SECONDS while
            # they are due again (retries; all of them after a failed write, once its pause is over).
            self._wake.set()
        self._warned.discard("state")
        self.settled.set()
        for item in applied:
            if isinstance(item, Resolved) and not _has_cost(item.contribution):
                self._metrics.billing_unavailable.labels("subscription_key").inc()
                self._warn_once(
                    "subscription",
                    "the API key is a subscription key: ZenMux gives it tokens but no billing, so cost "
                    "metrics stay empty (tokens, latency and retries are exported)",
                )
            elif isinstance(item, Abandon):
                self._metrics.abandoned.labels(item.reason).inc()
                if item.contribution is not None:
                    self._metrics.billing_unavailable.labels("gave_up_waiting").inc()
        for label, count in self._ledger.limiter.overflows.items():
            reported = self._overflows_reported.get(label, 0)
            if count > reported:
                self._metrics.label_overflow.labels(label).inc(count - reported)
                self._overflows_reported[label] = count


def _has_cost(item: Contribution) -> bool:
    return any(map(_IS_COST, map(_METRIC, item.increments)))  # iterated in C: ~20 increments a generation


_ID = attrgetter("id")
_METRIC = itemgetter(0)
_IS_COST = "zenmux_cost_usd".__eq__


def _attributes(pending: PendingId, attempt: int, result: LookupResult | None) -> dict[str, str | int]:
    """The lookup span's attributes: the attempt's, then (once answered) what the answer said."""
    attributes: dict[str, str | int] = {
        "zenmux.generation.id": pending.id,
        "zenmux.attempt": attempt,
        "zenmux.source": pending.source,
    }
    if result is None:
        return attributes
    attributes["zenmux.outcome"] = result.outcome.value
    if result.status is not None:
        attributes["http.response.status_code"] = result.status
    if result.request_id:
        attributes["zenmux.request_id"] = result.request_id[:128]
    if result.record is not None:
        attributes["gen_ai.request.model"] = result.record.model[:256]
        attributes["zenmux.protocol"] = result.record.protocol[:64]
    return attributes
