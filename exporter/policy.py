"""The retry policy: what one lookup's result settles for its id (count it, retry when, give up), a pure function."""

from __future__ import annotations

import random
from dataclasses import dataclass

from exporter.config import ResolveConfig
from exporter.records import GenerationRecord, LookupResult, Outcome
from exporter.state import PendingId

AUTH_PAUSE_SECONDS = 30.0
RATE_LIMIT_PAUSE_SECONDS = 1.0
DRAIN_RETRY_CAP_SECONDS = 2.0
# Past give_up_after_seconds, an id failing for these reasons is abandoned only after this many attempts.
MIN_ATTEMPTS_BEFORE_ABANDONING = 3
TRANSIENT_OUTCOMES = frozenset({Outcome.SERVER_ERROR, Outcome.TIMEOUT, Outcome.CONNECTION_ERROR})
MAX_DOUBLINGS = 1000


@dataclass(frozen=True, slots=True)
class Count:
    """Resolved: the record is counted."""

    record: GenerationRecord


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Abandoned past the give-up horizon, for `reason`; metering without billing is still counted."""

    reason: str
    metering: GenerationRecord | None = None


@dataclass(frozen=True, slots=True)
class RetryAt:
    """Looked up again at `due`, as attempt `attempts` + 1; no lookup at all goes out before `pause_until`."""

    due: float
    attempts: int
    pause_until: float | None = None


Settlement = Count | GiveUp | RetryAt


def backoff(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Exponential backoff with equal jitter: half fixed, half random, so retries of a burst spread out."""
    # 2.0 ** 1024 overflows: an id retried every retry_max_seconds until a long give-up horizon reaches such
    # attempts (1 s and an hour: 3,600), long after the ceiling became `maximum`.
    ceiling = min(maximum, initial * 2.0 ** min(max(attempt - 1, 0), MAX_DOUBLINGS))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


def may_abandon(pending: PendingId, outcome: Outcome) -> bool:
    """Past the horizon: throttling never abandons an id (after an outage the whole backlog would go at the
    first 429), and a failing API or network only once the id has been tried a few times."""
    if outcome is Outcome.RATE_LIMITED:
        return False
    if outcome in TRANSIENT_OUTCOMES:
        return pending.attempts >= MIN_ATTEMPTS_BEFORE_ABANDONING
    return True


def decide(
    pending: PendingId,
    result: LookupResult,
    now: float,
    config: ResolveConfig,
    *,
    rng: random.Random,
    draining: bool = False,
) -> Settlement:
    """What `result` (the lookup of `pending`, attempt pending.attempts + 1, ending at `now`) settles.

    Unauthorized and rate-limited answers do not count an attempt and pause every lookup; other failures are
    retried with backoff (at least Retry-After; at most DRAIN_RETRY_CAP_SECONDS while draining) until the id
    is older than give_up_after_seconds and `may_abandon` says so. `rng` draws the backoff's jitter.
    """
    outcome = result.outcome
    if outcome is Outcome.UNAUTHORIZED:
        return RetryAt(now + AUTH_PAUSE_SECONDS, pending.attempts, now + AUTH_PAUSE_SECONDS)
    if outcome is Outcome.RESOLVED:
        assert result.record is not None
        return Count(result.record)
    if now - pending.first_seen >= config.give_up_after_seconds and may_abandon(pending, outcome):
        return GiveUp(outcome.value, result.record if outcome is Outcome.NOT_READY else None)
    if outcome is Outcome.RATE_LIMITED:
        wait = result.retry_after if result.retry_after is not None else RATE_LIMIT_PAUSE_SECONDS
        return RetryAt(now + wait, pending.attempts, now + wait)
    attempt = pending.attempts + 1
    delay = backoff(attempt, config.retry_initial_seconds, config.retry_max_seconds, rng)
    if result.retry_after is not None:
        delay = max(delay, result.retry_after)
    if draining:
        delay = min(delay, DRAIN_RETRY_CAP_SECONDS)
    return RetryAt(now + delay, attempt)
