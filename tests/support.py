"""Helpers shared by the tests: configs, /metrics readers, condition waits, log writers."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from exporter.app import Exporter
from exporter.config import Config, parse_config
from exporter.simulate.api import SimulatedZenMux
from exporter.simulate.server import ThreadedServer

PAYG_KEY = "sk-ai-v1-demo"
SUBSCRIPTION_KEY = "sk-ss-v1-demo"
MANAGEMENT_KEY = "sk-mg-v1-demo"


@dataclass
class FakeApi:
    sim: SimulatedZenMux
    server: ThreadedServer
    url: str

    def create(self, **kwargs: Any) -> str:
        record: dict[str, Any] = self.sim.create(**kwargs)
        return str(record["generationId"])


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_data(tmp_path: Path, api_url: str, **overrides: Any) -> dict[str, Any]:
    """A fast test config: sub-second billing delay and backoff, ephemeral ports, files under tmp_path."""
    base: dict[str, Any] = {
        "zenmux": {"base_url": api_url, "api_key": PAYG_KEY, "timeout_seconds": 2, "max_requests_per_second": 1000},
        "resolve": {
            "billing_delay_seconds": 0.2,
            "retry_initial_seconds": 0.05,
            "retry_max_seconds": 0.2,
            "give_up_after_seconds": 30,
        },
        "sources": [
            {
                "type": "file",
                "name": "app-log",
                "path": str(tmp_path / "app.log"),
                "format": "json",
                "start_at": "beginning",
                "poll_interval_seconds": 0.02,
                "labels": {"feature": "feature"},
            },
            {"type": "udp", "name": "udp", "listen": "127.0.0.1:0", "format": "plain"},
        ],
        "state": {"path": str(tmp_path / "state.db")},
        "metrics": {"listen": "127.0.0.1:0", "extra_labels": ["feature"]},
        "shutdown": {"drain_seconds": 0},
    }
    return _merge(base, overrides)


def make_config(tmp_path: Path, api_url: str, **overrides: Any) -> Config:
    return parse_config(config_data(tmp_path, api_url, **overrides), "test")


@dataclass
class Spans:
    exporter: InMemorySpanExporter = field(default_factory=InMemorySpanExporter)

    def provider(self) -> TracerProvider:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        return provider


StartExporter = Callable[..., Awaitable[Exporter]]


async def wait_until(
    condition: Callable[[], bool] | Callable[[], Awaitable[bool]], *, timeout: float = 15.0, what: str = ""
) -> None:
    """Waits for a condition to hold (checked every 20 ms); fails the test with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(0.02)


async def scrape(port: int, *, openmetrics: bool = False) -> str:
    headers = {"Accept": "application/openmetrics-text; version=1.0.0"} if openmetrics else {}
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics", headers=headers)
    response.raise_for_status()
    return response.text


def samples(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            yield s.name, s.labels, s.value


def value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    return sum(v for n, lbls, v in samples(text) if n == name and all(lbls.get(k) == w for k, w in labels.items()))


def append_lines(path: Path, lines: list[str]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))


def json_line(generation_id: str, feature: str = "chat") -> str:
    line = {"ts": "2026-11-25T10:00:00Z", "level": "info", "generation_id": generation_id, "feature": feature}
    return json.dumps(line)
