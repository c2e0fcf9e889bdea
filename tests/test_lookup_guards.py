"""A lookup's own guards: the timeout covers the whole lookup (a body that drips forever times out), and a
record for another generation id than the one asked for is malformed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from exporter.config import ZenMuxConfig
from exporter.records import Outcome
from exporter.zenmux import ZenMuxClient

KEY = "sk-ai-v1-0123456789abcdef-secret"


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
        # Each read is within any per-read timeout, so only a timeout on the whole lookup ends it; wait_for only
        # turns a regression into a failure instead of a hang.
        result = await asyncio.wait_for(client.lookup("g1"), 30)
    finally:
        await client.aclose()
    assert result.outcome is Outcome.TIMEOUT


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
async def test_a_record_is_malformed_only_when_it_names_another_generation(returned: str, outcome: Outcome) -> None:
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
