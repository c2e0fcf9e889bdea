"""What a resolved generation adds to each business metric: specs, buckets, label caps, increments."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from exporter.records import GenerationRecord

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


# Internal ledger rows, never exposed as such: cost and generations per UTC day of createAt and model, labels
# (day, model), for reconciling with ZenMux's account cost (exporter/reconcile.py). Stored with the rest of the
# ledger, so every state backend keeps them in the same transaction. Cost is an integer count of 1e-10 USD, the
# precision of ZenMux's decimal strings: sums of whole numbers in a float are exact up to 2**53 units
# (~900,000 USD per day and model), so the books compare to the last digit with no float drift.
DAILY_COST = "daily:cost_1e-10_usd"
DAILY_GENERATIONS = "daily:generations"
DAILY_METRICS = frozenset({DAILY_COST, DAILY_GENERATIONS})
COST_UNITS_PER_USD = 10**10


# Values a fleet refused (see LabelLimiter.refuse) are remembered up to this many per label; past it, an unknown
# value is asked about again (a round trip) rather than remembered (memory).
MAX_REFUSED_PER_LABEL = 10_000
# Label tuples kept per combination of a record's label values (see `_labels`); past this many, they start again.
MAX_LABEL_SETS = 4096
MAX_FEE_ITEMS_PER_LABEL_SET = 64


class LabelLimiter:
    """Caps distinct values per label (overflow becomes "other") and truncates long values.

    Alone, it admits values first come, first served. In a fleet the database admits them for every resolver
    (PostgresStore.admit_labels): what it named is `remember`ed, what it refused is `refuse`d, so a value is
    never named on one resolver and "other" on another, and the caps hold for the fleet."""

    def __init__(self, max_models: int, max_values: int, max_length: int) -> None:
        self._caps = {"model": max_models}
        self._default_cap = max_values
        self.max_length = max_length
        self._known: dict[str, set[str]] = {}
        self._refused: dict[str, set[str]] = {}
        self.overflows: dict[str, int] = {}
        self.folded = 0  # values folded into "other", all labels together
        # `contribution`'s label tuples per combination of raw values, made while every value in it was named.
        # Named values stay named (nothing is ever forgotten here), so such a combination's tuples never change.
        self.label_sets: dict[tuple[str | bool | None, ...], LabelSet] = {}

    def cap(self, label: str) -> int:
        return self._caps.get(label, self._default_cap)

    def remember(self, label: str, value: str) -> None:
        self._known.setdefault(label, set()).add(value)

    def refuse(self, label: str, value: str) -> None:
        refused = self._refused.setdefault(label, set())
        if len(refused) < MAX_REFUSED_PER_LABEL:
            refused.add(value)

    def decided(self, label: str, raw: str) -> bool:
        """Whether the value's fate is known here (named or refused), without asking anyone."""
        value = raw[: self.max_length]
        return value in self._known.get(label, ()) or value in self._refused.get(label, ())

    def known(self) -> list[tuple[str, str]]:
        return [(label, value) for label, values in self._known.items() for value in values]

    def value(self, label: str, raw: str) -> str:
        value = raw[: self.max_length]
        known = self._known.setdefault(label, set())
        if value in known:
            return value
        if len(known) >= self._caps.get(label, self._default_cap) or value in self._refused.get(label, ()):
            self.overflows[label] = self.overflows.get(label, 0) + 1
            self.folded += 1
            return OTHER
        known.add(value)
        return value


class Increment(NamedTuple):
    """One series' increase (a tuple: ~20 are made for each resolved generation, and a frozen dataclass's
    constructor costs three times as much)."""

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


def labels_asked(record: GenerationRecord, extra: Mapping[str, str], shape: LedgerShape) -> list[tuple[str, str]]:
    """The (label, raw value) pairs `contribution` asks its limiter about, without building it: what a fleet's
    resolver has the database decide first (tests/test_contribution checks the two agree)."""
    asked = [("model", record.model), ("protocol", record.protocol), ("finish_reason", record.finish_reason)]
    asked += [(name, extra[name]) for name in shape.extra_labels if extra.get(name)]
    if record.billing is not None:
        asked += [("fee_item", item.code) for item in record.billing.fee_items]
    return asked


class LabelSet:
    """The label tuples of every increment of a generation with given label values (the fee items' as they come)."""

    __slots__ = ("base", "fee_items", "generations", "plain", "tail", "tokens")

    def __init__(self, base: LabelValues, tail: LabelValues, generations: LabelValues) -> None:
        self.base = base
        self.tail = tail
        self.plain = base + tail  # the labels of a metric with none of its own
        self.generations = generations
        self.tokens = tuple((*base, token_type, *tail) for token_type in TOKEN_TYPES)
        self.fee_items: dict[str, LabelValues] = {}

    def fee_item(self, limiter: LabelLimiter, code: str) -> LabelValues:
        labels = self.fee_items.get(code)
        if labels is None:
            folded = limiter.folded
            labels = (*self.base, limiter.value("fee_item", code), *self.tail)
            if limiter.folded == folded and len(self.fee_items) < MAX_FEE_ITEMS_PER_LABEL_SET:
                self.fee_items[code] = labels
        return labels


def _labels(record: GenerationRecord, extra: Mapping[str, str], shape: LedgerShape, limiter: LabelLimiter) -> LabelSet:
    """The label tuples of `record`'s increments, asking the limiter in the order it always was (model, protocol,
    extra labels, finish reason): kept for the next generation with the same values unless one was folded into
    "other" (each fold is counted, so such a generation asks again). Building them was a third of `contribution`."""
    names = shape.extra_labels
    key = (record.model, record.protocol, record.finish_reason, record.streamed, *(extra.get(n) or "" for n in names))
    sets = limiter.label_sets
    found = sets.get(key)
    if found is not None:
        return found
    folded = limiter.folded
    base = (limiter.value("model", record.model), limiter.value("protocol", record.protocol))
    tail = tuple(limiter.value(name, extra.get(name, "")) if extra.get(name) else "" for name in names)
    streamed = "unknown" if record.streamed is None else str(record.streamed).lower()
    made = LabelSet(base, tail, (*base, streamed, limiter.value("finish_reason", record.finish_reason), *tail))
    if limiter.folded == folded:
        if len(sets) >= MAX_LABEL_SETS:
            sets.clear()
        sets[key] = made
    return made


def contribution(
    record: GenerationRecord,
    extra: Mapping[str, str],
    shape: LedgerShape,
    limiter: LabelLimiter,
    exemplar: Mapping[str, str],
) -> Contribution:
    """The increments one resolved generation makes (pure but for the limiter's memory of seen values)."""
    labels = _labels(record, extra, shape, limiter)
    plain = labels.plain
    out = [Increment("zenmux_generations", labels.generations, 1.0)]
    append = out.append
    prompt, completion, reasoning, cached = labels.tokens
    for token_labels, count in (
        (prompt, float(record.prompt_tokens)),
        (completion, float(record.completion_tokens)),
        (reasoning, float(record.reasoning_tokens)),
        (cached, float(record.cached_tokens)),
    ):
        append(Increment("zenmux_tokens", token_labels, count))
        append(Increment("zenmux_generation_tokens", token_labels, count))
    if record.latency_seconds is not None:
        append(Increment("zenmux_first_token_latency_seconds", plain, record.latency_seconds))
    if record.generation_seconds is not None:
        append(Increment("zenmux_generation_duration_seconds", plain, record.generation_seconds))
    retries = float(record.upstream_retries)
    append(Increment("zenmux_upstream_retries", plain, retries))
    append(Increment("zenmux_generation_upstream_retries", plain, retries))
    billing = record.billing
    if record.day:
        daily = (record.day, labels.base[0])
        append(Increment(DAILY_GENERATIONS, daily, 1.0))
        if billing is not None:
            # Amounts carry at most 10 decimals, so the nearest whole unit is the amount itself.
            append(Increment(DAILY_COST, daily, float(round(billing.bill_usd * COST_UNITS_PER_USD))))
    if billing is not None:
        append(Increment("zenmux_cost_usd", plain, billing.bill_usd))
        append(Increment("zenmux_cost_origin_usd", plain, billing.origin_usd))
        append(Increment("zenmux_cost_discount_usd", plain, billing.discount_usd))
        append(Increment("zenmux_credits", plain, billing.credits))
        append(Increment("zenmux_generation_cost_usd", plain, billing.bill_usd))
        for item in billing.fee_items:
            append(Increment("zenmux_cost_by_fee_item_usd", labels.fee_item(limiter, item.code), item.bill_usd))
    return Contribution(tuple(out), exemplar)
