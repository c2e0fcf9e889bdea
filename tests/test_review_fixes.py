"""Review fixes: the API key's whitespace, give-up on transient failures, the whole-lookup timeout, a record for
another id, dead background tasks failing /healthz, batched forgetting, and Content-Length parsing."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from opentelemetry import trace
from prometheus_client import CollectorRegistry

import exporter.app
from exporter.clock import ManualClock
from exporter.config import ConfigError, ResolveConfig, ZenMuxConfig, parse_config, read_api_key
from exporter.contribution import LabelLimiter, LedgerShape
from exporter.ids import Sighting
from exporter.ledger import Ledger
from exporter.resolver import Resolver
from exporter.state import Abandon, PendingId, Retry, StateStore
from exporter.telemetry import SelfMetrics
from exporter.web import HttpServer, Request, Response, text
from exporter.zenmux import LookupResult, Outcome, ZenMuxClient
from tests.support import FakeApi, StartExporter, make_config, wait_until

KEY = "sk-ai-v1-0123456789abcdef-secret"


def zenmux_config(**zenmux: Any) -> dict[str, Any]:
    return {"zenmux": zenmux, "sources": [{"type": "udp"}]}


# 1. The API key


def test_an_env_injected_key_is_stripped_of_its_trailing_newline() -> None:
    config = parse_config(zenmux_config(api_key="${ZENMUX_API_KEY}"), "x", {"ZENMUX_API_KEY": KEY + "\n"})
    assert config.zenmux.api_key == KEY
    assert read_api_key(config.zenmux) == KEY
    assert parse_config(zenmux_config(api_key=f"  {KEY}\r\n"), "x", {}).zenmux.api_key == KEY


@pytest.mark.parametrize(
    "key", ["", "  \n", "${EMPTY}", "sk-ai-v1-with space", "sk-ai-v1-\x00nul", "${TABBED}", "sk-ai-v1-nul\u00e9"]
)
def test_an_empty_or_whitespace_inline_key_is_a_config_problem(key: str) -> None:
    environ = {"EMPTY": "", "TABBED": "sk-ai-v1-\tsecret-part"}
    with pytest.raises(ConfigError) as caught:
        parse_config(zenmux_config(api_key=key), "x", environ)
    message = str(caught.value)
    assert "zenmux.api_key:" in message
    assert "secret-part" not in message and "with space" not in message and "nul" not in message


@pytest.mark.parametrize("content", ["", " \n\n", "sk-ai-v1-secret part\n", "sk-ai-v1-secret\x07part"])
def test_an_empty_or_whitespace_key_file_is_refused_without_quoting_it(tmp_path: Path, content: str) -> None:
    secret = tmp_path / "key"
    secret.write_text(content)
    config = parse_config(zenmux_config(api_key_file=str(secret)), "x", {})
    with pytest.raises(ConfigError) as caught:
        read_api_key(config.zenmux)
    message = str(caught.value)
    assert "zenmux.api_key_file:" in message
    assert "part" not in message


def test_a_key_file_with_a_trailing_newline_is_fine(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text(KEY + "\n")
    config = parse_config(zenmux_config(api_key_file=str(secret)), "x", {})
    assert read_api_key(config.zenmux) == KEY


# 2. Give-up past the horizon


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


# 3. The lookup timeout and a record for another id


class Drip(httpx.AsyncByteStream):
    """A body that never ends, one byte every 50 ms: each read is quick, the whole is endless."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            await asyncio.sleep(0.05)
            yield b" "


async def test_a_dripping_body_times_out_as_a_whole() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, stream=Drip()))
    config = ZenMuxConfig(base_url="http://zenmux.test", timeout_seconds=0.3)
    client = ZenMuxClient(config, KEY, transport=transport)
    try:
        started = asyncio.get_running_loop().time()
        result = await client.lookup("g1")
        elapsed = asyncio.get_running_loop().time() - started
    finally:
        await client.aclose()
    assert result.outcome is Outcome.TIMEOUT
    assert elapsed < 2.0


def record(generation_id: str) -> dict[str, Any]:
    return {
        "generationId": generation_id,
        "model": "m",
        "api": "chat.completions",
        "nativeTokens": {"prompt_tokens": 3, "completion_tokens": 4},
        "ratingResponses": {"billAmount": 0.01},
    }


@pytest.mark.parametrize(
    ("returned", "outcome"),
    [("g-other", Outcome.MALFORMED), ("g-asked", Outcome.RESOLVED), ("", Outcome.RESOLVED)],
)
async def test_a_record_for_another_generation_is_malformed(returned: str, outcome: Outcome) -> None:
    body = record(returned)
    if not returned:
        del body["generationId"]
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=json.dumps(body).encode()))
    client = ZenMuxClient(ZenMuxConfig(base_url="http://zenmux.test"), KEY, transport=transport)
    try:
        result = await client.lookup("g-asked")
    finally:
        await client.aclose()
    assert result.outcome is outcome
    if outcome is Outcome.MALFORMED:
        assert result.detail == "record is for another generation"
        assert result.record is None and result.status == 200


# 4. Dead background tasks fail /healthz


async def healthz(port: int) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(f"http://127.0.0.1:{port}/healthz")


async def test_a_dead_resolver_fails_healthz_and_is_logged(
    tmp_path: Path,
    fake_api: FakeApi,
    start_exporter: StartExporter,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def crash(self: Resolver, stop: asyncio.Event) -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("boom")

    monkeypatch.setattr(Resolver, "run", crash)
    caplog.set_level(logging.ERROR, logger="exporter.app")
    running = await start_exporter(make_config(tmp_path, fake_api.url))
    await wait_until(lambda: running.failure is not None, what="the failure to be recorded")
    response = await healthz(running.metrics_port)
    assert response.status_code == 503
    assert response.text == "resolver stopped: RuntimeError\n"
    logged = [r for r in caplog.records if r.name == "exporter.app" and "resolver stopped" in r.getMessage()]
    assert logged and logged[0].exc_info is not None


async def test_a_normal_stop_is_not_a_failure(tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter) -> None:
    running = await start_exporter(make_config(tmp_path, fake_api.url))
    assert (await healthz(running.metrics_port)).status_code == 200
    await running.stop(drain_seconds=0)
    await asyncio.sleep(0)
    assert running.failure is None


# 5. Forgetting in batches


async def fill_finished(state: StateStore, count: int, at: float) -> None:
    ids = [f"old{i}" for i in range(count)]
    await state.enqueue("src", [Sighting(i) for i in ids], now=0, due=0)
    await state.settle(
        [Abandon(i, "not_ready") for i in ids], Ledger(LedgerShape(()), LabelLimiter(10, 10, 64)), now=at
    )


async def test_forget_finished_deletes_at_most_one_batch(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "s.db", max_pending=100)
    await fill_finished(state, 7, at=10)
    assert await state.forget_finished(before=11, limit=3) == 3
    assert await state.forget_finished(before=11, limit=3) == 3
    assert await state.forget_finished(before=11, limit=3) == 1
    assert await state.forget_finished(before=11, limit=3) == 0
    await state.close()


async def test_housekeeping_forgets_in_batches_yielding_between_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not started: no housekeeping task of its own forgets alongside.
    running = exporter.app.Exporter(make_config(tmp_path, "http://zenmux.test"), api_key=KEY)
    running.state = StateStore(tmp_path / "s.db", max_pending=100)
    await fill_finished(running.state, 7, at=10)
    monkeypatch.setattr(exporter.app, "FORGET_BATCH", 3)
    calls: list[tuple[int, int]] = []
    ticks = 0
    forget = running.state.forget_finished

    async def counting(before: float, limit: int = 10_000) -> int:
        calls.append((limit, ticks))
        return await forget(before, limit)

    async def ticker() -> None:  # stands for the rest of the event loop: UDP, lookups, scrapes
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    monkeypatch.setattr(running.state, "forget_finished", counting)
    other = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    try:
        assert await running._forget(before=11) == 7
    finally:
        other.cancel()
    assert [limit for limit, _ in calls] == [3, 3, 3]
    assert calls[0][1] < calls[1][1] < calls[2][1], "the event loop ran between batches"
    assert await running.state.status("old0") is None
    await running.state.close()


# 6. Content-Length


async def raw_request(port: int, head: bytes) -> bytes:
    """Sends bytes as they are: the server reads headers as latin-1, so b"\\xb2" is '²' (isdigit(), not int())."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return answer


@pytest.mark.parametrize(
    ("length", "status"),
    [("²", b"400"), ("1³", b"400"), ("-1", b"400"), ("9" * 5000, b"413"), ("9" * 13, b"413")],
)
async def test_a_content_length_int_refuses_is_answered_not_raised(length: str, status: bytes) -> None:
    async def handler(request: Request) -> Response:
        return text(200, f"got {len(request.body)}\n")

    server = HttpServer(handler, "127.0.0.1", 0)
    await server.start()
    try:
        answer = await raw_request(
            server.port, f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode("latin-1")
        )
        assert answer.startswith(b"HTTP/1.1 " + status)
        ok = await raw_request(server.port, b"POST / HTTP/1.1\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi")
        assert ok.startswith(b"HTTP/1.1 200") and ok.endswith(b"got 2\n")
    finally:
        await server.close()
