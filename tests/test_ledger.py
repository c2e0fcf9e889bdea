"""What a generation adds to the ledger, the cardinality caps, and the rendered families (plain sample values)."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry

from exporter.contribution import OTHER, LabelLimiter, LedgerShape, contribution, labels_asked
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
