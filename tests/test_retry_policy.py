"""The retry policy past the give-up horizon: rate limiting never abandons, transient failures only after three
attempts, other failures at the first, unauthorized never."""

from __future__ import annotations

import random
from typing import Any, cast

import pytest
from opentelemetry import trace
from prometheus_client import CollectorRegistry

from exporter.clock import ManualClock
from exporter.config import ResolveConfig
from exporter.records import LookupResult, Outcome
from exporter.resolver import Resolver
from exporter.state import Abandon, PendingId, Retry
from exporter.telemetry import SelfMetrics


def make_resolver(clock: ManualClock, give_up: float = 100.0) -> Resolver:
    return Resolver(
        cast(Any, None),
        cast(Any, None),
        cast(Any, None),
        ResolveConfig(retry_initial_seconds=1, retry_max_seconds=10, give_up_after_seconds=give_up),
        concurrency=4,
        max_requests_per_second=10,
        metrics=SelfMetrics(CollectorRegistry()),
        tracer=trace.get_tracer("test"),
        clock=clock,
        rng=random.Random(1),
    )


def decide(resolver: Resolver, outcome: Outcome, *, attempts: int, first_seen: float) -> object:
    pending = PendingId("g1", "src", cast(Any, {}), first_seen, attempts)
    return resolver._decide(pending, attempts + 1, LookupResult(outcome, detail="x"), None)


async def test_rate_limiting_never_abandons_an_id_past_the_horizon() -> None:
    clock = ManualClock()
    resolver = make_resolver(clock)
    settlement = decide(resolver, Outcome.RATE_LIMITED, attempts=10, first_seen=clock.now - 1000)
    assert isinstance(settlement, Retry)
    assert settlement.attempts == 10  # a 429 does not count an attempt


@pytest.mark.parametrize("outcome", [Outcome.SERVER_ERROR, Outcome.TIMEOUT, Outcome.CONNECTION_ERROR])
async def test_transient_failures_abandon_past_the_horizon_only_after_three_attempts(outcome: Outcome) -> None:
    clock = ManualClock()
    resolver = make_resolver(clock)
    old = clock.now - 1000
    for attempts in (0, 1, 2):
        settlement = decide(resolver, outcome, attempts=attempts, first_seen=old)
        assert isinstance(settlement, Retry), (outcome, attempts)
        assert settlement.attempts == attempts + 1
    settlement = decide(resolver, outcome, attempts=3, first_seen=old)
    assert isinstance(settlement, Abandon) and settlement.reason == outcome.value
    # Within the horizon: retried whatever the attempts.
    assert isinstance(decide(resolver, outcome, attempts=50, first_seen=clock.now - 1), Retry)


@pytest.mark.parametrize("outcome", [Outcome.NOT_READY, Outcome.MALFORMED, Outcome.CLIENT_ERROR, Outcome.TOO_LARGE])
async def test_other_failures_still_abandon_at_the_first_failure_past_the_horizon(outcome: Outcome) -> None:
    clock = ManualClock()
    resolver = make_resolver(clock)
    settlement = decide(resolver, outcome, attempts=0, first_seen=clock.now - 1000)
    assert isinstance(settlement, Abandon) and settlement.reason == outcome.value


async def test_unauthorized_never_abandons() -> None:
    clock = ManualClock()
    resolver = make_resolver(clock)
    assert isinstance(decide(resolver, Outcome.UNAUTHORIZED, attempts=9, first_seen=clock.now - 1000), Retry)
