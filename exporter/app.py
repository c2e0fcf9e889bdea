"""Wires config, sources, state, resolver, ledger and HTTP together; owns start-up, shutdown and the drain."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import prometheus_client
from prometheus_client import CollectorRegistry

from exporter.clock import Clock, SystemClock
from exporter.config import (
    Config,
    ConfigError,
    UdpSourceConfig,
    instance_name,
    read_state_password,
    split_host_port,
)
from exporter.contribution import LabelLimiter, LedgerShape
from exporter.endpoints import Endpoints
from exporter.exposition import LedgerExposition
from exporter.fleet import Exposer
from exporter.ids import datagrams_parser_for, lines_parser_for
from exporter.ingest import Ingest
from exporter.ledger import Ledger
from exporter.resolver import Resolver
from exporter.sources.file import FileSource
from exporter.sources.udp import UdpSource
from exporter.state import StateStore
from exporter.store import StateError, Store
from exporter.telemetry import HttpCollector, QueueCollector, SelfMetrics, tracer_provider
from exporter.web import REJECT_REASONS, HttpServer
from exporter.webconfig import WebConfig, load_web_config
from exporter.zenmux import ZenMuxClient

if TYPE_CHECKING:  # the reconcile modules are imported where a management key is set, after /readyz
    import httpx
    from opentelemetry.sdk.trace import TracerProvider

    from exporter.reconcile import Reconciler

log = logging.getLogger(__name__)

# The oldest-pending gauge is refreshed this often: alerts on it look at minutes, and every wakeup of an
# idle sidecar costs CPU.
HOUSEKEEPING_SECONDS = 5.0
# An ingest-only process of a fleet counts the shared queue this seldom, only to hold state.max_pending: between
# counts it adds its own inserts. 500 sidecars counting every 5 s would be a count of the queue 100 times a second.
INGEST_COUNT_SECONDS = 60.0
# A file source waiting for the database (to learn where it stopped reading) asks again this often; the store's
# own backoff decides when a connection is really tried.
SOURCE_OPEN_RETRY_SECONDS = 1.0
FORGET_EVERY_SECONDS = 3600.0
LOOKUP_GRACE_SECONDS = 5.0
FORGET_BATCH = 10_000
# The probe listener serves the kubelet (a connection every few seconds) and whoever else finds it.
PROBE_MAX_CONNECTIONS = 32  # rows per transaction: each batch is a short stall of the event loop, not one long one


@dataclass(frozen=True)
class DrainReport:
    resolved_during_drain: int
    left_pending: int
    seconds: float


class Exporter:
    """One running exporter. Collaborators that tests replace (registry, tracer, transport, clock, rng) are
    passed in; everything else is built from the config."""

    def __init__(
        self,
        config: Config,
        *,
        api_key: str,
        registry: CollectorRegistry | None = None,
        tracing: TracerProvider | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        management_key: str | None = None,
        account_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self._api_key = api_key
        # Read by the caller (it may come from a file), else the inline key; "" leaves reconciliation off.
        self._management_key = config.reconcile.management_api_key if management_key is None else management_key
        self._account_transport = account_transport
        self.reconciler: Reconciler | None = None
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry if registry is not None else CollectorRegistry()
        self.tracing = tracing if tracing is not None else tracer_provider(config.tracing)
        self._transport = transport
        self.clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self.metrics = SelfMetrics(self.registry, config.roles)
        self.metrics.declare(config)
        self._stop_sources = asyncio.Event()
        self._stop_resolver = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._source_tasks: list[asyncio.Task[None]] = []
        self._opening: asyncio.Task[None] | None = None
        self._oldest_age = 0.0
        self._next_count = 0.0  # an ingest-only process of a fleet: when to count the shared queue again
        self._last_forget = 0.0
        self._started = False
        self._draining = False
        # Set to cut a drain short (a second SIGTERM/SIGINT): what is pending stays in the state database.
        self.abort_drain = asyncio.Event()
        # Set when the state file turns out damaged after /readyz (a large file's integrity check runs then).
        self.damaged = asyncio.Event()
        self.stopped = False
        self.failure: str | None = None  # why a background task died, for /healthz
        self.udp_sources: list[UdpSource] = []
        self.file_sources: list[FileSource] = []
        self.resolver: Resolver | None = None
        self.exposer: Exposer | None = None

    async def start(self) -> None:
        """Opens the state, then starts HTTP, lookups and sources.

        A SQLite state that cannot be opened raises StateError. A PostgreSQL state is connected to after HTTP
        serves: if the database is unreachable, the process starts anyway (/healthz ok, /readyz names the
        database) and every part waits and retries with the store's backoff; only a schema newer than this
        exporter reads raises StateError. A bad web config file (metrics.web_config_file) raises ConfigError
        before anything is opened."""
        config = self.config
        web_config = config.metrics.web_config_file
        web = load_web_config(web_config) if web_config else WebConfig()  # ConfigError before any side effect
        if web.client_certificate_required and not config.metrics.probe_listen:
            raise ConfigError(web_config, [
                "tls_server_config.client_auth_type: RequireAndVerifyClientCert fails the kubelet's probes (they "
                "present no certificate): set metrics.probe_listen for a plain probe listener"])
        self.state = create_store(config)
        roles = config.roles
        shape = LedgerShape(config.metrics.extra_labels)
        limiter = LabelLimiter(
            config.metrics.max_models, config.metrics.max_label_values, config.metrics.max_label_value_length
        )
        self.ledger = Ledger(shape, limiter)
        # A shared ledger is the database's: an exposer follows it (Exposer.run); a resolver only sends its
        # increments.
        if not self.state.shared:
            self.ledger.load(await self.state.ledger_rows())
        exposition = LedgerExposition(self.ledger) if "expose" in roles else None
        if "resolve" in roles:
            self.client = ZenMuxClient(config.zenmux, self._api_key, transport=self._transport, clock=self.clock)
            rate = config.zenmux.max_requests_per_second
            self.resolver = Resolver(
                self.state,
                self.ledger,
                self.client,
                config.resolve,
                concurrency=config.zenmux.concurrency,
                max_requests_per_second=rate,
                metrics=self.metrics,
                tracer=self.tracing.get_tracer("zenmux-exporter"),
                clock=self.clock,
                rng=self._rng,
            )
        resolver = self.resolver
        ingest = Ingest(
            self.state,
            self.metrics,
            self.clock,
            config.resolve.billing_delay_seconds,
            resolver.wake if resolver is not None else lambda: None,
        )
        if exposition is not None and self.state.shared:
            self.exposer = Exposer(self.state, self.ledger)
        exposer = self.exposer
        # Asked at each scrape: a leader frozen past its lease says 0 as soon as it wakes.
        self.metrics.expose_leader.set_function(lambda: 1.0 if exposition is not None and self._leading() else 0.0)
        if "resolve" in roles or "expose" in roles:  # an ingest-only process's count is an estimate
            self.registry.register(QueueCollector(lambda: self.state.pending, lambda: self._oldest_age, self._leading))
        host, port = split_host_port(config.metrics.listen)
        endpoints = Endpoints(
            self.registry,
            healthy=lambda: self.failure,
            ready=self._not_ready_reason,
            ledger=exposition,
            leading=self._leading,  # asked only where the expose role serves the ledger
        )
        self.http = HttpServer(web.protect(endpoints.handle), host, port, ssl_context=web.server_tls(),
                               headers=web.headers)
        servers = [self.http]
        self.probe_http: HttpServer | None = None
        if config.metrics.probe_listen:
            probe_host, probe_port = split_host_port(config.metrics.probe_listen)
            self.probe_http = HttpServer(endpoints.probes, probe_host, probe_port,
                                         max_connections=PROBE_MAX_CONNECTIONS, headers=web.headers)
            servers.append(self.probe_http)
        self.registry.register(
            HttpCollector(
                lambda: sum(s.open_connections for s in servers),
                lambda: sum(s.rejected_connections for s in servers),
                sum(s.max_connections for s in servers),
                lambda: {reason: sum(s.rejected[reason] for s in servers) for reason in REJECT_REASONS},
            )
        )
        listens = (("metrics.listen", config.metrics.listen), ("metrics.probe_listen", config.metrics.probe_listen))
        for server, (key, listen) in zip(servers, listens, strict=False):  # no probe server: one pair
            try:
                await server.start()
            except OSError as err:  # "Address already in use" alone does not say which
                raise OSError(err.errno, f"{key} {listen}: cannot listen: {err.strerror or err}") from None
        if self.state.shared:
            await self._connect()
        for source in config.sources if "ingest" in roles else ():
            if isinstance(source, UdpSourceConfig):
                udp = UdpSource(source, datagrams_parser_for(source), ingest, self.metrics)
                await udp.start()
                self.udp_sources.append(udp)
                self._source_tasks.append(self._watch(udp.serve(self._stop_sources), f"source {source.name}"))
            else:
                tail = FileSource(source, lines_parser_for(source), ingest, self.state, self.metrics, clock=self.clock)
                # "start_at: end" means the end as of start-up (or as of when the database answers).
                opened = self.state.problem is None and await self._open_source(tail)
                self.file_sources.append(tail)
                self._source_tasks.append(self._watch(self._tail(tail, opened), f"source {source.name}"))
        if resolver is not None:
            self._tasks.append(self._watch(resolver.run(self._stop_resolver), "resolver"))
        if exposer is not None:
            self._tasks.append(self._watch(exposer.run(self._stop_resolver), "exposer"))
        self._tasks.append(self._watch(self._housekeeping(), "housekeeping"))
        if self._management_key:
            if "expose" in roles:
                self._start_reconciler()
            else:
                log.warning("reconcile: the management key is not used here: only a process with the expose role "
                            "reconciles (in a fleet, the leading exposer)")
        self._started = True
        if isinstance(self.state, StateStore):
            self._opening = self._watch(self._complete_open(self.state), "state open")
            self._tasks.append(self._opening)
        log.info(
            "zenmux-exporter (%s) serving /metrics on %s:%d; %s in %s",
            ", ".join(roles),
            host,
            self.http.port,
            f"{self.state.pending} pending ids" if self.state.problem is None else "pending ids not counted yet",
            self.state.description,
        )

    async def _complete_open(self, state: StateStore) -> None:
        """What opening a SQLite state leaves until after /readyz (the dedupe memory, a large file's integrity
        check). A damaged file ends the process as at start-up (`damaged` is set; the caller exits 1): /readyz
        and /healthz say why until then."""
        try:
            await state.complete_open()
        except StateError as err:
            if err.operation:  # the check could not run (locked, unreadable): not a verdict on the file
                log.warning("%s", err)
                return
            log.error("%s", err)
            if self.failure is None:
                self.failure = str(err)
            self.damaged.set()

    async def _connect(self) -> None:
        """The first call to a shared state connects (and creates or checks the schema)."""
        try:
            await self.state.refresh()
            self._next_count = self.clock.time() + INGEST_COUNT_SECONDS
        except StateError as err:
            if err.operation == "schema":  # no use waiting: this exporter cannot read that database
                await self._close_servers()
                await self.state.close()
                raise
            if not err.reported:
                log.warning("starting without the state database (/readyz not ready; retrying with backoff): %s", err)

    async def _close_servers(self) -> None:
        await self.http.close()
        if self.probe_http is not None:
            await self.probe_http.close()

    async def _open_source(self, tail: FileSource) -> bool:
        """Resumes a file source from its saved position; False while the database cannot say where."""
        try:
            await tail.open_initial()
        except StateError as err:
            tail.close()
            if not err.reported:
                log.warning("%s waits for the state database to resume reading: %s", tail.name, err)
            return False
        return True

    async def _tail(self, tail: FileSource, opened: bool) -> None:
        """Runs a file source once it knows where it stopped; until then nothing is read (the file keeps it)."""
        while not opened:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_sources.wait(), SOURCE_OPEN_RETRY_SECONDS)
            if self._stop_sources.is_set():
                return
            opened = await self._open_source(tail)
        await tail.run(self._stop_sources)

    def _leading(self) -> bool:
        """Whether this process serves what must exist once (business series, queue gauges, reconciliation):
        the only process of a local state always; in a fleet, the leading exposer."""
        return self.exposer.leading if self.exposer is not None else not self.state.shared

    def _start_reconciler(self) -> None:
        from exporter.account import AccountClient
        from exporter.reconcile import EMPTY_SNAPSHOT, ReconcileCollector, Reconciler

        config = self.config
        self.account = AccountClient(
            config.zenmux.base_url,
            self._management_key,
            timeout_seconds=config.reconcile.timeout_seconds,
            transport=self._account_transport,
            clock=self.clock,
        )
        reconciler = Reconciler(config.reconcile, self.account, self.ledger, self.metrics, clock=self.clock)
        # In a fleet only the leading exposer polls (the account's rate limit is shared) and shows the
        # comparison (its ledger is the whole fleet's; a follower's figures would be counted twice).
        self.registry.register(
            ReconcileCollector(lambda: reconciler.snapshot if self._leading() else EMPTY_SNAPSHOT)
        )
        self.reconciler = reconciler
        self._tasks.append(self._watch(reconciler.run(self._stop_resolver, self._leading), "reconcile"))

    def _watch(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A background task whose death by an exception is logged and fails /healthz (so a liveness probe
        restarts the container); cancellation is how it stops, not a failure."""
        task = asyncio.create_task(work, name=name)
        task.add_done_callback(functools.partial(self._task_done, name))
        return task

    def _task_done(self, name: str, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            return
        log.error("%s stopped: %s: %s", name, type(error).__name__, error, exc_info=error)
        if self.failure is None:
            self.failure = f"{name} stopped: {type(error).__name__}"

    @property
    def metrics_port(self) -> int:
        return self.http.port

    @property
    def probe_port(self) -> int:
        """The plain probe listener's port, or the metrics port when there is none."""
        return self.probe_http.port if self.probe_http is not None else self.http.port

    def _not_ready_reason(self) -> str | None:
        if not self._started:
            return "starting"
        if self._draining:
            return "draining"
        return self.state.problem

    async def _housekeeping(self) -> None:
        while not self._stop_resolver.is_set():
            await self.housekeep()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_resolver.wait(), HOUSEKEEPING_SECONDS)

    async def housekeep(self) -> None:
        """One round of housekeeping at the clock's time: the queue's count and oldest id, and forgetting.

        Only resolvers and exposers report the queue; a fleet's ingest-only process counts it every
        INGEST_COUNT_SECONDS (to hold state.max_pending; its own inserts are added in between) and never asks
        for its oldest id."""
        now = self.clock.time()
        if self.state.shared:
            try:
                await self.state.keep_instance()
            except StateError as err:
                if not err.reported:
                    log.error("%s", err)
        reports = "resolve" in self.config.roles or "expose" in self.config.roles or not self.state.shared
        if reports or now >= self._next_count:
            try:
                await self.state.refresh()
                if reports:
                    oldest = await self.state.oldest_pending()
                    self._oldest_age = 0.0 if oldest is None else max(now - oldest, 0.0)
                self._next_count = now + INGEST_COUNT_SECONDS
            except StateError as err:
                if not err.reported:
                    log.warning("%s", err)  # counted again next round: the store's backoff paces reconnecting
        # One forgetter per state: the process that resolves (in a fleet, every resolver; they take turns).
        if self.resolver is not None and now - self._last_forget >= FORGET_EVERY_SECONDS:
            from exporter.reconcile import prune_days  # the per-day rows are reconcile's (imported after /readyz)

            forgotten = await self._forget(now - self.config.state.dedupe_window_seconds)
            if forgotten:
                log.info("forgot %d resolved ids older than the dedupe window", forgotten)
            try:
                await prune_days(self.state, self.ledger, now, self.config.reconcile.days_kept)
            except StateError as err:
                self.metrics.state_errors.labels("forget").inc()
                if not err.reported:
                    log.error("cannot drop old per-day ledger rows from the state database: %s", err)
            self._last_forget = now
        elif self.exposer is not None and now - self._last_forget >= FORGET_EVERY_SECONDS:
            from exporter.reconcile import days_window

            # The resolvers drop old days from the database; an exposer's ledger forgets them (no row change
            # tells it).
            self.ledger.forget_daily_outside(*days_window(now, self.config.reconcile.days_kept))
            self._last_forget = now

    async def _forget(self, before: float) -> int:
        """Forgets finished ids older than `before` in batches, letting the event loop run between them."""
        forgotten = 0
        while not self._stop_resolver.is_set():
            try:
                batch = await self.state.forget_finished(before, FORGET_BATCH)
            except StateError as err:  # disk full or read-only: try again next time round
                self.metrics.state_errors.labels("forget").inc()
                if not err.reported:
                    log.error("cannot forget old resolved ids in the state database: %s", err)
                break
            forgotten += batch
            if batch < FORGET_BATCH:
                break
            await asyncio.sleep(0)
        return forgotten

    async def stop(self, drain_seconds: float | None = None) -> DrainReport:
        """Stops reading sources, resolves what is pending for up to `drain_seconds`, then shuts down.

        Whatever is still pending stays in the state database and is resolved by the next start.
        """
        drain = self.config.shutdown.drain_seconds if drain_seconds is None else drain_seconds
        started = time.monotonic()
        self._draining = True
        self.metrics.draining.set(1)
        self._stop_sources.set()
        # A fleet's sidecar is given drain_seconds for the sources' last read-out (a database that hangs must not
        # hold the pod): what is cut short was not saved, and is read again from the saved position.
        reading = set(self._source_tasks)
        if reading and self.state.shared:
            _done, reading = await asyncio.wait(reading, timeout=drain)
            for task in reading:
                task.cancel()
        await asyncio.gather(*self._source_tasks, return_exceptions=True)
        for tail in self.file_sources:
            tail.close()
        pending_at_start = self.state.pending
        # In a fleet the queue is shared and durable: other replicas resolve what is pending.
        resolver = self.resolver
        if drain > 0 and pending_at_start and resolver is not None and not self.state.shared:
            log.info("draining: %d ids pending, waiting up to %.0fs", pending_at_start, drain)
            resolver.draining = True
            resolver.wake()
            deadline = started + drain
            while self.state.pending and not self.abort_drain.is_set():
                if (remaining := deadline - time.monotonic()) <= 0:
                    break
                resolver.settled.clear()
                waiters = [
                    asyncio.ensure_future(resolver.settled.wait()),
                    asyncio.ensure_future(self.abort_drain.wait()),
                ]
                await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                for waiter in waiters:
                    waiter.cancel()
        self._stop_resolver.set()
        if self._opening is not None:
            self._opening.cancel()  # a check not finished is run again at the next start
        if resolver is not None:
            await resolver.finish(LOOKUP_GRACE_SECONDS)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # The caller says what becomes of what is left (the next start, the fleet's resolvers, a demo's end).
        report = DrainReport(pending_at_start - self.state.pending, self.state.pending, time.monotonic() - started)
        await self._close_servers()
        if resolver is not None:
            await self.client.aclose()
        if self.reconciler is not None:
            await self.account.aclose()
        await self.state.close()
        self.tracing.shutdown()
        self.stopped = True
        return report


def create_store(config: Config) -> Store:
    """The state backend the config names: PostgreSQL for a postgresql:// state.url (not connected yet: its
    first call connects), else the SQLite file (opened, or StateError)."""
    state = config.state
    if not state.url:
        return StateStore(state.path, max_pending=state.max_pending)
    from exporter.pgstate import PostgresStore  # psycopg is only imported by processes of a fleet

    try:
        password = read_state_password(state)
    except ConfigError as err:
        raise StateError(str(err), "open") from None
    return PostgresStore(
        state.url,
        password=password,
        instance=instance_name(state),
        max_pending=state.max_pending,
        lease_seconds=state.lease_seconds,
        statement_timeout=state.statement_timeout_seconds,
        lock_timeout=state.lock_timeout_seconds,
        idle_in_transaction_timeout=state.idle_in_transaction_timeout_seconds,
    )


async def open_store(config: Config) -> Store:
    """The state backend the config names, connected: StateError if it cannot be used now."""
    store = create_store(config)
    if store.shared:
        try:
            await store.refresh()
        except StateError:
            await store.close()
            raise
    return store
