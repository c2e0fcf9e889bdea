"""Wires config, sources, state, resolver, ledger and HTTP together; owns start-up, shutdown and the drain."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import sqlite3
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import httpx
import prometheus_client
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from exporter.clock import Clock, SystemClock
from exporter.config import Config, split_host_port
from exporter.contribution import LabelLimiter, LedgerShape
from exporter.endpoints import Endpoints
from exporter.exposition import LedgerExposition
from exporter.ids import lines_parser_for, parser_for
from exporter.ingest import Ingest
from exporter.ledger import Ledger
from exporter.resolver import Resolver
from exporter.sources.file import FileSource
from exporter.sources.udp import UdpSource
from exporter.state import StateStore
from exporter.telemetry import HttpCollector, QueueCollector, SelfMetrics, tracer_provider
from exporter.web import HttpServer
from exporter.webconfig import WebConfig, load_web_config
from exporter.zenmux import ZenMuxClient

log = logging.getLogger(__name__)

# The oldest-pending gauge is refreshed this often: alerts on it look at minutes, and every wakeup of an
# idle sidecar costs CPU.
HOUSEKEEPING_SECONDS = 5.0
FORGET_EVERY_SECONDS = 3600.0
LOOKUP_GRACE_SECONDS = 5.0
FORGET_BATCH = 10_000  # rows per transaction: each batch is a short stall of the event loop, not one long one


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
    ) -> None:
        self.config = config
        self._api_key = api_key
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry if registry is not None else CollectorRegistry()
        self.tracing = tracing if tracing is not None else tracer_provider(config.tracing)
        self._transport = transport
        self.clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self.metrics = SelfMetrics(self.registry)
        self.metrics.declare(config)
        self._stop_sources = asyncio.Event()
        self._stop_resolver = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._source_tasks: list[asyncio.Task[None]] = []
        self._oldest_age = 0.0
        self._started = False
        self._draining = False
        # Set to cut a drain short (a second SIGTERM/SIGINT): what is pending stays in the state database.
        self.abort_drain = asyncio.Event()
        self.stopped = False
        self.failure: str | None = None  # why a background task died, for /healthz
        self.udp_sources: list[UdpSource] = []
        self.file_sources: list[FileSource] = []

    async def start(self) -> None:
        """Opens the state (raising StateError if unusable), then starts lookups, sources and HTTP.

        A bad web config file (metrics.web_config_file) raises ConfigError before anything is opened."""
        config = self.config
        web_config = config.metrics.web_config_file
        web = load_web_config(web_config) if web_config else WebConfig()  # ConfigError before any side effect
        self.state = StateStore(config.state.path, max_pending=config.state.max_pending)
        shape = LedgerShape(config.metrics.extra_labels)
        limiter = LabelLimiter(
            config.metrics.max_models, config.metrics.max_label_values, config.metrics.max_label_value_length
        )
        self.ledger = Ledger(shape, limiter)
        self.ledger.load(self.state.ledger_rows())
        exposition = LedgerExposition(self.ledger)
        self.registry.register(QueueCollector(lambda: self.state.pending, lambda: self._oldest_age))
        self.client = ZenMuxClient(config.zenmux, self._api_key, transport=self._transport, clock=self.clock)
        self.resolver = Resolver(
            self.state,
            self.ledger,
            self.client,
            config.resolve,
            concurrency=config.zenmux.concurrency,
            max_requests_per_second=config.zenmux.max_requests_per_second,
            metrics=self.metrics,
            tracer=self.tracing.get_tracer("zenmux-exporter"),
            clock=self.clock,
            rng=self._rng,
        )
        ingest = Ingest(
            self.state, self.metrics, self.clock, config.resolve.billing_delay_seconds, self.resolver.wake
        )
        host, port = split_host_port(config.metrics.listen)
        endpoints = Endpoints(
            self.registry,
            healthy=lambda: self.failure,
            ready=self._not_ready_reason,
            ledger=exposition,
        )
        self.http = HttpServer(web.protect(endpoints.handle), host, port, ssl_context=web.ssl_context)
        http = self.http
        self.registry.register(
            HttpCollector(lambda: http.open_connections, lambda: http.rejected_connections, http.max_connections)
        )
        try:
            await self.http.start()
        except OSError as err:
            where = f"metrics.listen {config.metrics.listen}"  # "Address already in use" alone does not say which
            raise OSError(err.errno, f"{where}: cannot listen: {err.strerror or err}") from None
        for source in config.sources:
            if source.type == "udp":
                udp = UdpSource(source, parser_for(source), ingest, self.metrics)
                await udp.start()
                self.udp_sources.append(udp)
                self._source_tasks.append(self._watch(udp.serve(self._stop_sources), f"source {source.name}"))
            else:
                tail = FileSource(source, lines_parser_for(source), ingest, self.state, self.metrics)
                tail.open_initial()  # "start_at: end" means the end as of start-up
                self.file_sources.append(tail)
                self._source_tasks.append(self._watch(tail.run(self._stop_sources), f"source {source.name}"))
        self._tasks.append(self._watch(self.resolver.run(self._stop_resolver), "resolver"))
        self._tasks.append(self._watch(self._housekeeping(), "housekeeping"))
        self._started = True
        log.info(
            "zenmux-exporter serving /metrics on %s:%d; %d pending ids in %s",
            host,
            self.http.port,
            self.state.pending,
            config.state.path,
        )

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

    def _not_ready_reason(self) -> str | None:
        if not self._started:
            return "starting"
        if self._draining:
            return "draining"
        return None

    async def _housekeeping(self) -> None:
        last_forget = 0.0
        while not self._stop_resolver.is_set():
            now = self.clock.time()
            oldest = self.state.oldest_pending()
            self._oldest_age = 0.0 if oldest is None else max(now - oldest, 0.0)
            if now - last_forget >= FORGET_EVERY_SECONDS:
                forgotten = await self._forget(now - self.config.state.dedupe_window_seconds)
                if forgotten:
                    log.info("forgot %d resolved ids older than the dedupe window", forgotten)
                last_forget = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_resolver.wait(), HOUSEKEEPING_SECONDS)

    async def _forget(self, before: float) -> int:
        """Forgets finished ids older than `before` in batches, letting the event loop run between them."""
        forgotten = 0
        while not self._stop_resolver.is_set():
            try:
                batch = self.state.forget_finished(before, FORGET_BATCH)
            except sqlite3.Error as err:  # disk full or read-only: try again next time round
                self.metrics.state_errors.labels("forget").inc()
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
        await asyncio.gather(*self._source_tasks, return_exceptions=True)
        pending_at_start = self.state.pending
        if drain > 0 and pending_at_start:
            log.info("draining: %d ids pending, waiting up to %.0fs", pending_at_start, drain)
            self.resolver.draining = True
            self.resolver.wake()
            deadline = started + drain
            while self.state.pending and not self.abort_drain.is_set():
                if (remaining := deadline - time.monotonic()) <= 0:
                    break
                self.resolver.settled.clear()
                waiters = [
                    asyncio.ensure_future(self.resolver.settled.wait()),
                    asyncio.ensure_future(self.abort_drain.wait()),
                ]
                await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                for waiter in waiters:
                    waiter.cancel()
        self._stop_resolver.set()
        await self.resolver.finish(LOOKUP_GRACE_SECONDS)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        report = DrainReport(pending_at_start - self.state.pending, self.state.pending, time.monotonic() - started)
        if report.left_pending:
            log.warning(
                "shutting down with %d ids not yet resolved; they stay in %s for the next start",
                report.left_pending,
                self.config.state.path,
            )
        await self.http.close()
        await self.client.aclose()
        self.state.close()
        self.tracing.shutdown()
        self.stopped = True
        return report
