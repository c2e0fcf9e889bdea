"""The reference exposition: prometheus_client's own bytes for a ledger, and random ledgers with nasty labels."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry
from prometheus_client import exposition as text_format
from prometheus_client.openmetrics import exposition as openmetrics

from exporter.contribution import contribution
from exporter.exposition import LedgerCollector
from exporter.ledger import Ledger
from exporter.zenmux import Billing, FeeItem, GenerationRecord

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
