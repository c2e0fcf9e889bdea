"""The in-memory ledger: cumulative values behind every business metric, changed only after a commit."""

from __future__ import annotations

import itertools
import json
import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache

from prometheus_client.samples import Exemplar

from exporter.contribution import (
    DAILY_COST,
    DAILY_METRICS,
    SPECS,
    Contribution,
    Key,
    LabelLimiter,
    LabelValues,
    LedgerShape,
)


@dataclass
class HistogramValue:
    buckets: list[float]  # not cumulative; the last one is +Inf
    sum: float = 0.0

    def copy(self) -> HistogramValue:
        return HistogramValue(list(self.buckets), self.sum)


# A changed series: its key, its value, and for a histogram rendered as OpenMetrics each bucket's exemplar.
Changed = tuple[Key, float | HistogramValue, list[Exemplar | None] | None]


@dataclass
class Overlay:
    """Changes of one batch, applied to the ledger only once the batch's transaction has committed."""

    counters: dict[Key, float] = field(default_factory=dict)
    histograms: dict[Key, HistogramValue] = field(default_factory=dict)
    exemplars: dict[tuple[Key, int], Exemplar] = field(default_factory=dict)
    daily: dict[Key, float] = field(default_factory=dict)  # DAILY_METRICS: stored, never exposed

    def rows(self) -> Iterator[tuple[str, str, str]]:
        for (metric, labels), value in itertools.chain(self.counters.items(), self.daily.items()):
            yield metric, _labels_json(labels), number_json(value)
        for (metric, labels), hist in self.histograms.items():
            # As json.dumps({"b": buckets, "s": sum}) writes it (bucket counts are whole, finite numbers).
            buckets = ", ".join(map(repr, hist.buckets))
            yield metric, _labels_json(labels), f'{{"b": [{buckets}], "s": {number_json(hist.sum)}}}'


_new_tuple = tuple.__new__
# Exemplars are made without NamedTuple's Python constructor while Exemplar has the shape we know; another
# prometheus_client release may add a field, and then its constructor fills it.
_KNOWN_EXEMPLAR = Exemplar._fields == ("labels", "value", "timestamp")

# Each business metric's buckets (empty for a counter); the DAILY_* rows are not in it.
_BUCKETS = {name: spec.buckets for name, spec in SPECS.items()}


def number_json(value: float) -> str:
    """A number as json.dumps writes it: a finite float's repr is the same text, made ten times faster."""
    return repr(value) if value - value == 0 else json.dumps(value)


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
        self._daily: dict[Key, float] = {}  # (DAILY_* metric, (day, model)) -> value
        self._lock = threading.Lock()  # /metrics renders on another thread
        # Series changed since each format was last rendered (see LedgerExposition).
        self._changed: tuple[set[Key], set[Key]] = (set(), set())

    def load(self, rows: Iterable[tuple[str, str, str]]) -> None:
        """Restores persisted values; rows whose labels no longer fit the configured shape are skipped."""
        for metric, labels_json, value_json in rows:
            spec = SPECS.get(metric)
            labels = tuple(json.loads(labels_json))
            if metric in DAILY_METRICS and len(labels) == 2:
                self._daily[(metric, labels)] = float(json.loads(value_json))
                continue
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
        # A settle's hottest loop (~20 increments a generation): each dict is read once, names bound once.
        counters = overlay.counters
        histograms = overlay.histograms
        exemplars = overlay.exemplars
        stored_counters = self._counters
        exemplar: dict[str, str] | None = None
        wanted = bool(item.exemplar)
        for metric, labels, value in item.increments:
            key = (metric, labels)
            buckets = _BUCKETS.get(metric)
            if buckets is None:  # a DAILY_* row
                daily = overlay.daily
                current = daily.get(key)
                daily[key] = (self._daily.get(key, 0.0) if current is None else current) + value
            elif not buckets:
                current = counters.get(key)
                counters[key] = (stored_counters.get(key, 0.0) if current is None else current) + value
            else:
                hist = histograms.get(key)
                if hist is None:
                    stored = self._histograms.get(key)
                    hist = stored.copy() if stored else HistogramValue([0.0] * (len(buckets) + 1))
                    histograms[key] = hist
                index = bisect_left(buckets, value)
                hist.buckets[index] += 1
                hist.sum += value
                if wanted:
                    if exemplar is None:  # one copy for the generation's exemplars (never changed once made)
                        exemplar = dict(item.exemplar)
                    # Exemplar(exemplar, value) without its Python-level constructor (8 a generation).
                    exemplars[(key, index)] = (
                        _new_tuple(Exemplar, (exemplar, value, None)) if _KNOWN_EXEMPLAR
                        else Exemplar(exemplar, value)
                    )

    def apply(self, overlay: Overlay) -> None:
        # Values are replaced, never mutated in place (the overlay holds copies): a renderer may keep
        # references to them after releasing the lock.
        with self._lock:
            self._counters.update(overlay.counters)
            self._histograms.update(overlay.histograms)
            self._exemplars.update(overlay.exemplars)
            self._daily.update(overlay.daily)
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

    def daily(self, day: str) -> dict[str, tuple[float, float]]:
        """Per model on a UTC day (YYYYMMDD): (cost in 1e-10 USD units, generations), as committed."""
        out: dict[str, tuple[float, float]] = {}
        with self._lock:
            for (metric, (row_day, model)), value in self._daily.items():
                if row_day == day:
                    cost, count = out.get(model, (0.0, 0.0))
                    out[model] = (cost + value, count) if metric == DAILY_COST else (cost, count + value)
        return out

    def forget_daily_outside(self, first: str, last: str) -> None:
        """Drops days not in [first, last] from memory (after the store dropped their rows)."""
        with self._lock:
            for key in [key for key in self._daily if not first <= key[1][0] <= last]:
                del self._daily[key]

    def take_changed(self, openmetrics: bool) -> list[Changed]:
        """The series changed since this format last took them, with their values (and, for OpenMetrics,
        each bucket's exemplar); the format's change set starts again empty."""
        index = 1 if openmetrics else 0
        with self._lock:
            keys = self._changed[index]
            self._changed = (self._changed[0], set()) if openmetrics else (set(), self._changed[1])
            changed: list[Changed] = []
            for key in keys:
                if key in self._counters:
                    changed.append((key, self._counters[key], None))
                elif key in self._histograms:
                    hist = self._histograms[key]
                    exemplars = (
                        [self._exemplars.get((key, i)) for i in range(len(hist.buckets))]
                        if openmetrics and self._exemplars
                        else None
                    )
                    changed.append((key, hist, exemplars))
            return changed

    def changed_again(self, keys: Iterable[Key], openmetrics: bool) -> None:
        """Gives back series taken by `take_changed` that could not be rendered."""
        with self._lock:
            self._changed[1 if openmetrics else 0].update(keys)

    def snapshot(
        self,
    ) -> tuple[dict[Key, float], dict[Key, HistogramValue], dict[tuple[Key, int], Exemplar]]:
        with self._lock:
            return dict(self._counters), dict(self._histograms), dict(self._exemplars)
