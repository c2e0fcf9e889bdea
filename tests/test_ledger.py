"""What a generation adds to the ledger, the cardinality caps, and the rendered families (plain sample values)."""

from __future__ import annotations

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from exporter.contribution import (
    DAILY_COST,
    DAILY_GENERATIONS,
    OTHER,
    Contribution,
    Increment,
    LabelLimiter,
    LedgerShape,
    contribution,
    labels_asked,
)
from exporter.ledger import Ledger
from exporter.records import Billing, FeeItem, GenerationRecord
from tests.exposition_oracle import LedgerCollector


def record(model: str = "openai/gpt-4.1", *, billed: bool = True, latency: float | None = 0.7) -> GenerationRecord:
    fees = (FeeItem("prompt", 0.004, 0.005, 0.001), FeeItem("completion", 0.006, 0.007, 0.001))
    billing = Billing(0.01, 0.012, 0.002, 0.01, fees)
    return GenerationRecord(
        generation_id="g1",
        model=model,
        protocol="chat.completions",
        latency_seconds=latency,
        generation_seconds=3.0,
        prompt_tokens=1200,
        completion_tokens=350,
        reasoning_tokens=120,
        cached_tokens=800,
        streamed=True,
        finish_reason="stop",
        upstream_retries=2,
        billing=billing if billed else None,
    )


def book(max_models: int = 10, extra: tuple[str, ...] = ("feature",)) -> tuple[Ledger, CollectorRegistry]:
    ledger = Ledger(LedgerShape(extra), LabelLimiter(max_models, 10, 20))
    registry = CollectorRegistry()
    registry.register(LedgerCollector(ledger))
    return ledger, registry


def add(ledger: Ledger, *records: GenerationRecord, feature: str = "chat") -> None:
    overlay = ledger.overlay()
    for r in records:
        item = contribution(r, {"feature": feature}, ledger.shape, ledger.limiter, {"generation_id": r.generation_id})
        ledger.add(overlay, item)
    ledger.apply(overlay)


def test_one_generation_adds_every_business_metric() -> None:
    ledger, registry = book()
    add(ledger, record())
    labels = {"model": "openai/gpt-4.1", "protocol": "chat.completions", "feature": "chat"}
    get = registry.get_sample_value
    assert get("zenmux_generations_total", {**labels, "streamed": "true", "finish_reason": "stop"}) == 1
    for token_type, count in (("prompt", 1200), ("completion", 350), ("reasoning", 120), ("cached", 800)):
        assert get("zenmux_tokens_total", {**labels, "token_type": token_type}) == count
        assert get("zenmux_generation_tokens_sum", {**labels, "token_type": token_type}) == count
    assert get("zenmux_generation_tokens_bucket", {**labels, "token_type": "prompt", "le": "1024.0"}) == 0
    assert get("zenmux_generation_tokens_bucket", {**labels, "token_type": "prompt", "le": "4096.0"}) == 1
    assert get("zenmux_generation_tokens_bucket", {**labels, "token_type": "prompt", "le": "+Inf"}) == 1
    assert get("zenmux_first_token_latency_seconds_bucket", {**labels, "le": "1.0"}) == 1
    assert get("zenmux_first_token_latency_seconds_bucket", {**labels, "le": "0.5"}) == 0
    assert get("zenmux_generation_duration_seconds_sum", labels) == 3.0
    assert get("zenmux_upstream_retries_total", labels) == 2
    assert get("zenmux_cost_usd_total", labels) == 0.01
    assert get("zenmux_cost_origin_usd_total", labels) == 0.012
    assert get("zenmux_cost_discount_usd_total", labels) == 0.002
    assert get("zenmux_credits_total", labels) == 0.01
    assert get("zenmux_cost_by_fee_item_usd_total", {**labels, "fee_item": "completion"}) == 0.006
    assert get("zenmux_generation_cost_usd_count", labels) == 1


def test_metering_only_has_no_cost_series_and_missing_latency_is_not_zero() -> None:
    ledger, registry = book()
    add(ledger, record(billed=False, latency=None))
    labels = {"model": "openai/gpt-4.1", "protocol": "chat.completions", "feature": "chat"}
    assert registry.get_sample_value("zenmux_cost_usd_total", labels) is None
    assert registry.get_sample_value("zenmux_first_token_latency_seconds_count", labels) is None
    assert registry.get_sample_value("zenmux_tokens_total", {**labels, "token_type": "prompt"}) == 1200


def test_model_cap_folds_the_rest_into_other_and_counts_it() -> None:
    ledger, registry = book(max_models=2)
    add(ledger, record("a"), record("b"), record("c"), record("d"), record("a"))
    models = {
        s.labels["model"]
        for family in registry.collect()
        if family.name == "zenmux_generations"
        for s in family.samples
    }
    assert models == {"a", "b", OTHER}
    assert ledger.limiter.overflows == {"model": 2}


def test_long_label_values_are_truncated_and_caps_survive_a_restart() -> None:
    ledger, _ = book(max_models=2)
    add(ledger, record("m" * 100), feature="f" * 50)
    key = next(iter(ledger.snapshot()[0]))
    assert key[1][0] == "m" * 20 and key[1][-1] == "f" * 20
    add(ledger, record("second"))
    rows = [
        (metric, json.dumps(labels), json.dumps(v))
        for (metric, labels), v in ledger.snapshot()[0].items()
    ]
    restored, _ = book(max_models=2)
    restored.load(rows)
    add(restored, record("third"))
    assert restored.limiter.overflows == {"model": 1}


def test_changed_series_are_handed_out_once_per_format_and_can_be_given_back() -> None:
    ledger, _ = book()
    add(ledger, record())
    cost_key = ("zenmux_cost_usd", ("openai/gpt-4.1", "chat.completions", "chat"))
    text = {key for key, _, _ in ledger.take_changed(openmetrics=False)}
    assert cost_key in text
    assert ledger.take_changed(openmetrics=False) == []  # taken: nothing changed since
    # A render that failed gives its series back; the other format never lost them.
    ledger.changed_again(text, openmetrics=False)
    again = ledger.take_changed(openmetrics=False)
    assert {key for key, _, _ in again} == text
    assert {key: value for key, value, _ in again}[cost_key] == 0.01
    assert {key for key, _, _ in ledger.take_changed(openmetrics=True)} == text


class AskedLimiter(LabelLimiter):
    """Records what contribution() asks, for comparison with labels_asked()."""

    def __init__(self) -> None:
        super().__init__(10, 10, 64)
        self.asked: list[tuple[str, str]] = []

    def value(self, label: str, raw: str) -> str:
        self.asked.append((label, raw))
        return super().value(label, raw)


def test_labels_asked_lists_what_contribution_asks_the_limiter() -> None:
    """A fleet's resolver has the database decide these values before contribution() uses them: a label
    contribution() asks about and labels_asked() leaves out would be decided per resolver again."""
    shape = LedgerShape(("feature", "team"))
    for generation, extra in [(record(), {"feature": "chat"}), (record(billed=False), {}),
                              (record("x/y", latency=None), {"feature": "chat", "team": "a"})]:
        limiter = AskedLimiter()
        contribution(generation, extra, shape, limiter, {})
        assert sorted(limiter.asked) == sorted(labels_asked(generation, extra, shape))


# --------------------------------------------------------------------------- the hot path against plain references


def reference_increments(
    record: GenerationRecord, extra: dict[str, str], shape: LedgerShape, limiter: LabelLimiter
) -> list[tuple[str, tuple[str, ...], float]]:
    """What `contribution` must add, written plainly (its code before it was made fast), limiter calls in order."""
    base = (limiter.value("model", record.model), limiter.value("protocol", record.protocol))
    tail = tuple(limiter.value(name, extra.get(name, "")) if extra.get(name) else "" for name in shape.extra_labels)
    out: list[tuple[str, tuple[str, ...], float]] = []

    def put(metric: str, value: float | None, *labels: str) -> None:
        if value is not None:
            out.append((metric, (*base, *labels, *tail), value))

    streamed = "unknown" if record.streamed is None else str(record.streamed).lower()
    put("zenmux_generations", 1.0, streamed, limiter.value("finish_reason", record.finish_reason))
    for token_type, count in (("prompt", record.prompt_tokens), ("completion", record.completion_tokens),
                              ("reasoning", record.reasoning_tokens), ("cached", record.cached_tokens)):
        put("zenmux_tokens", float(count), token_type)
        put("zenmux_generation_tokens", float(count), token_type)
    put("zenmux_first_token_latency_seconds", record.latency_seconds)
    put("zenmux_generation_duration_seconds", record.generation_seconds)
    put("zenmux_upstream_retries", float(record.upstream_retries))
    put("zenmux_generation_upstream_retries", float(record.upstream_retries))
    if record.day:
        out.append((DAILY_GENERATIONS, (record.day, base[0]), 1.0))
        if record.billing is not None:
            out.append((DAILY_COST, (record.day, base[0]), float(round(record.billing.bill_usd * 10**10))))
    if record.billing is not None:
        b = record.billing
        for metric, amount in (("zenmux_cost_usd", b.bill_usd), ("zenmux_cost_origin_usd", b.origin_usd),
                               ("zenmux_cost_discount_usd", b.discount_usd), ("zenmux_credits", b.credits),
                               ("zenmux_generation_cost_usd", b.bill_usd)):
            put(metric, amount)
        for item in b.fee_items:
            put("zenmux_cost_by_fee_item_usd", item.bill_usd, limiter.value("fee_item", item.code))
    return out


amounts = st.floats(0, 10, allow_nan=False)
seconds = st.one_of(st.none(), st.floats(0, 700, allow_nan=False))
names = st.sampled_from(["a", "b", "c", "d", "e", "x" * 30])
records = st.builds(
    GenerationRecord,
    generation_id=st.just("g"),
    model=names,
    protocol=names,
    latency_seconds=seconds,
    generation_seconds=seconds,
    prompt_tokens=st.integers(0, 10**7),
    completion_tokens=st.integers(0, 10**7),
    reasoning_tokens=st.integers(0, 10**7),
    cached_tokens=st.integers(0, 10**7),
    streamed=st.one_of(st.none(), st.booleans()),
    finish_reason=names,
    upstream_retries=st.integers(0, 20),
    billing=st.one_of(st.none(), st.builds(
        Billing, amounts, amounts, amounts, amounts,
        st.lists(st.builds(FeeItem, names, amounts, amounts, amounts), max_size=3).map(tuple),
    )),
    day=st.sampled_from(["", "20261207", "20261208"]),
)
extras = st.fixed_dictionaries({"feature": st.sampled_from(["", "chat", "search", "y" * 30])})


@settings(max_examples=150, deadline=None)
@given(batch=st.lists(st.tuples(records, extras), min_size=1, max_size=8), caps=st.integers(1, 4))
def test_contributions_and_the_rows_written_match_the_plain_reference(
    batch: list[tuple[GenerationRecord, dict[str, str]]], caps: int
) -> None:
    """The increments (labels capped and truncated, in the limiter's order), the ledger they make and the rows
    written for it are those of the plain reference: json.dumps of every value, as the rows always were."""
    shape = LedgerShape(("feature",))
    limiter, twin = LabelLimiter(caps, caps, 20), LabelLimiter(caps, caps, 20)
    ledger = Ledger(shape, limiter)
    overlay = ledger.overlay()
    for generation, extra in batch:
        item = contribution(generation, extra, shape, limiter, {"generation_id": "g"})
        assert [tuple(inc) for inc in item.increments] == reference_increments(generation, extra, shape, twin)
        ledger.add(overlay, item)
    assert limiter.overflows == twin.overflows
    expected = [(m, json.dumps(labels), json.dumps(v)) for (m, labels), v in overlay.counters.items()]
    expected += [(m, json.dumps(labels), json.dumps(v)) for (m, labels), v in overlay.daily.items()]
    expected += [(m, json.dumps(labels), json.dumps({"b": h.buckets, "s": h.sum}))
                 for (m, labels), h in overlay.histograms.items()]
    assert list(overlay.rows()) == expected
    # the rows load back into the same values, and a second batch on top of them writes what it adds
    ledger.apply(overlay)
    again = Ledger(shape, LabelLimiter(caps, caps, 20))
    again.load(overlay.rows())
    assert again.snapshot()[:2] == ledger.snapshot()[:2]


def test_a_histogram_loaded_with_whole_numbers_is_written_as_json_writes_it() -> None:
    """Rows written by older exporters may hold integers and a non-finite sum reads back as it was written."""
    ledger, _ = book()
    key = '["m", "p", ""]'
    ledger.load([("zenmux_generation_cost_usd", key, json.dumps({"b": [0, 2] + [0] * 12, "s": 0.5}))])
    overlay = ledger.overlay()
    ledger.add(overlay, Contribution((Increment("zenmux_generation_cost_usd", ("m", "p", ""), 2e-6),), {}))
    ledger.add(overlay, Contribution((Increment("zenmux_cost_usd", ("m", "p", ""), math.inf),), {}))
    rows = {metric: value for metric, _labels, value in overlay.rows()}
    assert rows["zenmux_generation_cost_usd"] == json.dumps({"b": [0, 3] + [0] * 12, "s": 0.500002})
    assert rows["zenmux_cost_usd"] == json.dumps(math.inf)


def test_the_exemplars_of_one_generation_carry_its_labels() -> None:
    ledger, _ = book()
    overlay = ledger.overlay()
    ledger.add(overlay, contribution(record(), {}, ledger.shape, ledger.limiter, {"generation_id": "g1"}))
    ledger.add(overlay, contribution(record(latency=9.0), {}, ledger.shape, ledger.limiter, {"generation_id": "g2"}))
    # each bucket's exemplar is its last generation's: g2's everywhere but g1's latency bucket (0.7 s, g2's 9 s)
    by_series = {key: e.labels for key, e in overlay.exemplars.items()}
    assert len(by_series) == 9  # four token types, latency, duration, retries, cost; then g2's latency
    assert [key[0][0] for key, labels in by_series.items() if labels == {"generation_id": "g1"}] == [
        "zenmux_first_token_latency_seconds"
    ]


def test_label_tuples_are_kept_only_while_every_value_is_named() -> None:
    """A generation whose labels were all named reuses its label tuples (the limiter is not asked again); one with
    a value folded into "other" asks again, so every such generation is counted as an overflow."""
    shape = LedgerShape(("feature",))
    limiter = AskedLimiter()
    first = contribution(record("a/one"), {"feature": "chat"}, shape, limiter, {})
    asked = len(limiter.asked)
    again = contribution(record("a/one"), {"feature": "chat"}, shape, limiter, {})
    assert len(limiter.asked) == asked  # kept: nothing asked
    assert again.increments == first.increments
    for i in range(9):  # fills the model cap (10)
        contribution(record(f"b/{i}"), {}, shape, limiter, {})
    for _ in range(3):
        folded = contribution(record("c/over"), {}, shape, limiter, {})
        assert folded.increments[0].labels[0] == OTHER
    assert limiter.overflows["model"] == 3
