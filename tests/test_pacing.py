"""Pacing of lookups, on a clock the test moves: the rate limit's token bucket and the retry backoff."""

from __future__ import annotations

import random
from itertools import pairwise

import pytest

from exporter.pacing import TokenBucket
from exporter.policy import backoff
from tests.support import FakeTime


async def test_the_bucket_lets_a_burst_through_then_paces_at_the_rate() -> None:
    time = FakeTime()
    bucket = TokenBucket(10.0, 4.0, monotonic=time.monotonic, sleep=time.sleep)
    granted = []
    for _ in range(24):
        await bucket.acquire()
        granted.append(time.now)
    assert granted[:4] == [100.0] * 4  # the burst: no wait
    assert granted[-1] == pytest.approx(100.0 + (24 - 4) / 10.0)  # then 10 a second
    gaps = [b - a for a, b in pairwise(granted[4:])]
    assert gaps == pytest.approx([0.1] * len(gaps))


async def test_an_idle_bucket_refills_up_to_its_burst_only() -> None:
    time = FakeTime()
    bucket = TokenBucket(2.0, 3.0, monotonic=time.monotonic, sleep=time.sleep)
    for _ in range(3):
        await bucket.acquire()
    time.now += 3600  # an hour idle refills 3 tokens, not 7,200
    for _ in range(3):
        await bucket.acquire()
    assert time.sleeps == []
    await bucket.acquire()
    assert time.sleeps == [pytest.approx(0.5)]


@pytest.mark.parametrize(
    ("attempt", "low", "high"),
    [(1, 15.0, 30.0), (2, 30.0, 60.0), (3, 60.0, 120.0), (6, 150.0, 300.0), (50, 150.0, 300.0)],
)
def test_backoff_doubles_to_its_cap_with_equal_jitter(attempt: int, low: float, high: float) -> None:
    rng = random.Random(7)
    delays = [backoff(attempt, 30.0, 300.0, rng) for _ in range(200)]
    assert all(low <= d <= high for d in delays)
    assert max(delays) - min(delays) > (high - low) / 2  # spread, so a burst of retries does not come back at once
