"""The reference exposition: a prometheus_client collector over a ledger (the oracle the incremental exposition is
compared with, byte for byte), and random ledgers with nasty labels."""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client import exposition as text_format
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar

from exporter.contribution import SPECS, Key, LabelValues, MetricSpec, contribution
from exporter.exposition import _bucket_bounds
from exporter.ledger import HistogramValue, Ledger
from exporter.records import Billing, FeeItem, GenerationRecord

NASTY = ['plain', 'quo"te', "back\\slash", "new\nline", "ünïcødé ✓", 'all\\"\n"\\', "", "x" * 40, "trailing\\"]
OM_ACCEPT = "application/openmetrics-text; version=1.0.0"


def generation(rng: random.Random, i: int) -> GenerationRecord:
    fees = tuple(
        FeeItem(rng.choice(NASTY) or "unknown", rng.random() / 100, rng.random() / 90, rng.random() / 1000)
        for _ in range(rng.randint(0, 3))
    )
    billed = rng.random() < 0.8
    return GenerationRecord(
        generation_id=f"g{i}",
        model=rng.choice(NASTY) or "unknown",
        protocol=rng.choice(["chat.completions", "responses", 'me"ss\\age\n'])[:20],
        latency_seconds=rng.choice([None, 0.0, 0.05, 0.7, 299.9, 1e9]),
        generation_seconds=rng.choice([None, 3.0, 1e-7]),
        prompt_tokens=rng.randint(0, 10**7),
        completion_tokens=rng.randint(0, 5000),
        reasoning_tokens=rng.randint(0, 100),
        cached_tokens=rng.choice([0, 10**12]),
        streamed=rng.choice([None, True, False]),
        finish_reason=rng.choice(["stop", "length", 'x"y']),
        upstream_retries=rng.randint(0, 12),
        billing=Billing(rng.random() * 1e-5, 1e22 * rng.random(), 0.0, 123456789.5, fees) if billed else None,
    )


def add(ledger: Ledger, rng: random.Random, start: int, count: int, nasty_ids: bool = True) -> None:
    overlay = ledger.overlay()
    for i in range(start, start + count):
        record = generation(rng, i)
        extra = {"feature": rng.choice(NASTY), "a_team": rng.choice(NASTY), "zone": rng.choice(["eu", "us"])}
        generation_id = f'g{i}"\\\n' if nasty_ids else f"g{i}"
        exemplar = {"generation_id": generation_id, "trace_id": f"{i:032x}"} if rng.random() < 0.7 else {}
        ledger.add(overlay, contribution(record, extra, ledger.shape, ledger.limiter, exemplar))
    ledger.apply(overlay)


def reference(ledger: Ledger) -> tuple[bytes, bytes]:
    registry = CollectorRegistry()
    registry.register(LedgerCollector(ledger))
    text = text_format.generate_latest(registry)
    om = openmetrics.generate_latest(registry)  # type: ignore[no-untyped-call]
    assert om.endswith(b"# EOF\n")
    return text, om[: -len(b"# EOF\n")]


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
    # The exporter's `le` texts (1048576.0 where prometheus_client's own Histogram writes 1.048576e+06).
    for i, le in enumerate(_bucket_bounds(spec.buckets)):
        cumulative += hist.buckets[i]
        exemplar = exemplars.get((key, i)) if exemplars else None
        out.append((le, cumulative) if exemplar is None else (le, cumulative, exemplar))
    return out


def _by_labels(series: tuple[LabelValues, object]) -> LabelValues:
    return series[0]
