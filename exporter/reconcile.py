"""Reconciliation with ZenMux's own books: account cost per day and model against the ledger, and the balance."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TypeVar

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter.account import AccountClient, Balance, ModelCost, PollError, add_known
from exporter.clock import Clock
from exporter.config import ReconcileConfig
from exporter.contribution import COST_UNITS_PER_USD, LabelLimiter
from exporter.ledger import Ledger
from exporter.pacing import TokenBucket
from exporter.records import Outcome
from exporter.store import Store
from exporter.telemetry import SelfMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")

ENDPOINTS = ("cost", "balance")
BACKOFF_INITIAL_SECONDS = 5.0


# --- days (pure) ------------------------------------------------------------------------------------------


def utc_day(when: datetime) -> str:
    return when.strftime("%Y%m%d")


def closed_and_open_days(now: float) -> dict[str, str]:
    """{"yesterday": YYYYMMDD, "today": YYYYMMDD} in UTC at `now`."""
    today = datetime.fromtimestamp(now, UTC)
    return {"yesterday": utc_day(today - timedelta(days=1)), "today": utc_day(today)}


# --- comparison (pure) ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Line:
    """One model on one day: ZenMux's figures, ours, and what ZenMux billed that we never saw."""

    model: str
    zenmux_usd: Decimal | None
    exporter_usd: Decimal
    zenmux_requests: Decimal | None
    exporter_requests: int

    @property
    def difference_usd(self) -> Decimal | None:
        return None if self.zenmux_usd is None else self.zenmux_usd - self.exporter_usd

    @property
    def unseen_usd(self) -> Decimal | None:
        difference = self.difference_usd
        return None if difference is None else max(difference, Decimal(0))


def compare(
    zenmux: Mapping[str, ModelCost], ours: Mapping[str, tuple[float, float]], limiter: LabelLimiter | None
) -> list[Line]:
    """Per model (ZenMux's slugs folded by the same cap as ours), sorted: both sides of one day."""
    folded: dict[str, ModelCost] = {}
    for slug, cost in zenmux.items():
        model = limiter.value("model", slug) if limiter is not None else slug
        seen = folded.get(model, ModelCost(Decimal(0), Decimal(0)))
        folded[model] = ModelCost(add_known(seen.cost_usd, cost.cost_usd), add_known(seen.requests, cost.requests))
    lines = []
    for model in sorted(set(folded) | set(ours)):
        theirs = folded.get(model, ModelCost(Decimal(0), Decimal(0)))
        units, generations = ours.get(model, (0.0, 0.0))
        lines.append(
            Line(
                model=model,
                zenmux_usd=theirs.cost_usd,
                exporter_usd=Decimal(int(units)) / COST_UNITS_PER_USD,
                zenmux_requests=theirs.requests,
                exporter_requests=int(generations),
            )
        )
    return lines


# --- the poller ---------------------------------------------------------------------------------------------


# A following exposer looks this often whether it leads now (and should poll).
FOLLOWER_CHECK_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The last comparison: lines per `day` label, and the balance (None until first read)."""

    days: Mapping[str, Sequence[Line]]
    balance: Balance | None


EMPTY_SNAPSHOT = Snapshot({}, None)


class Reconciler:
    """Polls yesterday's and today's account cost and the balance, and compares them with the ledger.

    Every request passes a token bucket (`max_requests_per_minute`, the account's 60/min being shared with
    its usage endpoint); a 429/422 holds that endpoint back for Retry-After (else 60 s); server and connection
    errors back off exponentially up to the poll interval. A failed request keeps the last good figures.
    """

    def __init__(
        self,
        config: ReconcileConfig,
        client: AccountClient,
        ledger: Ledger,
        metrics: SelfMetrics,
        *,
        clock: Clock,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        pause: Callable[[asyncio.Event, float], Awaitable[None]] | None = None,
    ) -> None:
        self._config = config
        self._pause = pause or _until_stopped
        self._client = client
        self._ledger = ledger
        self._metrics = metrics
        self._clock = clock  # wall time: which UTC days
        # Pacing and Retry-After holds on a clock no NTP step moves (a step back would hold for its length).
        self._monotonic = monotonic
        burst = min(3.0, config.max_requests_per_minute)
        self._bucket = TokenBucket(config.max_requests_per_minute / 60.0, burst, monotonic=monotonic, sleep=sleep)
        self._held_until = dict.fromkeys(ENDPOINTS, -math.inf)
        self._backoff = 0.0
        self._costs: dict[str, tuple[str, dict[str, ModelCost]]] = {}  # day label -> (YYYYMMDD, ZenMux's)
        self.snapshot = EMPTY_SNAPSHOT

    async def poll(self) -> float:
        """One round; returns the seconds until the next (the poll interval, or sooner/later after errors)."""
        days = closed_and_open_days(self._clock.time())
        failed: list[PollError] = []
        for label, day in days.items():
            try:
                costs = await self._request("cost", functools.partial(self._client.cost, day))
            except PollError as err:
                failed.append(err)
                continue
            if costs is not None:
                self._costs[label] = (day, costs)
        balance = self.snapshot.balance
        try:
            balance = await self._request("balance", self._client.balance) or balance
        except PollError as err:
            failed.append(err)
        lines = {
            label: compare(costs, self._ledger.daily(day), self._ledger.limiter)
            for label, (day, costs) in self._costs.items()
            if days[label] == day  # after midnight, yesterday's "today" is not today's
        }
        self.snapshot = Snapshot(lines, balance)
        return self._next_delay(failed)

    async def _request(self, endpoint: str, call: Callable[[], Awaitable[T]]) -> T | None:
        """The call's result, or None when the endpoint is held back by a rate limit (the call is not made)."""
        if self._monotonic() < self._held_until[endpoint]:
            return None
        await self._bucket.acquire()
        try:
            result = await call()
        except PollError as err:
            self._metrics.reconcile_requests.labels(endpoint, err.outcome.value).inc()
            if err.retry_after is not None:
                self._held_until[endpoint] = self._monotonic() + err.retry_after
            log.warning("reconcile: %s", err)
            raise
        self._metrics.reconcile_requests.labels(endpoint, "ok").inc()
        return result

    def _next_delay(self, failed: list[PollError]) -> float:
        """Transient failures are tried again sooner, backing off; a rate-limited endpoint is skipped by the
        rounds until its Retry-After has passed, and a refused key waits the whole interval."""
        interval = self._config.poll_interval_seconds
        if any(e.outcome not in (Outcome.RATE_LIMITED, Outcome.UNAUTHORIZED) for e in failed):
            self._backoff = min(interval, self._backoff * 2 if self._backoff else BACKOFF_INITIAL_SECONDS)
            return self._backoff
        self._backoff = 0.0
        return interval

    async def run(self, stop: asyncio.Event, active: Callable[[], bool] = lambda: True) -> None:
        """Polls while `active` (in a fleet: while this exposer leads, so one process spends the account's
        rate limit); any failure of a round is logged and backed off: an optional feature never fails /healthz."""
        while not stop.is_set():
            delay = self._config.poll_interval_seconds
            if active():
                try:
                    delay = await self.poll()
                except Exception:
                    log.exception("reconcile: the round failed; trying again later")
                    self._backoff = min(delay, self._backoff * 2 if self._backoff else BACKOFF_INITIAL_SECONDS)
                    delay = self._backoff
            else:
                delay = min(delay, FOLLOWER_CHECK_SECONDS)
            await self._pause(stop, delay)


async def _until_stopped(stop: asyncio.Event, seconds: float) -> None:
    """Waits `seconds`, or less if `stop` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def days_window(now: float, days_kept: int) -> tuple[str, str]:
    """The first and last UTC day (YYYYMMDD) whose per-day rows are kept: the last `days_kept`, and tomorrow
    (a createAt a little ahead of our clock)."""
    today = datetime.fromtimestamp(now, UTC)
    return utc_day(today - timedelta(days=days_kept - 1)), utc_day(today + timedelta(days=1))


async def prune_days(state: Store, ledger: Ledger, now: float, days_kept: int) -> int:
    """Drops per-day ledger rows of days outside the window (older, or after tomorrow: a createAt no clock
    agrees with) from the state, by their day in the database (a fleet's resolver does not hold every row in
    memory), and from this process's ledger; returns how many rows left the state."""
    first, last = days_window(now, days_kept)
    dropped = await state.drop_daily_outside(first, last)
    ledger.forget_daily_outside(first, last)
    return dropped


# --- exposition -----------------------------------------------------------------------------------------------


class ReconcileCollector(Collector):
    """The last comparison and balance as gauges, by `day` ("yesterday" | "today") and model."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snapshot = self._snapshot()
        p = "zenmux_reconcile_"
        families = {
            "zenmux_usd": GaugeMetricFamily(
                p + "zenmux_cost_usd", "Cost ZenMux's account books show for the UTC day, USD.", labels=["day", "model"]
            ),
            "exporter_usd": GaugeMetricFamily(
                p + "exporter_cost_usd",
                "Cost of the generations this exporter resolved, by their createAt UTC day, USD.",
                labels=["day", "model"],
            ),
            "difference_usd": GaugeMetricFamily(
                p + "difference_usd", "ZenMux's cost minus the exporter's, USD.", labels=["day", "model"]
            ),
            "unseen_usd": GaugeMetricFamily(
                p + "unseen_cost_usd",
                "Spend ZenMux billed that never reached this exporter (ids not seen), USD.",
                labels=["day", "model"],
            ),
            "zenmux_requests": GaugeMetricFamily(
                p + "zenmux_requests", "Requests ZenMux's account books count for the UTC day.", labels=["day", "model"]
            ),
            "exporter_requests": GaugeMetricFamily(
                p + "exporter_requests", "Generations this exporter resolved for the UTC day.", labels=["day", "model"]
            ),
        }
        for day, lines in snapshot.days.items():
            for line in lines:
                for name, family in families.items():
                    value = getattr(line, name)
                    if value is not None:
                        family.add_metric([day, line.model], float(value))
        yield from families.values()
        if snapshot.balance is not None:
            balance = snapshot.balance
            yield GaugeMetricFamily(
                "zenmux_payg_balance_usd", "Pay-as-you-go credit balance (total_credits), USD.",
                value=float(balance.total_usd),
            )
            parts = GaugeMetricFamily(
                "zenmux_payg_balance_part_usd", "Parts of the PAYG balance (top-up and bonus credits), USD.",
                labels=["part"],
            )
            parts.add_metric(["top_up"], float(balance.top_up_usd))
            parts.add_metric(["bonus"], float(balance.bonus_usd))
            yield parts

    def describe(self) -> Iterator[Metric]:
        return iter(())


# --- the audit command ------------------------------------------------------------------------------------------


def _usd(value: Decimal | None) -> str:
    return "-" if value is None else f"{value.quantize(Decimal('1E-10')):f}"


def _count(value: Decimal | int | None) -> str:
    return "-" if value is None else str(int(value))


AUDIT_COLUMNS = ("model", "zenmux_usd", "exporter_usd", "difference_usd", "zenmux_requests", "exporter_requests")


def audit_table(lines: Sequence[Line]) -> str:
    """The audit as aligned text: one row per model and a total (unknown when any ZenMux figure is)."""
    total_zenmux: Decimal | None = Decimal(0)
    total_requests: Decimal | None = Decimal(0)
    for line in lines:
        total_zenmux = add_known(total_zenmux, line.zenmux_usd)
        total_requests = add_known(total_requests, line.zenmux_requests)
    total = Line(
        "TOTAL",
        total_zenmux,
        sum((line.exporter_usd for line in lines), Decimal(0)),
        total_requests,
        sum(line.exporter_requests for line in lines),
    )
    rows = [list(AUDIT_COLUMNS)]
    for line in (*lines, total):
        rows.append(
            [
                line.model,
                _usd(line.zenmux_usd),
                _usd(line.exporter_usd),
                _usd(line.difference_usd),
                _count(line.zenmux_requests),
                _count(line.exporter_requests),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(AUDIT_COLUMNS))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


async def audit(client: AccountClient, ledger: Ledger, day: str) -> list[Line]:
    """One UTC day (YYYYMMDD), ZenMux's account cost against the ledger's rows (uncapped model names)."""
    return compare(await client.cost(day), ledger.daily(day), None)
