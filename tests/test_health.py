"""/healthz: a background task that dies fails it (and is logged); a normal stop is not a failure."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import httpx
import pytest

from exporter.resolver import Resolver
from tests.support import FakeApi, StartExporter, make_config, wait_until


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
        await asyncio.sleep(0)  # dies once running, not while being started
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
