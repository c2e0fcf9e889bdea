"""The exporter's own health metrics, its tracer provider and its logging (with the API key redacted)."""

from __future__ import annotations

import json
import logging
import platform
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.config import Config, FileSourceConfig, LogConfig, TracingConfig
from exporter.ids import FILE_REJECT_REASONS, UDP_REJECT_REASONS
from exporter.records import Outcome
from exporter.redact import Redactor

# The outcome label of zenmux_exporter_reconcile_requests_total: "ok", or why the account request failed.
RECONCILE_OUTCOMES = ("ok", *(o.value for o in Outcome if o not in (Outcome.RESOLVED, Outcome.NOT_READY)))
LOOKUP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROTATION_KINDS = ("rename", "truncate", "copytruncate_recovered", "copytruncate_unrecovered")


class SelfMetrics:
    """Counters and gauges about the exporter itself, on an injected registry.

    Each process exposes those of its roles: lookups (and the horizon, limits and label caps of resolution)
    only where `resolve` runs; the give-up horizon also where `expose` runs, beside the queue gauges it is
    compared with. The others are still counted into, never exposed."""

    def __init__(self, registry: CollectorRegistry, roles: Sequence[str] = ("ingest", "resolve", "expose")) -> None:
        p = "zenmux_exporter_"
        resolving = registry if "resolve" in roles else None
        exposing = registry if "resolve" in roles or "expose" in roles else None
        self.ids_received = Counter(p + "ids_received", "Valid ids read from a source.", ["source"], registry=registry)
        self.ids_duplicate = Counter(
            p + "ids_duplicate", "Ids already pending or resolved, dropped.", ["source"], registry=registry
        )
        self.ids_rejected = Counter(
            p + "ids_rejected", "Lines, datagrams or ids rejected.", ["source", "reason"], registry=registry
        )
        self.udp_datagrams = Counter(p + "udp_datagrams", "Datagrams received.", ["source"], registry=registry)
        self.udp_dropped = Counter(
            p + "udp_dropped_datagrams",
            "Datagrams dropped because the ingest buffer was full.",
            ["source"],
            registry=registry,
        )
        self.file_read_bytes = Gauge(
            p + "file_read_bytes", "Offset read in the current file.", ["source"], registry=registry
        )
        self.file_size_bytes = Gauge(p + "file_size_bytes", "Size of the current file.", ["source"], registry=registry)
        self.file_rotations = Counter(
            p + "file_rotations",
            "Rotations followed (rename, truncate) and whether a truncated log's unread tail was read from its copy.",
            ["source", "kind"],
            registry=registry,
        )
        self.file_recovered_lines = Counter(
            p + "file_recovered_lines",
            "Lines read from rotated files: a truncated log's copy, the log renamed away, generations rotated while "
            "stopped.",
            ["source"],
            registry=registry,
        )
        self.file_checkpoints = Gauge(
            p + "file_checkpoints",
            "Generations of the log a file source keeps a checkpoint of (sources[].checkpoints_kept bounds those "
            "no file holds any more).",
            ["source"],
            registry=registry,
        )
        self.file_checkpoints_expired = Counter(
            p + "file_checkpoints_expired",
            "Checkpoints dropped by count or age (sources[].checkpoints_kept, checkpoints_max_age_seconds).",
            ["source"],
            registry=registry,
        )
        self.file_history_skipped = Counter(
            p + "file_history_skipped",
            "Rotated files of no known generation not read: written before what the source has read (its horizon).",
            ["source"],
            registry=registry,
        )
        self.file_identity_conflicts = Counter(
            p + "file_identity_conflicts",
            "Files that begin as a known generation does but hold other bytes at its checkpoint: read as new ones.",
            ["source"],
            registry=registry,
        )
        self.inflight = Gauge(p + "inflight_lookups", "Lookups in progress.", registry=resolving)
        self.lookups = Counter(p + "lookups", "Lookup attempts by outcome.", ["outcome"], registry=resolving)
        self.lookup_duration = Histogram(
            p + "lookup_duration_seconds",
            "Duration of one lookup attempt.",
            ["outcome"],
            buckets=LOOKUP_BUCKETS,
            registry=resolving,
        )
        self.abandoned = Counter(
            p + "abandoned_ids", "Ids given up after the give-up horizon.", ["reason"], registry=resolving
        )
        self.billing_unavailable = Counter(
            p + "billing_unavailable", "Generations counted without cost.", ["reason"], registry=resolving
        )
        self.auth_failing = Gauge(p + "api_auth_failing", "1 while the API answers 401/403.", registry=resolving)
        self.label_overflow = Counter(
            p + "label_overflow", "Label values folded into 'other' by a cardinality cap.", ["label"], registry=exposing
        )
        self.draining = Gauge(p + "draining", "1 while shutting down and draining pending ids.", registry=registry)
        self.reconcile_requests = Counter(
            p + "reconcile_requests",
            "Account requests (cost, balance) made for reconciliation, by outcome.",
            ["endpoint", "outcome"],
            registry=registry,
        )
        self.state_errors = Counter(
            p + "state_errors", "State database writes that failed (retried).", ["operation"], registry=registry
        )
        build = Gauge(p + "build_info", "Build information.", ["version", "python_version"], registry=registry)
        build.labels(__version__, platform.python_version()).set(1)
        self.give_up_after = Gauge(
            p + "give_up_after_seconds", "Configured resolve.give_up_after_seconds.", registry=exposing
        )
        self.max_pending = Gauge(p + "max_pending_ids", "Configured state.max_pending.", registry=registry)
        self.concurrency_limit = Gauge(
            p + "lookup_concurrency_limit", "Configured zenmux.concurrency.", registry=resolving
        )
        self.expose_leader = Gauge(
            p + "expose_leader",
            "1 while this process serves the business series (always, on a local state; in a fleet, the leader).",
            registry=registry,
        )

    def declare(self, config: Config) -> None:
        """Known label values start at 0, so rate() and alerts see the first event, and limits are visible."""
        for outcome in Outcome:
            self.lookups.labels(outcome.value)
            if outcome not in (Outcome.RESOLVED, Outcome.UNAUTHORIZED):
                self.abandoned.labels(outcome.value)
        for reason in ("subscription_key", "gave_up_waiting"):
            self.billing_unavailable.labels(reason)
        for operation in ("settle", "enqueue", "position", "forget"):
            self.state_errors.labels(operation)
        for label in ("model", "protocol", "finish_reason", "fee_item", *config.metrics.extra_labels):
            self.label_overflow.labels(label)
        for source in config.sources:
            self.ids_received.labels(source.name)
            self.ids_duplicate.labels(source.name)
            reasons = FILE_REJECT_REASONS if isinstance(source, FileSourceConfig) else UDP_REJECT_REASONS
            for reason in reasons:
                self.ids_rejected.labels(source.name, reason)
            if isinstance(source, FileSourceConfig):
                for kind in ROTATION_KINDS:
                    self.file_rotations.labels(source.name, kind)
                self.file_recovered_lines.labels(source.name)
                self.file_checkpoints.labels(source.name)
                self.file_checkpoints_expired.labels(source.name)
                self.file_history_skipped.labels(source.name)
                self.file_identity_conflicts.labels(source.name)
                self.file_read_bytes.labels(source.name)
                self.file_size_bytes.labels(source.name)
            else:
                self.udp_datagrams.labels(source.name)
                self.udp_dropped.labels(source.name)
        if config.reconcile.enabled:
            for endpoint in ("cost", "balance"):
                for label in RECONCILE_OUTCOMES:
                    self.reconcile_requests.labels(endpoint, label)
        self.give_up_after.set(config.resolve.give_up_after_seconds)
        self.max_pending.set(config.state.max_pending)
        self.concurrency_limit.set(config.zenmux.concurrency)


class QueueCollector(Collector):
    """Pending backlog gauges, read from values the event loop keeps current (no I/O at scrape time).

    `shown` says whether this process reports them: a fleet's queue is reported once, by the leading exposer,
    like the business series (every process of the fleet sees the same queue)."""

    def __init__(
        self, pending: Callable[[], int], oldest_age: Callable[[], float], shown: Callable[[], bool] = lambda: True
    ) -> None:
        self._pending = pending
        self._oldest_age = oldest_age
        self._shown = shown

    def collect(self) -> Iterator[Metric]:
        if not self._shown():
            return
        yield GaugeMetricFamily("zenmux_exporter_pending_ids", "Ids waiting to be resolved.", value=self._pending())
        yield GaugeMetricFamily(
            "zenmux_exporter_oldest_pending_age_seconds",
            "Age of the oldest pending id (0 when none).",
            value=self._oldest_age(),
        )

    def describe(self) -> Iterator[Metric]:
        return iter(())


class HttpCollector(Collector):
    """The /metrics server's connections against its bound, read from the server at scrape time."""

    def __init__(
        self,
        open_connections: Callable[[], int],
        refused: Callable[[], int],
        limit: int,
        rejected: Callable[[], Mapping[str, int]] = dict,
    ) -> None:
        self._open = open_connections
        self._refused = refused
        self._limit = limit
        self._rejected = rejected

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "zenmux_exporter_http_connections", "Connections open to the metrics server.", value=self._open()
        )
        yield GaugeMetricFamily(
            "zenmux_exporter_http_max_connections",
            "Connections the metrics server holds open at once; more are closed at once and counted.",
            value=self._limit,
        )
        yield CounterMetricFamily(
            "zenmux_exporter_http_connections_refused",
            "Connections closed at once because the metrics server held its maximum, each running a handler.",
            value=self._refused(),
        )
        rejected = CounterMetricFamily(
            "zenmux_exporter_http_requests_rejected",
            "Requests or connections the metrics server cut off: a deadline or size bound hit, bad framing, "
            "or evicted at the connection bound for a new one.",
            labels=["reason"],
        )
        for reason, count in sorted(self._rejected().items()):
            rejected.add_metric([reason], count)
        yield rejected

    def describe(self) -> Iterator[Metric]:
        return iter(())


def tracer_provider(config: TracingConfig, exporter: SpanExporter | None = None) -> TracerProvider:
    """A provider of our own (never the global one); OTLP settings come from the standard OTEL_* variables."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": config.service_name, "service.version": __version__}),
        sampler=ParentBasedTraceIdRatio(config.sample_ratio),
    )
    if exporter is None:
        if config.exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        elif config.exporter == "console":
            exporter = ConsoleSpanExporter(out=sys.stderr)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class RedactingFilter(logging.Filter):
    """Defence in depth: whatever a log record says, the API key is replaced before it is written."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self._redact = Redactor(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
            record.exc_text = None
        # Whole or cut (an error message truncated mid-key): any piece of 8 characters or more.
        record.msg, record.args = self._redact(message), None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
                "level": record.levelname.lower(),
                "logger": record.name,
                "msg": record.getMessage(),
            }
        )


def configure_logging(config: LogConfig, secrets: list[str]) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter(secrets))
    text = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(JsonFormatter() if config.format == "json" else text)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    # httpx logs every request at INFO; that is our lookups_total, not a log line.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # A crash's traceback goes through the same redacting handler, not straight to stderr.
    sys.excepthook = _log_uncaught


def _log_uncaught(kind: type[BaseException], value: BaseException, traceback: TracebackType | None) -> None:
    logging.getLogger("exporter").critical("uncaught exception, exiting", exc_info=(kind, value, traceback))
