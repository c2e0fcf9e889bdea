"""The simulated ZenMux's LLM protocol endpoints over loopback: ids, inline usage, billing delay, errors, encodings."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from exporter.simulate.api import MANAGEMENT_PATH, SimConfig, SimulatedZenMux, inline_usage, serve
from exporter.simulate.protocols import ANSWER
from tests.support import MANAGEMENT_KEY, PAYG_KEY

VERTEX = "/api/vertex-ai/v1/publishers/google/models/gemini-2.5-flash"
VERTEX_PROJECT = "/api/vertex-ai/v1/projects/p1/locations/global/publishers/google/models/gemini-2.5-pro"
# path, request body, how the key is sent, where the id is in the JSON answer, the record's api
CASES: list[tuple[str, dict[str, Any], str, str, str]] = [
    ("/api/v1/chat/completions", {"model": "openai/gpt-4.1-mini"}, "authorization", "id", "chat.completions"),
    ("/api/v1/responses", {"model": "openai/o4-mini", "input": "x"}, "authorization", "id", "responses"),
    ("/api/anthropic/v1/messages", {"model": "anthropic/claude-sonnet-4"}, "x-api-key", "id", "messages"),
    (VERTEX + ":generateContent", {"contents": []}, "x-goog-api-key", "responseId", "generateContent"),
    (VERTEX_PROJECT + ":generateContent", {"contents": []}, "x-goog-api-key", "responseId", "generateContent"),
]


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def api() -> AsyncIterator[tuple[SimulatedZenMux, Clock, httpx.AsyncClient]]:
    clock = Clock()
    sim = SimulatedZenMux(SimConfig(billing_delay_seconds=180), clock=clock)
    server = await serve(sim, "127.0.0.1", 0)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
        yield sim, clock, client
    await server.close()


def auth(how: str, key: str = PAYG_KEY) -> dict[str, str]:
    return {how: f"Bearer {key}" if how == "authorization" else key}


@pytest.mark.parametrize(("path", "body", "how", "id_key", "protocol"), CASES)
async def test_a_call_creates_a_generation_billed_after_the_delay(
    api: tuple[SimulatedZenMux, Clock, httpx.AsyncClient],
    path: str,
    body: dict[str, Any],
    how: str,
    id_key: str,
    protocol: str,
) -> None:
    sim, clock, client = api
    response = await client.post(path, json=body, headers=auth(how))
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert "x-generation-id" not in response.headers  # the id is in the body, as the protocol puts it
    answer = response.json()
    record = sim.record(answer[id_key])
    assert record is not None and record["api"] == protocol and record["streamed"] is False
    assert answer.get("usage", answer.get("usageMetadata")) == inline_usage(record)
    lookup = {"authorization": f"Bearer {PAYG_KEY}"}
    assert (await client.get(MANAGEMENT_PATH, params={"id": answer[id_key]}, headers=lookup)).status_code == 404
    clock.now += 180
    billed = await client.get(MANAGEMENT_PATH, params={"id": answer[id_key]}, headers=lookup)
    assert billed.status_code == 200 and billed.json()["usage"] == record["usage"]


def events(body: bytes) -> list[tuple[str | None, Any]]:
    out: list[tuple[str | None, Any]] = []
    for block in body.decode().split("\n\n"):
        if not block:
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        data = fields["data"]
        out.append((fields.get("event"), data if data == "[DONE]" else json.loads(data)))
    return out


async def test_streams_carry_the_id_in_their_first_event(api: tuple[SimulatedZenMux, Clock, httpx.AsyncClient]) -> None:
    sim, _, client = api
    headers = auth("authorization")
    chat = await client.post(
        "/api/v1/chat/completions", json={"model": "openai/gpt-4.1", "stream": True}, headers=headers
    )
    assert chat.headers["content-type"].startswith("text/event-stream")
    chunks = events(chat.content)
    assert chunks[-1] == (None, "[DONE]")
    assert "".join(c["choices"][0]["delta"].get("content", "") for _, c in chunks[:-1] if c["choices"]) == ANSWER
    assert sim.record(chunks[0][1]["id"])["streamed"] is True  # type: ignore[index]
    assert chunks[-2][1]["usage"] == inline_usage(sim.record(chunks[0][1]["id"]))  # type: ignore[arg-type]

    responses = events(
        (
            await client.post("/api/v1/responses", json={"model": "openai/o4-mini", "stream": True}, headers=headers)
        ).content
    )
    assert responses[0][0] == "response.created" and responses[-1][0] == "response.completed"
    assert [e["sequence_number"] for _, e in responses] == list(range(len(responses)))
    assert sim.record(responses[0][1]["response"]["id"]) is not None

    messages = events(
        (
            await client.post(
                "/api/anthropic/v1/messages",
                json={"model": "anthropic/claude-opus-4", "stream": True},
                headers=auth("x-api-key"),
            )
        ).content
    )
    assert [name for name, _ in messages][:2] == ["message_start", "content_block_start"]
    assert messages[-1][0] == "message_stop"
    assert sim.record(messages[0][1]["message"]["id"])["api"] == "messages"  # type: ignore[index]

    sse = await client.post(
        VERTEX + ":streamGenerateContent", params={"alt": "sse"}, json={}, headers=auth("x-goog-api-key")
    )
    chunks = events(sse.content)
    assert {c["responseId"] for _, c in chunks} == {chunks[0][1]["responseId"]}
    assert "usageMetadata" in chunks[-1][1]
    array = await client.post(VERTEX + ":streamGenerateContent", json={}, headers=auth("x-goog-api-key"))
    assert array.headers["content-type"] == "application/json" and len(array.json()) == len(chunks)


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status"),
    [
        ("POST", "/api/v1/chat/completions", {"authorization": "Bearer sk-ai-v1-nope"}, b"{}", 401),
        ("POST", "/api/v1/chat/completions", {}, b"{}", 401),
        ("POST", "/api/anthropic/v1/messages", {"x-api-key": MANAGEMENT_KEY}, b"{}", 403),
        ("GET", "/api/v1/responses", auth("authorization"), b"", 405),
        ("POST", "/api/v1/chat/completions", auth("authorization"), b"{not json", 400),
        ("POST", "/api/v1/chat/completions", auth("authorization"), b"[]", 400),
        ("POST", "/api/v1/chat/completions", auth("authorization"), b'{"model":"acme/unknown"}', 400),
        ("POST", "/api/v1/responses", auth("authorization"), b'{"model":"anthropic/claude-sonnet-4"}', 400),
        (
            "POST",
            "/api/vertex-ai/v1/publishers/google/models/gemini-9:generateContent",
            auth("x-goog-api-key"),
            b"{}",
            400,
        ),
        (
            "POST",
            "/api/vertex-ai/v1/publishers/google/models/gemini-2.5-pro:countTokens",
            auth("x-goog-api-key"),
            b"{}",
            404,
        ),
    ],
)
async def test_bad_calls_are_refused_and_create_nothing(
    api: tuple[SimulatedZenMux, Clock, httpx.AsyncClient],
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    status: int,
) -> None:
    sim, _, client = api
    response = await client.request(method, path, headers=headers, content=body)
    assert response.status_code == status
    assert response.json()["error"]["message"]
    assert sim.records() == []


@pytest.mark.parametrize(
    ("wanted", "accepted", "encoded"),
    [
        ("gzip", "gzip, br", "gzip"),
        ("br", "br", "br"),
        ("zstd", "zstd", "zstd"),
        ("br", "gzip", None),
        ("", "br", None),
    ],
)
async def test_bodies_are_compressed_only_when_asked_and_accepted(
    api: tuple[SimulatedZenMux, Clock, httpx.AsyncClient], wanted: str, accepted: str, encoded: str | None
) -> None:
    _, _, client = api
    headers = {**auth("authorization"), "accept-encoding": accepted, "x-sim-content-encoding": wanted}
    request = client.build_request(
        "POST", "/api/v1/chat/completions", json={"model": "openai/gpt-4.1"}, headers=headers
    )
    response = await client.send(request, stream=True)
    raw = b"".join([chunk async for chunk in response.aiter_raw()])
    await response.aclose()
    assert response.headers.get("content-encoding") == encoded
    if encoded == "gzip":
        raw = gzip.decompress(raw)
    if encoded in (None, "gzip"):
        assert json.loads(raw)["object"] == "chat.completion"


async def test_the_id_header_on_request(api: tuple[SimulatedZenMux, Clock, httpx.AsyncClient]) -> None:
    _, _, client = api
    headers = {**auth("authorization"), "x-sim-id-header": "1"}
    response = await client.post("/api/v1/chat/completions", json={"model": "openai/gpt-4.1"}, headers=headers)
    assert response.headers["x-generation-id"] == response.json()["id"]
