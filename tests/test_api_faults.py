"""API fault storms: every kind is counted in lookups_total and on the lookup span, /metrics keeps answering,
bodies are not read past the limit, rate limits are honoured, and once the API heals every id resolves exactly."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import math
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.trace import StatusCode

from exporter.clock import ManualClock
from exporter.config import ZenMuxConfig
from exporter.policy import RATE_LIMIT_PAUSE_SECONDS
from exporter.records import Outcome, classify
from exporter.simulate.api import Faults, totals
from exporter.zenmux import ZenMuxClient
from tests.support import (
    MANAGEMENT_KEY,
    PAYG_KEY,
    FakeApi,
    Spans,
    StartExporter,
    api_process,
    append_lines,
    json_line,
    make_config,
    scrape,
    value,
    wait_until,
)

IDS = 20
STORMS: dict[str, tuple[Faults, str]] = {
    "5xx": (Faults(server_error=1.0), "server_error"),
    "reset": (Faults(reset=1.0), "connection_error"),
    "truncated": (Faults(truncated=1.0), "connection_error"),
    "malformed": (Faults(malformed=1.0), "malformed"),
    "oversized": (Faults(oversized=1.0, oversized_bytes=4 * 1024 * 1024), "too_large"),
    "slow": (Faults(slow=1.0, slow_seconds=3.0), "timeout"),
    "429": (Faults(rate_limited=1.0), "rate_limited"),
}


def fault_config(tmp_path: Path, url: str, **zenmux: Any) -> Any:
    return make_config(
        tmp_path,
        url,
        zenmux={"timeout_seconds": 0.3, "connect_timeout_seconds": 0.3, "max_response_bytes": 64 * 1024,
                "concurrency": 8, **zenmux},
        resolve={"retry_initial_seconds": 0.05, "retry_max_seconds": 0.2},
    )


async def assert_exact(port: int, fake_api: FakeApi, ids: list[str]) -> None:
    text = await scrape(port)
    truth = totals(r for i in ids if (r := fake_api.sim.record(i)) is not None)
    assert value(text, "zenmux_generations_total") == truth["generations"] == len(ids)
    for kind in ("prompt", "completion", "reasoning", "cached"):
        assert value(text, "zenmux_tokens_total", token_type=kind) == truth[f"{kind}_tokens"]
    assert value(text, "zenmux_cost_usd_total") == pytest.approx(truth["billAmount"], rel=1e-12)
    assert value(text, "zenmux_credits_total") == pytest.approx(truth["usage"], rel=1e-12)


@pytest.mark.parametrize("storm", list(STORMS))
async def test_fault_storm(storm: str, tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter) -> None:
    faults, outcome = STORMS[storm]
    spans = Spans()
    fake_api.sim.configure(dataclasses.replace(fake_api.sim.config, faults=faults))
    exporter = await start_exporter(fault_config(tmp_path, fake_api.url), tracing=spans.provider())
    port = exporter.metrics_port
    ids = [fake_api.create() for _ in range(IDS)]
    append_lines(tmp_path / "app.log", [json_line(i) for i in ids])
    wanted = 3 if outcome == "rate_limited" else IDS

    async def storming() -> bool:
        return value(await scrape(port), "zenmux_exporter_lookups_total", outcome=outcome) >= wanted

    await wait_until(storming, what=f"{wanted} lookups with outcome {outcome}")
    text = await scrape(port)  # /metrics answers through the storm (its latency is bench/'s `storm` workload)
    assert value(text, "zenmux_generations_total") == 0
    assert value(text, "zenmux_exporter_pending_ids") == IDS
    assert value(text, "zenmux_exporter_inflight_lookups") <= 8
    failed = [s for s in spans.exporter.get_finished_spans() if (s.attributes or {}).get("zenmux.outcome") == outcome]
    assert failed, f"no span carries zenmux.outcome={outcome}"
    assert all(s.status.status_code is StatusCode.ERROR for s in failed)
    assert all(str(s.status.description).startswith(outcome) for s in failed)
    # The API heals: every id resolves, exactly once.
    fake_api.sim.configure(dataclasses.replace(fake_api.sim.config, faults=Faults()))

    async def healed() -> bool:
        return value(await scrape(port), "zenmux_generations_total") == IDS

    await wait_until(healed, timeout=20, what="all ids resolved after the storm")
    await assert_exact(port, fake_api, ids)
    assert value(await scrape(port), "zenmux_exporter_abandoned_ids_total") == 0


@pytest.mark.slow
async def test_oversized_bodies_are_not_read_past_the_limit() -> None:
    """Against the simulated API in its own process (2 MB bodies): reading stops at the limit, so what the client
    allocates for 64 such bodies, 8 at a time, stays below one round of 8 whole bodies (16 MB). Python allocations
    (tracemalloc) are counted, not the process RSS, which the allocator and other tests move."""
    with api_process("--billing-delay", "0", "--fault", "oversized=1.0") as api:
        client = ZenMuxClient(ZenMuxConfig(base_url=api.url, max_response_bytes=64 * 1024, concurrency=8), PAYG_KEY)
        try:
            first = await asyncio.gather(*(client.lookup("any-id") for _ in range(8)))  # connections opened
            tracemalloc.start()
            try:
                for _ in range(8):
                    results = await asyncio.gather(*(client.lookup("any-id") for _ in range(8)))
                    assert {r.outcome for r in results} == {Outcome.TOO_LARGE}
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        finally:
            await client.aclose()
    assert {r.outcome for r in first} == {Outcome.TOO_LARGE}
    assert peak < 8 * 1024 * 1024, f"{peak} bytes allocated at the peak"


@pytest.mark.parametrize("retry_after", [None, 2.0])
async def test_422_storm_on_the_management_path_honours_retry_after(
    retry_after: float | None, tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    """On a clock only the test moves, each pause (Retry-After, else the rate-limit pause) ends with at most one
    round of `concurrency` lookups, and nothing more goes out until the clock passes the next pause."""
    sim = fake_api.sim
    sim.configure(dataclasses.replace(sim.config, billing_delay_seconds=0, faults=Faults(rate_limited=1.0),
                                      retry_after_seconds=retry_after))
    clock = ManualClock()
    config = make_config(
        tmp_path, fake_api.url,
        zenmux={"concurrency": 8, "generation_path": "/api/v1/management/generation", "api_key": MANAGEMENT_KEY},
        resolve={"billing_delay_seconds": 0, "retry_initial_seconds": 0.05, "retry_max_seconds": 0.2})
    exporter = await start_exporter(config, clock=clock)
    state, resolver = exporter.state, exporter.resolver
    assert state is not None and resolver is not None
    ids = [fake_api.create() for _ in range(IDS)]
    append_lines(tmp_path / "app.log", [json_line(i) for i in ids])
    pause = retry_after if retry_after is not None else RATE_LIMIT_PAUSE_SECONDS

    def answered_422() -> int:
        return int(sim.stats()["requests"].get("/api/v1/management/generation", {}).get("422", 0))

    async def held_back(count: int) -> bool:
        """`count` pending ids are due exactly `pause` from now: those the last round's 422s put off."""
        now = clock.time()
        late = {p.id for p in await state.due(now + pause, IDS, set())}
        return len(late - {p.id for p in await state.due(now + pause - 0.001, IDS, set())}) == count

    before = 0
    for _ in range(3):
        # A round is over once a 422 has paused the resolver and its lookups in flight are answered.
        await wait_until(lambda: answered_422() > before and resolver.inflight == 0,  # noqa: B023
                         what="a round of lookups answered 422")
        round_ = answered_422() - before
        assert 1 <= round_ <= 8, (answered_422(), before)
        await wait_until(functools.partial(held_back, round_), what=f"the round's {round_} ids due in {pause} s")
        before = answered_422()
        text = await scrape(exporter.metrics_port)
        assert value(text, "zenmux_exporter_lookups_total", outcome="rate_limited") == before
        assert answered_422() == before  # the clock has not moved: nothing more goes out
        clock.advance(pause)
        resolver.wake()
    # Healed before the resolver runs again (no await since the last wake): the released round resolves.
    sim.configure(dataclasses.replace(sim.config, faults=Faults(), retry_after_seconds=None))

    async def healed() -> bool:
        return value(await scrape(exporter.metrics_port), "zenmux_generations_total") == IDS

    await wait_until(healed, timeout=20, what="all ids resolved after the 422 storm")
    await assert_exact(exporter.metrics_port, fake_api, ids)


RECORD: dict[str, Any] = {
    "api": "chat.completions",
    "generationId": "abc",
    "model": "m",
    "nativeTokens": {"prompt_tokens": 10, "completion_tokens": 5},
    "usage": 0.1,
    "ratingResponses": {"billAmount": 0.1},
}
HOSTILE_VALUES = [math.nan, math.inf, -math.inf, -1, -1e-9, 1e300, 10**40, "NaN", "-5", "1e999", [], {}, True, None, ""]


# The hostile values that are not hostile where they are put; None (null) is an absent field everywhere.
ACCEPTED: dict[str, list[Any]] = {
    "model": ["NaN", "-5", "1e999", ""],  # a model name is any string
    "streamed": [True],
    "nativeTokens": [{}],  # no token counts: zeros
}
FIELDS = ["nativeTokens.prompt_tokens", "usage", "ratingResponses.billAmount", "latency", "generationTime",
          "requestRetryTimes", "model", "streamed", "nativeTokens"]


def expected_outcome(where: str, bad: Any) -> Outcome:
    accepted = bad is None or repr(bad) in {repr(v) for v in ACCEPTED.get(where, [])}
    return Outcome.RESOLVED if accepted else Outcome.MALFORMED


def test_the_accepted_table_names_only_hostile_values() -> None:
    hostile = {repr(v) for v in HOSTILE_VALUES}
    assert all(repr(v) in hostile for values in ACCEPTED.values() for v in values)
    assert set(ACCEPTED) <= set(FIELDS)


@pytest.mark.parametrize("where", FIELDS)
@pytest.mark.parametrize("bad", HOSTILE_VALUES, ids=repr)
def test_wrong_types_nan_negative_and_huge_numbers_are_malformed_never_counted(where: str, bad: Any) -> None:
    body = json.loads(json.dumps(RECORD))
    target = body
    *parents, leaf = where.split(".")
    for key in parents:
        target = target[key]
    target[leaf] = bad
    result = classify(200, json.dumps(body).encode(), {}, True, 0.0)
    assert result.outcome is expected_outcome(where, bad), (where, bad, result.detail)
    if result.outcome is Outcome.MALFORMED:
        assert result.record is None
    else:
        record = result.record
        assert record is not None
        numbers = [record.prompt_tokens, record.completion_tokens, record.upstream_retries,
                   record.latency_seconds or 0.0, record.generation_seconds or 0.0]
        if record.billing is not None:
            numbers += [record.billing.bill_usd, record.billing.credits, record.billing.origin_usd]
        assert all(math.isfinite(n) and 0 <= n <= 1e12 for n in numbers), (where, bad, record)


@settings(max_examples=300, deadline=None)
@given(status=st.integers(100, 599), body=st.binary(max_size=2048),
       retry_after=st.one_of(st.none(), st.text(max_size=40)))
def test_any_answer_classifies_without_raising(status: int, body: bytes, retry_after: str | None) -> None:
    headers = {} if retry_after is None else {"retry-after": retry_after}
    result = classify(status, body, headers, True, time.time())
    assert isinstance(result.outcome, Outcome)
    assert result.retry_after is None or 0 <= result.retry_after <= 3600
