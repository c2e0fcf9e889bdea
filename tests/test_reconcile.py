"""Reconciliation: exact decimals, the per-day ledger rows and their bound, the simulated account endpoints, the
poller's rate limits on an injected clock, and end to end: the exposed difference is exactly the unseen spend."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from exporter.__main__ import main
from exporter.account import AccountClient, ModelCost, parse_balance, parse_cost_by_model, parse_decimal
from exporter.clock import ManualClock
from exporter.config import ConfigError, ReconcileConfig, parse_config, redacted
from exporter.contribution import (
    DAILY_COST,
    DAILY_GENERATIONS,
    Contribution,
    LabelLimiter,
    LedgerShape,
    contribution,
)
from exporter.exposition import LedgerExposition
from exporter.ids import Sighting
from exporter.ledger import Ledger
from exporter.reconcile import ReconcileCollector, Reconciler, closed_and_open_days, prune_days
from exporter.records import MalformedResponse, parse_generation, utc_day
from exporter.simulate.account import BALANCE_PATH, COST_PATH, UNSEEN_PATH, amount
from exporter.simulate.api import SimConfig, SimulatedZenMux, serve
from exporter.state import Resolved
from exporter.telemetry import SelfMetrics
from exporter.web import HttpServer, Request, Response
from tests.exposition_oracle import LedgerCollector
from tests.pg import OpenState
from tests.support import (
    MANAGEMENT_KEY,
    PAYG_KEY,
    SUBSCRIPTION_KEY,
    FakeApi,
    StartExporter,
    append_lines,
    json_line,
    make_config,
    scrape,
    value,
    wait_until,
)

START = 1_790_000_000.0  # 2026-09-21T14:13:20Z
DAY = 86_400.0


# ------------------------------------------------------------------------------------------ decimals, parsing


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("12.3456000000", Decimal("12.3456")),
        ("0", Decimal(0)),
        (" 0.0000000001 ", Decimal("1E-10")),
        ("125", Decimal(125)),
        (None, None),  # null: no statistic, not zero
        (0.1, Decimal("0.1")),  # a JSON number stands for its shortest repr
        (447.74, Decimal("447.74")),
        (3, Decimal(3)),
    ],
)
def test_decimal_strings_parse_exactly(raw: Any, expected: Decimal | None) -> None:
    assert parse_decimal(raw, "x") == expected


@pytest.mark.parametrize(
    "raw", ["abc", "NaN", "Infinity", "", True, [], {"a": 1}, "1e999999999", "-1e999999999", "1e-999999999"]
)
def test_what_is_not_a_decimal_is_malformed(raw: Any) -> None:
    with pytest.raises(MalformedResponse, match="x"):
        parse_decimal(raw, "x")


@given(st.lists(st.decimals(min_value=0, max_value=10_000, places=10, allow_nan=False), max_size=50))
def test_sums_of_decimal_strings_have_no_float_drift(amounts: list[Decimal]) -> None:
    rows = [{"bizTime": "2026092114", "modelSlug": "m", "billAmount": amount(a), "requestCounts": "1"} for a in amounts]
    parsed = parse_cost_by_model({"success": True, "data": {"summary": None, "analysis": {"costByModel": rows}}})
    if amounts:
        assert parsed == {"m": ModelCost(sum(amounts, Decimal(0)), Decimal(len(amounts)))}
    else:
        assert parsed == {}


def test_cost_by_model_sums_hours_and_a_null_amount_makes_the_day_unknown() -> None:
    def row(model: str, bill: str | None, count: str | None) -> dict[str, Any]:
        return {"bizTime": "2026092101", "modelSlug": model, "billAmount": bill, "requestCounts": count}

    payload = {
        "success": True,
        "data": {
            "summary": {"totalCost": "0.3"},
            "analysis": {
                "costByModel": [row("a", "0.1", "1"), row("a", "0.2", "2"), row("b", None, "3"), row("b", "1", None)],
                "costByApiKey": [],
                "costByTokenType": [],
            },
        },
    }
    assert parse_cost_by_model(payload) == {
        "a": ModelCost(Decimal("0.3"), Decimal(3)),  # 0.1 + 0.2 is 0.3 exactly
        "b": ModelCost(None, None),
    }
    assert parse_cost_by_model({"success": True, "data": {"summary": None, "analysis": None}}) == {}
    bad: Any
    for bad in ([], {"success": False, "data": {}}, {"data": {"analysis": {"costByModel": [{"modelSlug": 3}]}}}):
        with pytest.raises(MalformedResponse):
            parse_cost_by_model(bad)


def test_balance_parses_numbers_and_strings_exactly() -> None:
    data = {"currency": "usd", "total_credits": 482.74, "top_up_credits": "35.0", "bonus_credits": 447.74}
    balance = parse_balance({"success": True, "data": data})
    assert (balance.total_usd, balance.top_up_usd, balance.bonus_usd) == (
        Decimal("482.74"),
        Decimal("35.0"),
        Decimal("447.74"),
    )
    with pytest.raises(MalformedResponse, match="total_credits"):
        parse_balance({"success": True, "data": {"top_up_credits": 1, "bonus_credits": 1}})


@pytest.mark.parametrize(
    ("create_at", "day"),
    [
        ("2026-11-25T10:15:02.120Z", "20261125"),
        ("2026-11-25T23:59:59.999Z", "20261125"),
        ("2026-11-25T01:00:00+08:00", "20261124"),  # 17:00 UTC the day before
        ("2026-11-25T10:15:02", "20261125"),  # no offset: UTC
        ("yesterday", ""),
        (1764000000, ""),
        (None, ""),
    ],
)
def test_a_generation_is_booked_on_the_utc_day_of_its_create_at(create_at: Any, day: str) -> None:
    assert utc_day(create_at) == day
    record = {"generationId": "g", "nativeTokens": {"prompt_tokens": 1}, "createAt": create_at}
    assert parse_generation(record).day == day
    assert parse_generation({**{k: v for k, v in record.items() if k != "createAt"}, "createdAt": create_at}).day == day


# ------------------------------------------------------------------------------------------ the ledger's daily rows


def billed(model: str, bill: float, day: str, gid: str = "g") -> Contribution:
    record = parse_generation(
        {
            "generationId": gid,
            "model": model,
            "api": "chat.completions",
            "createAt": f"{day[:4]}-{day[4:6]}-{day[6:]}T12:00:00.000Z",
            "nativeTokens": {"prompt_tokens": 10, "completion_tokens": 5},
            "usage": bill,
            "ratingResponses": {"billAmount": bill},
        }
    )
    return contribution(record, {}, LedgerShape(()), LabelLimiter(10, 10, 64), {})


async def test_daily_rows_are_settled_with_the_ledger_exactly_restored_and_never_exposed(
    open_state: OpenState,
) -> None:
    state = await open_state()
    ledger = Ledger(LedgerShape(()), LabelLimiter(10, 10, 64))
    await state.enqueue("src", [Sighting(f"g{i}") for i in range(10)], now=0, due=0)
    # ten generations of 0.1 USD: as floats they would sum to 0.9999999999999999
    await state.settle([Resolved(f"g{i}", billed("m", 0.1, "20260920", f"g{i}")) for i in range(10)], ledger, now=1)
    if not state.shared:  # a shared state's settle leaves the ledger to the exposers, who read the database
        assert ledger.daily("20260920") == {"m": (1e10, 10.0)}
    restored = Ledger(LedgerShape(()), LabelLimiter(10, 10, 64))
    restored.load(await state.ledger_rows())
    assert restored.daily("20260920") == {"m": (1e10, 10.0)}
    registry = CollectorRegistry()
    registry.register(LedgerCollector(restored))
    assert not [m for m in registry.collect() if m.name.startswith("daily")]
    assert b"daily" not in LedgerExposition(restored).render(openmetrics=False)
    rows = {metric for metric, _, _ in await state.ledger_rows()}
    assert {DAILY_COST, DAILY_GENERATIONS} <= rows


@pytest.mark.parametrize("holds_rows", [True, False], ids=["ledger_loaded", "fleet_resolver_ledger"])
async def test_days_beyond_the_bound_leave_the_state_and_the_ledger(open_state: OpenState, holds_rows: bool) -> None:
    state = await open_state()
    days = ["20260918", "20260919", "20260920", "20260921", "20260922", "20991231"]
    await state.enqueue("src", [Sighting(d) for d in days], now=0, due=0)
    resolved = [Resolved(d, billed("m", 0.5, d, d)) for d in days]
    await state.settle(resolved, Ledger(LedgerShape(()), LabelLimiter(10, 10, 64)), now=1)
    ledger = Ledger(LedgerShape(()), LabelLimiter(10, 10, 64))
    if holds_rows:  # a process that loaded the state; a fleet's resolver holds none of the rows others wrote
        ledger.load(await state.ledger_rows())
    # START is on 2026-09-21: two days kept, tomorrow tolerated (clock skew), 2099 dropped
    assert await prune_days(state, ledger, START, days_kept=2) == 6  # 3 days x (cost, generations)
    assert [d for d in days if ledger.daily(d)] == (["20260920", "20260921", "20260922"] if holds_rows else [])
    restored = Ledger(LedgerShape(()), LabelLimiter(10, 10, 64))
    restored.load(await state.ledger_rows())
    assert [d for d in days if restored.daily(d)] == ["20260920", "20260921", "20260922"]
    assert {metric for metric, _, _ in await state.ledger_rows()} - {DAILY_COST, DAILY_GENERATIONS}, "others stay"
    assert await prune_days(state, ledger, START, days_kept=2) == 0


# ------------------------------------------------------------------------------------------ config


def test_reconcile_config_keys_validate_and_the_key_is_redacted() -> None:
    base = {"zenmux": {"api_key": PAYG_KEY}, "sources": [{"type": "udp"}]}
    off = parse_config(base, "t")
    assert off.reconcile == ReconcileConfig() and not off.reconcile.enabled
    on = parse_config(
        {**base, "reconcile": {"management_api_key": "${MG}", "poll_interval_seconds": 60, "days_kept": 7}},
        "t",
        {"MG": "sk-mg-v1-secret\n"},
    )
    assert on.reconcile.enabled and on.reconcile.management_api_key == "sk-mg-v1-secret"
    assert "sk-mg-v1-secret" not in repr(on) and "sk-mg-v1-secret" not in json.dumps(redacted(on))
    with pytest.raises(ConfigError) as err:
        parse_config(
            {
                **base,
                "reconcile": {
                    "management_api_key": PAYG_KEY,
                    "management_api_key_file": "/x",
                    "days_kept": 1,
                    "poll_interval_seconds": 1,
                    "pace": 3,
                },
            },
            "cfg.yaml",
        )
    text = str(err.value)
    for problem in (
        "reconcile.management_api_key: must be a management key (sk-mg-v1-...)",
        "reconcile: set management_api_key or management_api_key_file, not both",
        "reconcile.days_kept: must be >= 2",
        "reconcile.poll_interval_seconds: must be >= 10.0",
        "reconcile.pace: unknown key",
    ):
        assert problem in text
    assert PAYG_KEY not in text and "cfg.yaml" in text


# ------------------------------------------------------------------------------------------ the simulated account


@asynccontextmanager
async def account_api() -> AsyncIterator[tuple[SimulatedZenMux, httpx.AsyncClient, ManualClock, str]]:
    clock = ManualClock(START)  # the simulator's and the poller's
    sim = SimulatedZenMux(SimConfig(billing_delay_seconds=0), clock=clock.time, rng=random.Random(3))
    server = await serve(sim, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.port}"
    try:
        async with httpx.AsyncClient(base_url=url) as client:
            yield sim, client, clock, url
    finally:
        await server.close()


def mg(key: str = MANAGEMENT_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_account_cost_aggregates_match_the_records_per_day_hour_model_key_and_token_type() -> None:
    async with account_api() as (sim, client, clock, _):
        records = [sim.create(created_at=START - DAY * (i % 2) - 3600 * (i % 3)) for i in range(40)]
        unseen = sim.account.create_unseen(model="openai/gpt-4.1-mini", created_at=START)
        today, yesterday = utc_day_of(START), utc_day_of(START - DAY)
        answer = (await client.get(COST_PATH, params=cost_query(today), headers=mg())).json()
        data = answer["data"]
        ours = [r for r in sim.records() if r["createAt"].startswith(iso_day(today))]
        expected = sum((Decimal(repr(r["ratingResponses"]["billAmount"])) for r in ours), Decimal(0))
        assert answer["success"] is True
        assert Decimal(data["summary"]["totalCost"]) == expected and expected > unseen > 0
        assert data["summary"]["requestCounts"] == str(len(ours))
        for breakdown in ("costByModel", "costByApiKey", "costByTokenType"):
            rows = data["analysis"][breakdown]
            assert sum((Decimal(r["billAmount"]) for r in rows), Decimal(0)) == expected, breakdown
            assert {len(r["bizTime"]) for r in rows} == {10}  # BIZ_DT: hourly records
        assert {r["apiKeyId"] for r in data["analysis"]["costByApiKey"]} == {"key_sim_app", "key_sim_uninstrumented"}
        assert {r["requestCounts"] for r in data["analysis"]["costByTokenType"]} == {None}
        assert Decimal(data["summary"]["inputCost"]) + Decimal(data["summary"]["outputCost"]) == expected
        by_model = parse_cost_by_model(answer)
        for model, cost in by_model.items():
            assert cost.cost_usd == sum(
                (Decimal(repr(r["ratingResponses"]["billAmount"])) for r in ours if r["model"] == model), Decimal(0)
            )
        # a month in days, an hour in minutes, a model filter; an empty day is a null summary
        month = (await client.get(COST_PATH, params={**cost_query(today[:6]), "query_dimension": "BIZ_MTH"},
                                  headers=mg())).json()["data"]
        assert Decimal(month["summary"]["totalCost"]) == sum(
            (Decimal(repr(r["ratingResponses"]["billAmount"])) for r in sim.records()), Decimal(0)
        )
        assert {r["bizTime"][:8] for r in month["analysis"]["costByModel"]} == {today, yesterday}
        hour = today + records[0]["createAt"][11:13]
        minutes = (await client.get(COST_PATH, params={**cost_query(hour), "query_dimension": "BIZ_HOUR"},
                                    headers=mg())).json()["data"]
        assert {len(r["bizTime"]) for r in minutes["analysis"]["costByModel"]} == {12}
        one = (await client.get(COST_PATH, params={**cost_query(today), "model_slugs": "openai/gpt-4.1-mini"},
                                headers=mg())).json()["data"]
        assert {r["modelSlug"] for r in one["analysis"]["costByModel"]} == {"openai/gpt-4.1-mini"}
        empty = (await client.get(COST_PATH, params=cost_query("20200101"), headers=mg())).json()["data"]
        assert empty == {"summary": None, "analysis": {"costByModel": [], "costByApiKey": [], "costByTokenType": []}}
        bad = await client.get(COST_PATH, params={**cost_query(today), "query_time": "2026"}, headers=mg())
        assert bad.status_code == 400
        posted = await client.post(UNSEEN_PATH, json={"model": "openai/o4-mini", "count": 2, "created_at": START - DAY})
        assert posted.json()["generations"] == 2 and "id" not in posted.text.lower()
        unseen_totals = (await client.get(UNSEEN_PATH)).json()
        assert unseen_totals == {
            today: {"openai/gpt-4.1-mini": {"billAmount": amount(unseen), "requestCounts": 1}},
            yesterday: {"openai/o4-mini": {"billAmount": posted.json()["billAmount"], "requestCounts": 2}},
        }
        assert (await client.post(UNSEEN_PATH, json={"count": 0})).status_code == 400
        del clock


async def test_account_endpoints_take_management_keys_only_and_enforce_their_per_minute_limits() -> None:
    async with account_api() as (sim, client, clock, _):
        for path in (COST_PATH, BALANCE_PATH):
            for key, status in ((PAYG_KEY, 403), (SUBSCRIPTION_KEY, 403), ("sk-mg-v1-nope", 401)):
                response = await client.get(path, params=cost_query("20260921"), headers=mg(key))
                assert response.status_code == status
                assert response.json()["error"]["code"] == str(status)
            assert (await client.get(path, params=cost_query("20260921"))).status_code == 401
        for _ in range(60):
            assert (await client.get(COST_PATH, params=cost_query("20260921"), headers=mg())).status_code == 200
        limited = await client.get(COST_PATH, params=cost_query("20260921"), headers=mg())
        assert (limited.status_code, limited.headers["Retry-After"]) == (429, "60")
        clock.advance(60)
        assert (await client.get(COST_PATH, params=cost_query("20260921"), headers=mg())).status_code == 200
        for _ in range(30):
            assert (await client.get(BALANCE_PATH, headers=mg())).status_code == 200
        assert (await client.get(BALANCE_PATH, headers=mg())).status_code == 422
        del sim


async def test_the_balance_is_the_credits_less_the_billed_spend() -> None:
    async with account_api() as (sim, client, _, _):
        before = parse_balance((await client.get(BALANCE_PATH, headers=mg())).json())
        assert (before.total_usd, before.top_up_usd, before.bonus_usd) == (Decimal(500), Decimal(100), Decimal(400))
        spent = sum((Decimal(repr(sim.create()["ratingResponses"]["billAmount"])) for _ in range(20)), Decimal(0))
        after = parse_balance((await client.get(BALANCE_PATH, headers=mg())).json())
        assert after.total_usd == Decimal(repr(float(Decimal(500) - spent)))
        assert after.top_up_usd == Decimal(100)  # bonus credits go first


# ------------------------------------------------------------------------------------------ the poller


def cost_query(when: str) -> dict[str, str]:
    return {"type": "cost", "query_dimension": "BIZ_DT", "query_time": when}


def utc_day_of(ts: float) -> str:
    return closed_and_open_days(ts)["today"]


def iso_day(day: str) -> str:
    return f"{day[:4]}-{day[4:6]}-{day[6:]}"


def poller(
    url: str, clock: ManualClock, ledger: Ledger | None = None, **config: Any
) -> tuple[Reconciler, SelfMetrics, CollectorRegistry, list[float]]:
    registry = CollectorRegistry()
    metrics = SelfMetrics(registry)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:  # the token bucket's wait, on the test's clock
        slept.append(seconds)
        clock.advance(seconds)

    settings = ReconcileConfig(management_api_key=MANAGEMENT_KEY, **config)
    client = AccountClient(url, MANAGEMENT_KEY, timeout_seconds=5, clock=clock)
    ledger = ledger or Ledger(LedgerShape(()), LabelLimiter(10, 10, 64))
    reconciler = Reconciler(settings, client, ledger, metrics, clock=clock, monotonic=clock.time, sleep=sleep)
    registry.register(ReconcileCollector(lambda: reconciler.snapshot))
    return reconciler, metrics, registry, slept


async def test_a_failing_round_backs_off_and_a_follower_does_not_poll(caplog: pytest.LogCaptureFixture) -> None:
    """Reconciliation is optional: a bug in a round must not kill its task (that fails /healthz, and the
    liveness probe restarts the sidecar carrying the ids); and in a fleet only the leading exposer polls."""
    clock = ManualClock(START)
    stop = asyncio.Event()
    waits: list[float] = []

    async def pause(stop_event: asyncio.Event, seconds: float) -> None:  # the wait between rounds, on the clock
        waits.append(seconds)
        clock.advance(seconds)
        if len(waits) == 3:
            stop_event.set()

    settings = ReconcileConfig(management_api_key=MANAGEMENT_KEY)
    client = AccountClient("http://127.0.0.1:9", MANAGEMENT_KEY, timeout_seconds=5, clock=clock)
    ledger = Ledger(LedgerShape(()), LabelLimiter(10, 10, 64))
    reconciler = Reconciler(settings, client, ledger, SelfMetrics(CollectorRegistry()), clock=clock,
                            monotonic=clock.time, pause=pause)
    rounds: list[float] = []

    async def broken() -> float:
        rounds.append(clock.time())
        raise ArithmeticError("a bug in a round")

    reconciler.poll = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, "exporter.reconcile"):
        await reconciler.run(stop)
    assert len(rounds) == 3 and waits == [5.0, 10.0, 20.0]  # backed off, and the task still runs
    assert "the round failed" in caplog.text
    stop.clear()
    rounds.clear()
    waits.clear()
    await reconciler.run(stop, active=lambda: False)
    assert rounds == [] and waits == [5.0, 5.0, 5.0], "a follower never polls, and looks again soon"
    await client.aclose()


def requests(sim: SimulatedZenMux, path: str) -> dict[str, int]:
    return dict(sim.stats()["requests"].get(path, {}))


async def test_429_holds_the_cost_endpoint_back_for_retry_after_and_422_the_balance() -> None:
    async with account_api() as (sim, _, clock, url):
        sim.account.cost_limit.limit = 2
        sim.account.balance_limit.limit = 1
        reconciler, metrics, _, _ = poller(url, clock, max_requests_per_minute=600)
        assert await reconciler.poll() == 300.0
        assert requests(sim, COST_PATH) == {"200": 2} and requests(sim, BALANCE_PATH) == {"200": 1}
        # the next round: the first cost request is refused, so the second is not made; the balance too
        assert await reconciler.poll() == 300.0  # rate limits are not errors to retry sooner
        assert requests(sim, COST_PATH) == {"200": 2, "429": 1} and requests(sim, BALANCE_PATH) == {"200": 1, "422": 1}
        counts = metrics.reconcile_requests
        assert counts.labels("cost", "rate_limited")._value.get() == 1
        assert counts.labels("balance", "rate_limited")._value.get() == 1
        clock.advance(59)
        await reconciler.poll()  # still within Retry-After (60 s; 422 carries none: 60 s too)
        assert requests(sim, COST_PATH) == {"200": 2, "429": 1} and requests(sim, BALANCE_PATH) == {"200": 1, "422": 1}
        clock.advance(2)
        await reconciler.poll()
        assert requests(sim, COST_PATH) == {"200": 4, "429": 1} and requests(sim, BALANCE_PATH) == {"200": 2, "422": 1}
        assert counts.labels("cost", "ok")._value.get() == 4


async def test_requests_are_paced_within_the_configured_rate_on_the_injected_clock() -> None:
    async with account_api() as (sim, _, clock, url):
        reconciler, _, _, slept = poller(url, clock, max_requests_per_minute=6)
        for _ in range(4):
            await reconciler.poll()
        # 12 requests at 6 a minute with a burst of 3: the bucket waited ~90 s of the test's clock
        assert requests(sim, COST_PATH) == {"200": 8} and requests(sim, BALANCE_PATH) == {"200": 4}
        assert clock.time() - START == pytest.approx(90.0)
        assert sum(slept) == pytest.approx(90.0)


async def test_server_errors_back_off_exponentially_up_to_the_interval() -> None:
    async def failing(request: Request) -> Response:
        return Response(status=502, body=b"<html>502 Bad Gateway</html>", content_type="text/html")

    server = HttpServer(failing, "127.0.0.1", 0)
    await server.start()
    try:
        clock = ManualClock(START)
        reconciler, metrics, registry, _ = poller(
            f"http://127.0.0.1:{server.port}", clock, max_requests_per_minute=600, poll_interval_seconds=60
        )
        delays = [await reconciler.poll() for _ in range(6)]
        assert delays == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
        assert metrics.reconcile_requests.labels("cost", "server_error")._value.get() == 12
        assert registry.get_sample_value("zenmux_payg_balance_usd") is None  # nothing known: nothing exposed
    finally:
        await server.close()


async def test_malformed_and_oversized_answers_are_counted_and_keep_the_last_good_figures() -> None:
    answers: list[Response] = []
    good_cost = json.dumps({"success": True, "data": {"summary": None, "analysis": {"costByModel": [
        {"bizTime": "2026092101", "modelSlug": "m", "billAmount": "1.5000000000", "requestCounts": "3"}]}}})
    good_balance = json.dumps({"success": True, "data": {"total_credits": 9.5, "top_up_credits": 0,
                                                         "bonus_credits": 9.5}})

    async def handler(request: Request) -> Response:
        if answers:
            return answers.pop(0)
        body = good_cost if request.path == COST_PATH else good_balance
        return Response(status=200, body=body.encode(), content_type="application/json")

    server = HttpServer(handler, "127.0.0.1", 0)
    await server.start()
    try:
        clock = ManualClock(START)
        reconciler, metrics, registry, _ = poller(f"http://127.0.0.1:{server.port}", clock,
                                                  max_requests_per_minute=600)
        await reconciler.poll()
        labels = {"day": "today", "model": "m"}
        assert registry.get_sample_value("zenmux_reconcile_zenmux_cost_usd", labels) == 1.5
        answers.extend([
            Response(status=200, body=b"<html>maintenance</html>", content_type="text/html"),
            Response(status=200, body=b'{"success": true, "data": {"analysis": {"costByModel": "n/a"}}}'),
            Response(status=200, body=b"x" * (5 * 1024 * 1024), content_type="application/json"),
        ])
        await reconciler.poll()
        counts = metrics.reconcile_requests
        assert counts.labels("cost", "malformed")._value.get() == 2
        assert counts.labels("balance", "too_large")._value.get() == 1
        assert registry.get_sample_value("zenmux_reconcile_zenmux_cost_usd", labels) == 1.5
        assert registry.get_sample_value("zenmux_payg_balance_usd") == 9.5
    finally:
        await server.close()


async def test_a_refused_management_key_is_counted_and_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    secret = "sk-mg-v1-revoked-0123456789"
    async with account_api() as (_, _, clock, url):
        registry = CollectorRegistry()
        metrics = SelfMetrics(registry)
        client = AccountClient(url, secret, timeout_seconds=5, clock=clock)
        ledger = Ledger(LedgerShape(()), LabelLimiter(10, 10, 64))
        settings = ReconcileConfig(management_api_key=secret, max_requests_per_minute=600)
        reconciler = Reconciler(settings, client, ledger, metrics, clock=clock, monotonic=clock.time)
        assert await reconciler.poll() == settings.poll_interval_seconds  # a refused key waits a whole round
        assert metrics.reconcile_requests.labels("cost", "unauthorized")._value.get() == 2
        assert metrics.reconcile_requests.labels("balance", "unauthorized")._value.get() == 1
        await client.aclose()
    assert "401" in caplog.text and secret not in caplog.text


# ------------------------------------------------------------------------------------------ end to end


async def test_resolved_plus_unseen_spend_difference_is_exactly_the_unseen_spend_and_the_audit_table_shows_it(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    days = closed_and_open_days(now)
    models = ["openai/gpt-4.1-mini", "anthropic/claude-sonnet-4"]
    # Seen: generations of both days on both models, through the log file.
    seen = [
        fake_api.create(model=models[i % 2], created_at=now - DAY * (i % 3 == 0) - 1) for i in range(24)
    ]
    config = make_config(
        tmp_path, fake_api.url, reconcile={"management_api_key": MANAGEMENT_KEY, "max_requests_per_minute": 600}
    )
    exporter = await start_exporter(config)
    append_lines(tmp_path / "app.log", [json_line(gid) for gid in seen])

    async def resolved() -> bool:
        return value(await scrape(exporter.metrics_port), "zenmux_generations_total") == len(seen)

    await wait_until(resolved, what="the seen generations resolved")
    # Unseen: spend on a seen model yesterday, a seen model today, and a model the exporter never saw.
    account = fake_api.sim.account
    unseen = {
        ("yesterday", models[0]): sum((account.create_unseen(model=models[0], created_at=now - DAY) for _ in range(3)),
                                      Decimal(0)),
        ("today", models[1]): account.create_unseen(model=models[1], created_at=now - 2),
        ("today", "google/gemini-2.5-flash"): account.create_unseen(
            model="google/gemini-2.5-flash", created_at=now - 2
        ),
    }
    unseen_counts = {("yesterday", models[0]): 3, ("today", models[1]): 1, ("today", "google/gemini-2.5-flash"): 1}
    reconciler = exporter.reconciler
    assert reconciler is not None
    await reconciler.poll()
    text = await scrape(exporter.metrics_port)
    for day in ("yesterday", "today"):
        for model in [*models, "google/gemini-2.5-flash"]:
            want = unseen.get((day, model), Decimal(0))
            labels = {"day": day, "model": model}
            difference = value(text, "zenmux_reconcile_difference_usd", **labels)
            assert difference == float(want), (day, model)
            assert value(text, "zenmux_reconcile_unseen_cost_usd", **labels) == float(want)
            zenmux = value(text, "zenmux_reconcile_zenmux_cost_usd", **labels)
            ours = value(text, "zenmux_reconcile_exporter_cost_usd", **labels)
            assert Decimal(repr(zenmux)) - Decimal(repr(ours)) == pytest.approx(want, abs=Decimal("1e-9"))
            assert value(text, "zenmux_reconcile_zenmux_requests", **labels) - value(
                text, "zenmux_reconcile_exporter_requests", **labels
            ) == unseen_counts.get((day, model), 0)
    assert value(text, "zenmux_payg_balance_usd") > 0
    assert value(text, "zenmux_payg_balance_part_usd", part="bonus") > 0
    assert value(text, "zenmux_exporter_reconcile_requests_total", endpoint="cost", outcome="ok") >= 4
    assert MANAGEMENT_KEY not in text
    await exporter.stop(drain_seconds=0)

    # The audit command: the same books from the state database and the API, to the last decimal.
    config_path = tmp_path / "config.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "zenmux": {"base_url": fake_api.url, "api_key": PAYG_KEY},
                "sources": [{"type": "udp"}],
                "state": {"path": str(tmp_path / "state.db")},
                "reconcile": {"management_api_key": "${TEST_MG_KEY}"},
            }
        )
    )
    capsys.readouterr()
    day = iso_day(days["yesterday"])
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TEST_MG_KEY", MANAGEMENT_KEY)
        assert await asyncio.to_thread(main, ["reconcile", "--config", str(config_path), "--day", day]) == 0
    out = capsys.readouterr().out
    table = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert out.splitlines()[1].split() == [
        "model", "zenmux_usd", "exporter_usd", "difference_usd", "zenmux_requests", "exporter_requests"
    ]
    yesterday_records = [r for r in fake_api.sim.records() if r["createAt"].startswith(day)]
    for model in models:
        billed_by_zenmux = sum(
            (Decimal(repr(r["ratingResponses"]["billAmount"])) for r in yesterday_records if r["model"] == model),
            Decimal(0),
        )
        row = table[model]
        assert Decimal(row[1]) == billed_by_zenmux
        assert Decimal(row[3]) == unseen.get(("yesterday", model), Decimal(0))
        assert Decimal(row[1]) - Decimal(row[2]) == Decimal(row[3])
        assert int(row[4]) - int(row[5]) == unseen_counts.get(("yesterday", model), 0)
    assert Decimal(table["TOTAL"][3]) == unseen[("yesterday", models[0])]
    assert MANAGEMENT_KEY not in out


def test_the_audit_command_explains_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"zenmux": {"api_key": PAYG_KEY}, "sources": [{"type": "udp"}]}))
    assert main(["reconcile", "--config", str(path), "--day", "2026-13-01"]) == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err
    assert main(["reconcile", "--config", str(path), "--day", "2026-09-20"]) == 2
    assert "reconcile.management_api_key" in capsys.readouterr().err
