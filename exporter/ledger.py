"""What a resolved generation adds to each business metric, the in-memory ledger, and the collector rendering it."""

from __future__ import annotations

import json
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import cast

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from exporter.zenmux import GenerationRecord

LabelValues = tuple[str, ...]
Key = tuple[str, LabelValues]

OTHER = "other"
TOKEN_TYPES = ("prompt", "completion", "reasoning", "cached")

# Buckets follow the data: tokens in powers of 4 (as the OpenTelemetry GenAI conventions), latencies
# up to several minutes, retries as small integers, cost from a millionth of a dollar to ten dollars.
TOKEN_BUCKETS = tuple(float(4**i) for i in range(12))
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0)
DURATION_BUCKETS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)
RETRY_BUCKETS = (0.0, 1.0, 2.0, 3.0, 5.0, 10.0)
COST_BUCKETS = (1e-6, 1e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def is_histogram(self) -> bool:
        return bool(self.buckets)


SPECS = {
    spec.name: spec
    for spec in (
        MetricSpec("zenmux_generations", "Resolved generations.", ("streamed", "finish_reason")),
        MetricSpec("zenmux_tokens", "Tokens; reasoning is part of completion, cached part of prompt.", ("token_type",)),
        MetricSpec("zenmux_upstream_retries", "Upstream retries ZenMux made (requestRetryTimes), summed."),
        MetricSpec("zenmux_cost_usd", "Amount billed (ratingResponses.billAmount), USD."),
        MetricSpec("zenmux_cost_origin_usd", "Amount before discount (ratingResponses.originAmount), USD."),
        MetricSpec("zenmux_cost_discount_usd", "Discount (ratingResponses.discountAmount), USD."),
        MetricSpec("zenmux_credits", "Credits consumed (usage); 1 credit = 1 USD."),
        MetricSpec("zenmux_cost_by_fee_item_usd", "Amount billed per fee item (ratingDetails), USD.", ("fee_item",)),
        MetricSpec("zenmux_generation_tokens", "Tokens per generation.", ("token_type",), TOKEN_BUCKETS),
        MetricSpec("zenmux_first_token_latency_seconds", "Time to first token (latency).", (), LATENCY_BUCKETS),
        MetricSpec(
            "zenmux_generation_duration_seconds", "First token to end (generationTime).", (), DURATION_BUCKETS
        ),
        MetricSpec("zenmux_generation_upstream_retries", "Upstream retries per generation.", (), RETRY_BUCKETS),
        MetricSpec("zenmux_generation_cost_usd", "Amount billed per generation, USD.", (), COST_BUCKETS),
    )
}


class LabelLimiter:
    """Caps distinct values per label (overflow becomes "other") and truncates long values."""

    def __init__(self, max_models: int, max_values: int, max_length: int) -> None:
        self._caps = {"model": max_models}
        self._default_cap = max_values
        self._max_length = max_length
        self._known: dict[str, set[str]] = {}
        self.overflows: dict[str, int] = {}

    def remember(self, label: str, value: str) -> None:
        self._known.setdefault(label, set()).add(value)

    def value(self, label: str, raw: str) -> str:
        value = raw[: self._max_length]
        known = self._known.setdefault(label, set())
        if value in known:
            return value
        if len(known) >= self._caps.get(label, self._default_cap):
            self.overflows[label] = self.overflows.get(label, 0) + 1
            return OTHER
        known.add(value)
        return value


@dataclass(frozen=True, slots=True)
class Increment:
    metric: str
    labels: LabelValues
    value: float


@dataclass(frozen=True, slots=True)
class Contribution:
    """Everything one resolved generation adds to the ledger, plus exemplar labels for its histograms."""

    increments: tuple[Increment, ...]
    exemplar: Mapping[str, str]


class LedgerShape:
    """Label names per metric: base labels, metric labels, then the configured extra labels."""

    def __init__(self, extra_labels: Sequence[str]) -> None:
        self.extra_labels = tuple(extra_labels)

    def label_names(self, spec: MetricSpec) -> tuple[str, ...]:
        return ("model", "protocol", *spec.labels, *self.extra_labels)


def contribution(
    record: GenerationRecord,
    extra: Mapping[str, str],
    shape: LedgerShape,
    limiter: LabelLimiter,
    exemplar: Mapping[str, str],
) -> Contribution:
    """The increments one resolved generation makes (pure but for the limiter's memory of seen values)."""
    base = (limiter.value("model", record.model), limiter.value("protocol", record.protocol))
    tail = tuple(limiter.value(name, extra.get(name, "")) if extra.get(name) else "" for name in shape.extra_labels)
    out: list[Increment] = []

    def add(metric: str, value: float | None, *labels: str) -> None:
        if value is not None:
            out.append(Increment(metric, (*base, *labels, *tail), value))

    streamed = "unknown" if record.streamed is None else str(record.streamed).lower()
    add("zenmux_generations", 1.0, streamed, limiter.value("finish_reason", record.finish_reason))
    tokens = {
        "prompt": record.prompt_tokens,
        "completion": record.completion_tokens,
        "reasoning": record.reasoning_tokens,
        "cached": record.cached_tokens,
    }
    for token_type, count in tokens.items():
        add("zenmux_tokens", float(count), token_type)
        add("zenmux_generation_tokens", float(count), token_type)
    add("zenmux_first_token_latency_seconds", record.latency_seconds)
    add("zenmux_generation_duration_seconds", record.generation_seconds)
    add("zenmux_upstream_retries", float(record.upstream_retries))
    add("zenmux_generation_upstream_retries", float(record.upstream_retries))
    if record.billing is not None:
        billing = record.billing
        add("zenmux_cost_usd", billing.bill_usd)
        add("zenmux_cost_origin_usd", billing.origin_usd)
        add("zenmux_cost_discount_usd", billing.discount_usd)
        add("zenmux_credits", billing.credits)
        add("zenmux_generation_cost_usd", billing.bill_usd)
        for item in billing.fee_items:
            add("zenmux_cost_by_fee_item_usd", item.bill_usd, limiter.value("fee_item", item.code))
    return Contribution(tuple(out), exemplar)


@dataclass
class HistogramValue:
    buckets: list[float]  # not cumulative; the last one is +Inf
    sum: float = 0.0

    def copy(self) -> HistogramValue:
        return HistogramValue(list(self.buckets), self.sum)


@dataclass
class Overlay:
    """Changes of one batch, applied to the ledger only once the batch's transaction has committed."""

    counters: dict[Key, float] = field(default_factory=dict)
    histograms: dict[Key, HistogramValue] = field(default_factory=dict)
    exemplars: dict[tuple[Key, int], Exemplar] = field(default_factory=dict)

    def rows(self) -> Iterator[tuple[str, str, str]]:
        for (metric, labels), value in self.counters.items():
            yield metric, _labels_json(labels), json.dumps(value)
        for (metric, labels), hist in self.histograms.items():
            yield metric, _labels_json(labels), json.dumps({"b": hist.buckets, "s": hist.sum})


@lru_cache(maxsize=65536)  # the same label values are written with every batch that touches them
def _labels_json(labels: LabelValues) -> str:
    return json.dumps(labels)


class Ledger:
    """Cumulative values behind every business metric; mirrored to the state database by the store."""

    def __init__(self, shape: LedgerShape, limiter: LabelLimiter) -> None:
        self.shape = shape
        self.limiter = limiter
        self._counters: dict[Key, float] = {}
        self._histograms: dict[Key, HistogramValue] = {}
        self._exemplars: dict[tuple[Key, int], Exemplar] = {}
        self._lock = threading.Lock()  # /metrics renders on another thread
        # Series changed since each format was last rendered (see LedgerExposition).
        self._changed: tuple[set[Key], set[Key]] = (set(), set())

    def load(self, rows: Iterable[tuple[str, str, str]]) -> None:
        """Restores persisted values; rows whose labels no longer fit the configured shape are skipped."""
        for metric, labels_json, value_json in rows:
            spec = SPECS.get(metric)
            labels = tuple(json.loads(labels_json))
            if spec is None or len(labels) != len(self.shape.label_names(spec)):
                continue
            for name, value in zip(self.shape.label_names(spec), labels, strict=True):
                if value:
                    self.limiter.remember(name, value)
            value = json.loads(value_json)
            if spec.is_histogram:
                if len(value["b"]) == len(spec.buckets) + 1:
                    self._histograms[(metric, labels)] = HistogramValue(value["b"], value["s"])
                    self._mark((metric, labels))
            else:
                self._counters[(metric, labels)] = float(value)
                self._mark((metric, labels))

    def _mark(self, key: Key) -> None:
        for changed in self._changed:
            changed.add(key)

    def overlay(self) -> Overlay:
        return Overlay()

    def add(self, overlay: Overlay, item: Contribution) -> None:
        for inc in item.increments:
            key = (inc.metric, inc.labels)
            spec = SPECS[inc.metric]
            if not spec.is_histogram:
                overlay.counters[key] = overlay.counters.get(key, self._counters.get(key, 0.0)) + inc.value
                continue
            hist = overlay.histograms.get(key)
            if hist is None:
                current = self._histograms.get(key)
                hist = current.copy() if current else HistogramValue([0.0] * (len(spec.buckets) + 1))
                overlay.histograms[key] = hist
            index = bisect_left(spec.buckets, inc.value)
            hist.buckets[index] += 1
            hist.sum += inc.value
            if item.exemplar:
                overlay.exemplars[(key, index)] = Exemplar(dict(item.exemplar), inc.value)

    def apply(self, overlay: Overlay) -> None:
        # Values are replaced, never mutated in place (the overlay holds copies): a renderer may keep
        # references to them after releasing the lock.
        with self._lock:
            self._counters.update(overlay.counters)
            self._histograms.update(overlay.histograms)
            self._exemplars.update(overlay.exemplars)
            for changed in self._changed:
                changed.update(overlay.counters)
                changed.update(overlay.histograms)

    def value(self, metric: str, **labels: str) -> float:
        """Sum of a counter over the series matching the given labels (for tests and the CLI)."""
        names = self.shape.label_names(SPECS[metric])
        with self._lock:
            return sum(
                v
                for (m, values), v in self._counters.items()
                if m == metric and all(values[names.index(k)] == want for k, want in labels.items())
            )

    def snapshot(
        self,
    ) -> tuple[dict[Key, float], dict[Key, HistogramValue], dict[tuple[Key, int], Exemplar]]:
        with self._lock:
            return dict(self._counters), dict(self._histograms), dict(self._exemplars)


class LedgerCollector(Collector):
    """Renders the ledger as Prometheus counters and histograms (with exemplars), no `_created` series."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def collect(self) -> Iterator[Metric]:
        counters, histograms, exemplars = self._ledger.snapshot()
        shape = self._ledger.shape
        # One pass to group the series by metric, then each group sorted on its own (not every series per metric).
        counter_series: dict[str, list[tuple[LabelValues, float]]] = {}
        for (metric, labels), value in counters.items():
            counter_series.setdefault(metric, []).append((labels, value))
        histogram_series: dict[str, list[tuple[LabelValues, HistogramValue]]] = {}
        for (metric, labels), hist in histograms.items():
            histogram_series.setdefault(metric, []).append((labels, hist))
        for metric, spec in SPECS.items():
            names = list(shape.label_names(spec))
            if spec.is_histogram:
                histogram = HistogramMetricFamily(metric, spec.help, labels=names)
                for labels, hist in sorted(histogram_series.get(metric, ()), key=_by_labels):
                    key = (metric, labels)
                    histogram.add_metric(list(labels), _buckets(spec, hist, key, exemplars), hist.sum)
                yield histogram
            else:
                counter = CounterMetricFamily(metric, spec.help, labels=names)
                for labels, value in sorted(counter_series.get(metric, ()), key=_by_labels):
                    counter.add_metric(list(labels), value)
                yield counter

    def describe(self) -> Iterator[Metric]:
        return iter(())


def _buckets(
    spec: MetricSpec, hist: HistogramValue, key: Key, exemplars: Mapping[tuple[Key, int], Exemplar]
) -> list[tuple[str, float] | tuple[str, float, Exemplar]]:
    """Cumulative buckets, each with the latest exemplar that landed in it."""
    out: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
    cumulative = 0.0
    for i, le in enumerate(_bucket_bounds(spec.buckets)):
        cumulative += hist.buckets[i]
        exemplar = exemplars.get((key, i)) if exemplars else None
        out.append((le, cumulative) if exemplar is None else (le, cumulative, exemplar))
    return out


def _by_labels(series: tuple[LabelValues, object]) -> LabelValues:
    return series[0]


@lru_cache(maxsize=64)
def _bucket_bounds(buckets: tuple[float, ...]) -> tuple[str, ...]:
    """The `le` texts of a bucket layout, +Inf last (formatted once, not per series per scrape)."""
    return (*(_float_text(upper) for upper in buckets), "+Inf")


def _float_text(value: float) -> str:
    return repr(value) if value != int(value) or value < 1 else f"{value:.1f}"


# prometheus_client's float formatting (Go-style exponents), typed.
_go = cast(Callable[[float], str], floatToGoString)


def _escape_label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class _FormatCache:
    """One exposition format's rendered series: per metric, the label values in exposition order and each
    series' lines at the same index (each series' bytes are held once; the body is one join over them)."""

    def __init__(self) -> None:
        self.order: dict[str, list[LabelValues]] = {}
        self.lines: dict[str, list[bytes]] = {}
        self.position: dict[Key, int] = {}


class LedgerExposition:
    """The ledger's part of /metrics, rendered incrementally.

    Each series' lines are cached per format (text; OpenMetrics with exemplars) and re-rendered only when a
    committed overlay touched it; the body is one join over the cached lines (~30 ms for 59 MB). The bytes
    are exactly what prometheus_client renders from LedgerCollector (tests/test_exposition.py compares
    them). The ledger's lock is held only to take the changed keys and references to their (never mutated)
    values; rendering happens outside it, in the scrape's worker thread.
    """

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._caches = (_FormatCache(), _FormatCache())
        self._render_lock = threading.Lock()  # concurrent scrapes take turns on the caches
        shape = ledger.shape
        self._layouts: dict[str, tuple[list[int], int]] = {}
        self._headers: dict[str, tuple[bytes, bytes]] = {}
        for metric, spec in SPECS.items():
            names = shape.label_names(spec)
            order = sorted(range(len(names)), key=lambda i: names[i])
            # Where `le` falls among the sorted label names of a histogram's bucket lines.
            le_at = sum(1 for name in names if name < "le")
            self._layouts[metric] = (order, le_at)
            kind = "histogram" if spec.is_histogram else "counter"
            text_name = metric if spec.is_histogram else metric + "_total"
            text_help = spec.help.replace("\\", r"\\").replace("\n", r"\n")
            self._headers[metric] = (
                f"# HELP {text_name} {text_help}\n# TYPE {text_name} {kind}\n".encode(),
                f"# HELP {metric} {_escape_label_value(spec.help)}\n# TYPE {metric} {kind}\n".encode(),
            )
        self._names = {metric: shape.label_names(spec) for metric, spec in SPECS.items()}
        # Label names that are not unique or not plain would be rendered differently by prometheus_client.
        self.exact = all(
            len(set(names)) == len(names) and "le" not in names and all(_plain_label(n) for n in names)
            for names in self._names.values()
        )

    def render(self, openmetrics: bool) -> bytes:
        """The ledger's metric families, without `# EOF`."""
        return b"".join(self.parts(openmetrics))

    def parts(self, openmetrics: bool) -> list[bytes]:
        """The ledger's metric families as chunks to join (a 59 MB body is copied once, by the caller).

        Memory: each format scraped holds its rendered series once (~130 bytes per sample)."""
        with self._render_lock:
            cache = self._caches[1 if openmetrics else 0]
            ledger = self._ledger
            with ledger._lock:
                changed = ledger._changed[1 if openmetrics else 0]
                ledger._changed = (
                    (ledger._changed[0], set()) if openmetrics else (set(), ledger._changed[1])
                )
                work: list[tuple[Key, float | HistogramValue, list[Exemplar | None] | None]] = []
                for key in changed:
                    if key in ledger._counters:
                        work.append((key, ledger._counters[key], None))
                    elif key in ledger._histograms:
                        hist = ledger._histograms[key]
                        exemplars = (
                            [ledger._exemplars.get((key, i)) for i in range(len(hist.buckets))]
                            if openmetrics and ledger._exemplars
                            else None
                        )
                        work.append((key, hist, exemplars))
            added: dict[str, list[tuple[LabelValues, bytes]]] = {}
            for key, value, exemplars in work:
                metric, labels = key
                if isinstance(value, HistogramValue):
                    data = self._histogram(key, value, exemplars)
                else:
                    data = self._counter(key, value)
                at = cache.position.get(key)
                if at is None:
                    added.setdefault(metric, []).append((labels, data))
                else:
                    cache.lines[metric][at] = data
            for metric, fresh in added.items():  # new series: re-sort this metric's series by label values
                old = cache.lines.get(metric, [])
                merged = [*zip(cache.order.get(metric, []), old, strict=True), *fresh]
                merged.sort(key=_by_labels)
                cache.order[metric] = [labels for labels, _ in merged]
                cache.lines[metric] = [data for _, data in merged]
                for i, labels in enumerate(cache.order[metric]):
                    cache.position[(metric, labels)] = i
            index = 1 if openmetrics else 0
            parts: list[bytes] = []
            for metric in SPECS:
                parts.append(self._headers[metric][index])
                parts.extend(cache.lines.get(metric, ()))
            return parts

    def _label_pairs(self, key: Key) -> list[str]:
        metric, values = key
        names = self._names[metric]
        order, _ = self._layouts[metric]
        return [f'{names[i]}="{_escape_label_value(values[i])}"' for i in order]

    def _counter(self, key: Key, value: float) -> bytes:
        return f"{key[0]}_total{{{','.join(self._label_pairs(key))}}} {_go(value)}\n".encode()

    def _histogram(self, key: Key, hist: HistogramValue, exemplars: list[Exemplar | None] | None) -> bytes:
        metric = key[0]
        pairs = self._label_pairs(key)
        _, le_at = self._layouts[metric]
        before = "".join(pair + "," for pair in pairs[:le_at])
        after = "".join("," + pair for pair in pairs[le_at:])
        plain = ",".join(pairs)
        lines: list[str] = []
        cumulative = 0.0
        for i, le in enumerate(_bucket_bounds(SPECS[metric].buckets)):
            cumulative += hist.buckets[i]
            exemplar = exemplars[i] if exemplars is not None else None
            line = f'{metric}_bucket{{{before}le="{le}"{after}}} {_go(cumulative)}'
            if exemplar is not None:
                line += _exemplar_text(exemplar)
            lines.append(line + "\n")
        lines.append(f"{metric}_count{{{plain}}} {_go(cumulative)}\n")
        lines.append(f"{metric}_sum{{{plain}}} {_go(hist.sum)}\n")
        return "".join(lines).encode()


def _exemplar_text(exemplar: Exemplar) -> str:
    labels = ",".join(f'{k}="{_escape_label_value(v)}"' for k, v in sorted(exemplar.labels.items()))
    if exemplar.timestamp is not None:
        return f" # {{{labels}}} {_go(exemplar.value)} {exemplar.timestamp}"
    return f" # {{{labels}}} {_go(exemplar.value)}"


def _plain_label(name: str) -> bool:
    return bool(name) and (name[0].isalpha() or name[0] == "_") and name.isascii() and name.replace("_", "a").isalnum()
