"""How each kind of answer from the API is handled: not ready, throttled, failing, malformed, refused, metering only."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest

from exporter.app import Exporter
from exporter.clock import ManualClock
from exporter.simulate.api import Faults
from tests.support import (
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


def set_sim(fake_api: FakeApi, **changes: Any) -> None:
    fake_api.sim.configure(dataclasses.replace(fake_api.sim.config, **changes))


async def metric(exporter: Exporter, name: str, **labels: str) -> float:
    return value(await scrape(exporter.metrics_port), name, **labels)


async def wait_metric(exporter: Exporter, name: str, at_least: float, **labels: str) -> None:
    async def reached() -> bool:
        return await metric(exporter, name, **labels) >= at_least

    await wait_until(reached, what=f"{name}{labels} >= {at_least}")


@pytest.mark.parametrize("mode", ["404", "partial"])
async def test_not_ready_is_retried_until_billed(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter, mode: str
) -> None:
    set_sim(fake_api, billing_delay_seconds=0.6, not_ready_mode=mode)
    exporter = await start_exporter(make_config(tmp_path, fake_api.url, resolve={"billing_delay_seconds": 0}))
    generation_id = fake_api.create()
    append_lines(tmp_path / "app.log", [json_line(generation_id)])
    await wait_metric(exporter, "zenmux_generations_total", 1)
    text = await scrape(exporter.metrics_port)
    assert value(text, "zenmux_exporter_lookups_total", outcome="not_ready") >= 1
    record = fake_api.sim.record(generation_id)
    assert record is not None
    assert value(text, "zenmux_cost_usd_total") == pytest.approx(record["ratingResponses"]["billAmount"])
    assert value(text, "zenmux_exporter_abandoned_ids_total") == 0


@pytest.mark.parametrize(
    ("faults", "outcome"),
    [
        (Faults(server_error=1.0), "server_error"),
        (Faults(rate_limited=1.0), "rate_limited"),
        (Faults(malformed=1.0), "malformed"),
        (Faults(truncated=1.0), "connection_error"),
        (Faults(reset=1.0), "connection_error"),
        (Faults(oversized=1.0, oversized_bytes=2_000_000), "too_large"),
        (Faults(slow=1.0, slow_seconds=2.0), "timeout"),
    ],
)
async def test_faults_are_counted_then_the_id_resolves(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter, faults: Faults, outcome: str
) -> None:
    set_sim(fake_api, faults=faults)
    config = make_config(tmp_path, fake_api.url, zenmux={"timeout_seconds": 0.3})
    exporter = await start_exporter(config)
    generation_id = fake_api.create()
    append_lines(tmp_path / "app.log", [json_line(generation_id)])
    await wait_metric(exporter, "zenmux_exporter_lookups_total", 1, outcome=outcome)
    assert await metric(exporter, "zenmux_generations_total") == 0
    set_sim(fake_api, faults=Faults())
    await wait_metric(exporter, "zenmux_generations_total", 1)
    assert await metric(exporter, "zenmux_generations_total") == 1


async def test_retry_after_is_honoured(tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter) -> None:
    """Retry-After: 3 (not the 1 s rate-limit pause, nor the 0.05-0.2 s backoff) sets when the id is looked up
    again; on a clock only the test moves, the next lookup goes out once 3 s have passed."""
    set_sim(fake_api, billing_delay_seconds=0, faults=Faults(rate_limited=1.0), retry_after_seconds=3)
    clock = ManualClock()
    config = make_config(tmp_path, fake_api.url, resolve={"billing_delay_seconds": 0})
    exporter = await start_exporter(config, clock=clock)
    state, resolver = exporter.state, exporter.resolver
    assert state is not None and resolver is not None
    append_lines(tmp_path / "app.log", [json_line(fake_api.create())])

    async def due_at(when: float) -> bool:
        return await state.next_due(clock.time(), set()) == when

    for lookups in (1, 2):
        await wait_metric(exporter, "zenmux_exporter_lookups_total", lookups, outcome="rate_limited")
        await wait_until(lambda: due_at(clock.time() + 3), what="the retry due when Retry-After says")
        assert await metric(exporter, "zenmux_exporter_lookups_total", outcome="rate_limited") == lookups
        if lookups == 2:
            set_sim(fake_api, faults=Faults())  # the third lookup, once released, is answered
        clock.advance(3)
        resolver.wake()
    await wait_metric(exporter, "zenmux_generations_total", 1)


async def test_unauthorized_keeps_ids_pending_and_says_so_once(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    wrong_key = "sk-ai-v1-not-a-real-key"
    exporter = await start_exporter(make_config(tmp_path, fake_api.url, zenmux={"api_key": wrong_key}))
    append_lines(tmp_path / "app.log", [json_line(fake_api.create()) for _ in range(3)])
    await wait_metric(exporter, "zenmux_exporter_lookups_total", 3, outcome="unauthorized")
    text = await scrape(exporter.metrics_port)
    assert value(text, "zenmux_exporter_pending_ids") == 3
    assert value(text, "zenmux_exporter_api_auth_failing") == 1
    assert value(text, "zenmux_exporter_abandoned_ids_total") == 0
    # The three were in flight together; after the first 401 nothing more is sent during the pause.
    assert value(text, "zenmux_exporter_lookups_total", outcome="unauthorized") == 3
    warnings = [r for r in caplog.records if "rejects the API key" in r.getMessage()]
    assert len(warnings) == 1
    assert wrong_key not in caplog.text


async def test_subscription_key_exports_tokens_without_cost(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    config = make_config(tmp_path, fake_api.url, zenmux={"api_key": SUBSCRIPTION_KEY})
    exporter = await start_exporter(config)
    ids = [fake_api.create() for _ in range(3)]
    append_lines(tmp_path / "app.log", [json_line(i) for i in ids])
    await wait_metric(exporter, "zenmux_generations_total", 3)
    text = await scrape(exporter.metrics_port)
    prompt = sum(r["nativeTokens"]["prompt_tokens"] for i in ids if (r := fake_api.sim.record(i)) is not None)
    assert value(text, "zenmux_tokens_total", token_type="prompt") == prompt
    assert "zenmux_cost_usd_total{" not in text
    assert value(text, "zenmux_exporter_billing_unavailable_total", reason="subscription_key") == 3
    assert len([r for r in caplog.records if "subscription key" in r.getMessage()]) == 1


async def test_billing_that_never_arrives_is_given_up_with_tokens_counted(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    set_sim(fake_api, billing_delay_seconds=3600, not_ready_mode="partial")
    config = make_config(tmp_path, fake_api.url, resolve={"billing_delay_seconds": 0, "give_up_after_seconds": 0.4})
    exporter = await start_exporter(config)
    generation_id = fake_api.create()
    append_lines(tmp_path / "app.log", [json_line(generation_id)])
    await wait_metric(exporter, "zenmux_exporter_abandoned_ids_total", 1, reason="not_ready")
    text = await scrape(exporter.metrics_port)
    assert value(text, "zenmux_exporter_billing_unavailable_total", reason="gave_up_waiting") == 1
    assert value(text, "zenmux_generations_total") == 1
    assert "zenmux_cost_usd_total{" not in text
    assert value(text, "zenmux_exporter_pending_ids") == 0


async def test_management_path_and_wrapped_envelopes(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    set_sim(fake_api, envelope="success")
    config = make_config(
        tmp_path,
        fake_api.url,
        zenmux={"generation_path": "/api/v1/management/generation", "api_key": "sk-mg-v1-demo"},
    )
    exporter = await start_exporter(config)
    append_lines(tmp_path / "app.log", [json_line(fake_api.create()) for _ in range(2)])
    await wait_metric(exporter, "zenmux_generations_total", 2)
    assert await metric(exporter, "zenmux_cost_usd_total") > 0
