"""Shared fixtures: the simulated API on loopback and exporters that are stopped at the end of each test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from exporter.app import Exporter
from exporter.config import Config
from exporter.simulate.api import SimConfig, SimulatedZenMux, serve
from tests.support import FakeApi, StartExporter

pytest_plugins = [
    "tests.pg",  # the `postgres` server and `pg_url` database fixtures
    "tests.prometheus_server",  # the `start_prometheus` fixture
]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", default=False, help="enlarge the torture tests (crash loop)")


@pytest.fixture
async def fake_api() -> AsyncIterator[FakeApi]:
    """The simulated ZenMux API on a loopback port, billing ready 0.2 s after a generation is created."""
    sim = SimulatedZenMux(SimConfig(billing_delay_seconds=0.2))
    server = await serve(sim, "127.0.0.1", 0)
    yield FakeApi(sim, server, f"http://127.0.0.1:{server.port}")
    await server.close()


@pytest.fixture
async def start_exporter() -> AsyncIterator[StartExporter]:
    """Starts exporters (in-process, real sockets and files) and stops whatever is still running at the end."""
    running: list[Exporter] = []

    async def start(config: Config, *, api_key: str | None = None, **collaborators: Any) -> Exporter:
        exporter = Exporter(config, api_key=api_key or config.zenmux.api_key, **collaborators)
        await exporter.start()
        running.append(exporter)
        return exporter

    yield start
    for exporter in running:
        if not exporter.stopped:
            await exporter.stop(drain_seconds=0)


@pytest.fixture
def soak(request: pytest.FixtureRequest) -> bool:
    """--soak: the long crash loops."""
    return bool(request.config.getoption("--soak", default=False))
