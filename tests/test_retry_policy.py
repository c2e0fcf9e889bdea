"""The retry policy, by table: what each lookup outcome settles for an id, by its age, its attempts, Retry-After
and draining. Past the give-up horizon rate limiting never abandons, transient failures only after three
attempts, other failures at the first, unauthorized never."""

from __future__ import annotations

import random

import pytest

from exporter.config import ResolveConfig
from exporter.policy import Count, GiveUp, RetryAt, Settlement, decide
from exporter.records import GenerationRecord, LookupResult, Outcome
from exporter.state import PendingId

NOW = 10_000.0
CONFIG = ResolveConfig(retry_initial_seconds=1, retry_max_seconds=10, give_up_after_seconds=100)
OLD, YOUNG = 1000.0, 1.0  # seconds since the id was first seen: past the horizon, within it
RECORD = GenerationRecord(
    generation_id="g1", model="m", protocol="chat.completions", latency_seconds=None, generation_seconds=None,
    prompt_tokens=1, completion_tokens=2, reasoning_tokens=0, cached_tokens=0, streamed=None, finish_reason="stop",
    upstream_retries=0, billing=None,
)


class NoJitter(random.Random):
    """Backoff at the low end of its jitter: half the ceiling."""

    def random(self) -> float:
        return 0.0


TRANSIENT = [Outcome.SERVER_ERROR, Outcome.TIMEOUT, Outcome.CONNECTION_ERROR]
FINAL = [Outcome.NOT_READY, Outcome.MALFORMED, Outcome.CLIENT_ERROR, Outcome.TOO_LARGE]

# (outcome, attempts so far, age, Retry-After, draining) -> settlement. Backoff for attempt n (attempts + 1):
# min(10, 1 * 2 ** (n - 1)) / 2 without jitter.
TABLE: list[tuple[Outcome, int, float, float | None, bool, Settlement]] = [
    (Outcome.RESOLVED, 0, YOUNG, None, False, Count(RECORD)),
    (Outcome.RESOLVED, 9, OLD, None, False, Count(RECORD)),
    # Unauthorized: no attempt counted, every lookup paused 30 s, never abandoned.
    (Outcome.UNAUTHORIZED, 2, YOUNG, None, False, RetryAt(NOW + 30, 2, NOW + 30)),
    (Outcome.UNAUTHORIZED, 9, OLD, None, False, RetryAt(NOW + 30, 9, NOW + 30)),
    # Rate limited: no attempt counted, every lookup paused for Retry-After (1 s without), never abandoned.
    (Outcome.RATE_LIMITED, 2, YOUNG, None, False, RetryAt(NOW + 1, 2, NOW + 1)),
    (Outcome.RATE_LIMITED, 2, YOUNG, 7.0, False, RetryAt(NOW + 7, 2, NOW + 7)),
    (Outcome.RATE_LIMITED, 10, OLD, None, False, RetryAt(NOW + 1, 10, NOW + 1)),
    # Past the horizon, transient failures are retried until three attempts were made, then abandoned.
    *[(o, a, OLD, None, False, RetryAt(NOW + 2.0 ** a / 2, a + 1)) for o in TRANSIENT for a in (0, 1, 2)],
    *[(o, 3, OLD, None, False, GiveUp(o.value)) for o in TRANSIENT],
    # Other failures are abandoned at the first past the horizon; not_ready keeps its metering.
    *[(o, 0, OLD, None, False, GiveUp(o.value, RECORD if o is Outcome.NOT_READY else None)) for o in FINAL],
    # Within the horizon everything is retried with backoff, capped at retry_max_seconds.
    *[(o, 0, YOUNG, None, False, RetryAt(NOW + 0.5, 1)) for o in TRANSIENT + FINAL],
    (Outcome.SERVER_ERROR, 3, YOUNG, None, False, RetryAt(NOW + 4, 4)),
    (Outcome.SERVER_ERROR, 50, YOUNG, None, False, RetryAt(NOW + 5, 51)),
    # Retry-After lengthens a backoff, never shortens it; draining caps the wait at 2 s.
    (Outcome.SERVER_ERROR, 0, YOUNG, 20.0, False, RetryAt(NOW + 20, 1)),
    (Outcome.SERVER_ERROR, 5, YOUNG, 0.1, False, RetryAt(NOW + 5, 6)),
    (Outcome.SERVER_ERROR, 5, YOUNG, None, True, RetryAt(NOW + 2, 6)),
    (Outcome.SERVER_ERROR, 0, YOUNG, 20.0, True, RetryAt(NOW + 2, 1)),
    (Outcome.NOT_READY, 0, YOUNG, None, True, RetryAt(NOW + 0.5, 1)),
]


@pytest.mark.parametrize(
    ("outcome", "attempts", "age", "retry_after", "draining", "expected"),
    TABLE,
    ids=[f"{row[0].value}-attempts{row[1]}-age{row[2]:g}-ra{row[3]}-drain{row[4]}" for row in TABLE],
)
def test_decide(
    outcome: Outcome, attempts: int, age: float, retry_after: float | None, draining: bool, expected: Settlement
) -> None:
    record = RECORD if outcome in (Outcome.RESOLVED, Outcome.NOT_READY) else None
    pending = PendingId("g1", "src", (), NOW - age, attempts)
    result = LookupResult(outcome, 200, None, record, retry_after, "x")
    assert decide(pending, result, NOW, CONFIG, rng=NoJitter(), draining=draining) == expected


def test_the_horizon_is_inclusive() -> None:
    pending = PendingId("g1", "src", (), NOW - CONFIG.give_up_after_seconds, 0)
    result = LookupResult(Outcome.MALFORMED, 200, None, None, None, "x")
    assert decide(pending, result, NOW, CONFIG, rng=NoJitter()) == GiveUp("malformed")


def test_backoff_jitter_stays_within_half_and_all_of_the_ceiling() -> None:
    pending = PendingId("g1", "src", (), NOW, 3)  # attempt 4: ceiling 8 s
    result = LookupResult(Outcome.TIMEOUT, None, None, None, None, "x")
    rng = random.Random(5)
    dues = [decide(pending, result, NOW, CONFIG, rng=rng) for _ in range(200)]
    delays = [d.due - NOW for d in dues if isinstance(d, RetryAt)]
    assert len(delays) == 200 and min(delays) >= 4 and max(delays) <= 8 and len(set(delays)) > 100
