"""Tests of zenmux_emit.hooks against real loopback HTTP servers (the simulated ZenMux API and exporter.web)."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from zenmux_emit.emit import LabelValue, UdpEmitter
from zenmux_emit.hooks import (
    AsyncGenerationIdHook,
    GenerationIdHook,
    async_event_hooks,
    event_hooks,
    extract_id,
    find_body_id,
    is_generation_request,
)

from exporter.simulate.api import CREATE_PATH, SimulatedZenMux
from exporter.web import HttpServer, Request, Response

KEY = "sk-ai-v1-demo"


@dataclass
class Recorder:
    """An emitter that remembers what it was given."""

    sent: list[tuple[str, dict[str, LabelValue]]] = field(default_factory=list)

    def emit(self, generation_id: str, labels: Mapping[str, LabelValue] | None = None) -> bool:
        self.sent.append((generation_id, dict(labels or {})))
        return True

    @property
    def ids(self) -> list[str]:
        return [gid for gid, _ in self.sent]


def sse(*events: str) -> bytes:
    return "".join(f"{e}\n\n" for e in events).encode()


CHAT_STREAM = sse(
    ": keep-alive",
    'data: {"id":"gen-stream-1","object":"chat.completion.chunk","choices":[{"delta":{"content":"Hel"}}]}',
    'data: {"id":"gen-stream-1","object":"chat.completion.chunk","choices":[{"delta":{"content":"lo"}}]}',
    "data: [DONE]",
)
ANTHROPIC_STREAM = sse(
    'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_01abc","model":"m"}}',
    'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"hi"}}',
    'event: message_stop\ndata: {"type":"message_stop"}',
)


async def fake_llm(request: Request) -> Response:
    """An LLM endpoint zoo: each path answers the way one protocol does."""
    json_type = "application/json"
    if request.path == "/v1/chat/completions":
        if json.loads(request.body or b"{}").get("stream"):
            return Response(body=CHAT_STREAM, content_type="text/event-stream")
        return Response(body=b'{"id":"gen-json-1","choices":[]}', content_type=json_type)
    if request.path == "/v1/messages":
        return Response(body=ANTHROPIC_STREAM, content_type="text/event-stream; charset=utf-8")
    if request.path == "/v1beta/models/gemini:generateContent":
        body = gzip.compress(b'{"candidates":[],"responseId":"GEMINIRESPONSE0001"}')
        return Response(body=body, content_type=json_type, headers={"Content-Encoding": "gzip"})
    if request.path == "/v1/responses":
        return Response(body=b'{"id":"resp_1"}', content_type=json_type, headers={"x-generation-id": "gen-header-1"})
    if request.path == "/v1/embeddings":
        return Response(body=b'{"id": "not a valid id"}', content_type=json_type)
    if request.path == "/v1/completions":
        return Response(status=500, body=b'{"id":"gen-error"}', content_type=json_type)
    if request.path == "/v1/files":
        return Response(body=b'{"id":"file-1"}', content_type=json_type)
    return Response(status=404)


class ThreadedServer:
    """An exporter.web.HttpServer on its own event loop in a thread, for synchronous clients."""

    def __init__(self, handler: Callable[[Request], Awaitable[Response]]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.server = HttpServer(handler, "127.0.0.1", 0)
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(10)
        self.url = f"http://127.0.0.1:{self.server.port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def llm() -> Iterator[str]:
    server = ThreadedServer(fake_llm)
    yield server.url
    server.close()


@pytest.fixture
def sim() -> Iterator[tuple[SimulatedZenMux, str]]:
    simulated = SimulatedZenMux()
    server = ThreadedServer(simulated.handle)
    yield simulated, server.url
    server.close()


def test_is_generation_request() -> None:
    def post(url: str) -> httpx.Request:
        return httpx.Request("POST", url)

    assert is_generation_request(post("https://zenmux.ai/api/v1/chat/completions"))
    assert is_generation_request(post("https://zenmux.ai/api/anthropic/v1/messages"))
    assert is_generation_request(post("https://zenmux.ai/api/v1/responses/"))
    assert is_generation_request(post("https://zenmux.ai/api/vertex-ai/v1/models/g:streamGenerateContent?alt=sse"))
    assert not is_generation_request(httpx.Request("GET", "https://zenmux.ai/api/v1/chat/completions"))
    assert not is_generation_request(post("https://zenmux.ai/api/v1/files"))
    assert not is_generation_request(post("https://zenmux.ai/api/anthropic/v1/messages/batches"))


def test_extract_id_order_and_validation() -> None:
    assert extract_id({"id": "a", "responseId": "b"}) == "a"
    assert extract_id({"responseId": "b"}) == "b"
    assert extract_id({"type": "message_start", "message": {"id": "msg_1"}}) == "msg_1"
    assert extract_id({"type": "response.created", "response": {"id": "resp_1"}}) == "resp_1"
    assert extract_id({"id": "bad id", "responseId": "ok"}) == "ok"
    assert extract_id({"id": 5}) is None
    assert extract_id([1, 2]) is None


def test_simulated_zenmux_ids_reach_a_real_udp_socket(sim: tuple[SimulatedZenMux, str]) -> None:
    simulated, url = sim
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(5)
        emitter = UdpEmitter("127.0.0.1", receiver.getsockname()[1], format="json")
        hooks = event_hooks(emitter, labels={"feature": "checkout"}, match=lambda r: r.method == "POST")
        with httpx.Client(base_url=url, event_hooks=hooks, headers={"Authorization": f"Bearer {KEY}"}) as client:
            for id_style in ("hex32", "resp", "upper20", "gen"):
                response = client.post(CREATE_PATH, json={"id_style": id_style})
                assert response.status_code == 200
                datagram = json.loads(receiver.recv(65535))
                assert datagram == {"generation_id": response.json()["id"], "feature": "checkout"}
                assert simulated.record(datagram["generation_id"]) is not None


def test_simulated_zenmux_body_id_without_the_header(sim: tuple[SimulatedZenMux, str]) -> None:
    simulated, url = sim
    recorder = Recorder()
    hook = GenerationIdHook(recorder, match=lambda r: True, header="x-no-such-header")
    with httpx.Client(base_url=url, event_hooks={"response": [hook]}) as client:
        ids = [client.post(CREATE_PATH, json={}, headers={"Authorization": f"Bearer {KEY}"}).json()["id"]]
        client.post(CREATE_PATH, json={})  # 401: not a generation
    assert recorder.ids == ids
    assert simulated.record(ids[0]) is not None


def test_ids_from_body_header_and_gzip(llm: str) -> None:
    recorder = Recorder()
    with httpx.Client(base_url=llm, event_hooks=event_hooks(recorder, match=lambda r: True)) as client:
        assert client.post("/v1/chat/completions", json={}).json()["id"] == "gen-json-1"
        assert client.post("/v1/responses", json={}).json()["id"] == "resp_1"
        gemini = client.post("/v1beta/models/gemini:generateContent", json={})
        assert gemini.json()["responseId"] == "GEMINIRESPONSE0001"
        client.post("/v1/embeddings", json={})  # invalid id: dropped
        client.post("/v1/completions", json={})  # 500: not looked at
    assert recorder.ids == ["gen-json-1", "gen-header-1", "GEMINIRESPONSE0001"]


def test_default_match_skips_other_endpoints(llm: str) -> None:
    recorder = Recorder()
    with httpx.Client(base_url=llm, event_hooks=event_hooks(recorder)) as client:
        client.post("/v1/files", json={})
        client.get("/v1/chat/completions")
        client.post("/v1/chat/completions", json={})
    assert recorder.ids == ["gen-json-1"]


def test_labels_from_the_request(llm: str) -> None:
    recorder = Recorder()
    hooks = event_hooks(recorder, labels=lambda request: {"feature": request.headers.get("x-feature", "none")})
    with httpx.Client(base_url=llm, event_hooks=hooks) as client:
        client.post("/v1/chat/completions", json={}, headers={"x-feature": "search"})
    assert recorder.sent == [("gen-json-1", {"feature": "search"})]


@pytest.mark.parametrize(
    ("path", "body", "expected_id"),
    [("/v1/chat/completions", {"stream": True}, "gen-stream-1"), ("/v1/messages", {}, "msg_01abc")],
)
def test_streams_reach_the_caller_untouched(llm: str, path: str, body: dict[str, bool], expected_id: str) -> None:
    recorder = Recorder()
    with (
        httpx.Client(base_url=llm, event_hooks=event_hooks(recorder)) as client,
        client.stream("POST", path, json=body) as response,
    ):
        assert recorder.ids == []  # the hook has not read anything itself
        assert not response.is_stream_consumed
        received = b"".join(response.iter_bytes())
    assert recorder.ids == [expected_id]
    assert received == (CHAT_STREAM if path.endswith("completions") else ANTHROPIC_STREAM)


def _chunked_stream(chunks: list[bytes], pulled: list[int]) -> httpx.SyncByteStream:
    class Stream(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            for chunk in chunks:
                pulled.append(len(chunk))
                yield chunk

    return Stream()


def test_stream_id_is_emitted_as_the_caller_reads_the_first_event() -> None:
    """Byte-exact pacing: the id goes out while the caller reads event one, before it asks for event two."""
    first, second = CHAT_STREAM.split(b"\n\n", 2)[1] + b"\n\n", b'data: {"id":"gen-stream-2"}\n\n'
    chunks = [b": keep-alive\n\n", first[:10], first[10:], second, b"data: [DONE]\n\n"]
    pulled: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, stream=_chunked_stream(chunks, pulled)
        )

    recorder = Recorder()
    hooks = event_hooks(recorder)
    with httpx.Client(transport=httpx.MockTransport(handler), event_hooks=hooks) as client:
        request = client.build_request("POST", "https://zenmux.ai/api/v1/chat/completions")
        response = client.send(request, stream=True)
        assert pulled == [] and recorder.ids == []
        received = b""
        raw = response.iter_bytes()
        while not recorder.ids:
            received += next(raw)
        assert len(pulled) == 3 and received == chunks[0] + first  # nothing read beyond the first event
        received += b"".join(raw)
        response.close()
    assert received == b"".join(chunks)
    assert recorder.ids == ["gen-stream-1"]  # once, not once per event


def _mock_client(hook: GenerationIdHook, headers: dict[str, str], chunks: list[bytes]) -> httpx.Client:
    """A client whose transport answers 200 with these headers and this body, delivered in these chunks."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=headers, stream=_chunked_stream(chunks, []))

    return httpx.Client(transport=httpx.MockTransport(handler), event_hooks={"response": [hook]})


def test_gzip_stream_split_across_chunks_and_crlf() -> None:
    body = b'event: message_start\r\ndata: {"type":"message_start","message":{"id":"msg_crlf"}}\r\n\r\n'
    compressed = gzip.compress(body)
    chunks = [compressed[i : i + 7] for i in range(0, len(compressed), 7)]
    recorder = Recorder()
    headers = {"content-type": "text/event-stream", "content-encoding": "gzip"}
    with (
        _mock_client(GenerationIdHook(recorder), headers, chunks) as client,
        client.stream("POST", "https://x/v1/messages") as response,
    ):
        assert b"".join(response.iter_bytes()) == body
    assert recorder.ids == ["msg_crlf"]


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"content-type": "application/json"}, b"{not json"),
        ({"content-type": "application/json", "content-encoding": "br"}, b"\x00\x01"),
        ({"content-type": "application/json", "content-encoding": "gzip"}, b"not gzip at all"),
        ({"content-type": "text/event-stream"}, b"data: {broken\n\n" * 3 + b"data: [DONE]\n\n"),
        ({"content-type": "text/event-stream"}, b"data: " + b"x" * 200_000 + b"\n\n"),
        ({"content-type": "text/event-stream"}, b'data: {"a":1}\n\n' * 4 + b'data: {"id":"gen-too-late"}\n\n'),
    ],
)
def test_unusable_bodies_never_reach_the_caller_as_errors(headers: dict[str, str], body: bytes) -> None:
    def read(hook: GenerationIdHook | None) -> bytes | str:
        hooks: dict[str, list[Any]] = {"response": [hook]} if hook else {}

        def handler(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, headers=headers, stream=_chunked_stream([body[:3], body[3:]], []))

        try:
            with (
                httpx.Client(transport=httpx.MockTransport(handler), event_hooks=hooks) as client,
                client.stream("POST", "https://x/v1/chat/completions") as response,
            ):
                return b"".join(response.iter_bytes())
        except Exception as exc:
            return type(exc).__name__

    recorder = Recorder()
    assert read(GenerationIdHook(recorder)) == read(None)  # the same bytes, or the same error, as without the hook
    assert recorder.ids == []


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        # Chat completions, Responses and Anthropic put the id first; a big body is not parsed again for it.
        ({"id": "gen-big-first", "object": "chat.completion", "choices": [{"text": "x" * 300_000}]}, "gen-big-first"),
        ({"model": "m", "type": "message", "id": "msg_third", "content": ["y" * 300_000]}, "msg_third"),
        # Vertex AI puts responseId after the candidates: found in the last bytes.
        (
            {"candidates": [{"text": 'quoted \\"responseId\\":\\"fake\\"' + "z" * 300_000}], "responseId": "VTX1"},
            "VTX1",
        ),
        # An id nested deep in a big body, behind a container: left alone rather than parsed a second time.
        ({"choices": ["w" * 300_000], "id": "gen-buried"}, None),
    ],
)
def test_large_json_bodies_read_at_their_edges(document: dict[str, object], expected: str | None) -> None:
    body = json.dumps(document).encode()
    recorder = Recorder()
    chunks = [body[i : i + 16_384] for i in range(0, len(body), 16_384)]
    with _mock_client(GenerationIdHook(recorder), {"content-type": "application/json"}, chunks) as client:
        assert client.post("https://x/v1/chat/completions").content == body
    assert recorder.ids == ([expected] if expected else [])


def test_body_id_from_head_and_tail() -> None:
    assert find_body_id(b'{"id":"a1"}') == "a1"
    assert find_body_id(b'{"object":"x", "id" : "a2", "choices":[', whole=False) == "a2"
    assert find_body_id(b'{"choices":[{"id":"nested"}', b'"usage":{}}', whole=False) is None
    assert find_body_id(b'{"candidates":[', b'x"}],"responseId": "R-1"}', whole=False) == "R-1"
    assert find_body_id(b"[1,2]", b"", whole=False) is None
    assert find_body_id(b'{"id":"unterminated', whole=False) is None


def test_a_raising_emitter_or_label_function_stays_inside_the_hook(llm: str) -> None:
    class Exploding:
        def emit(self, generation_id: str, labels: Mapping[str, LabelValue] | None = None) -> bool:
            raise RuntimeError("boom")

    def labels(request: httpx.Request) -> Mapping[str, LabelValue]:
        raise RuntimeError("labels boom")

    with httpx.Client(base_url=llm, event_hooks=event_hooks(Exploding())) as client:
        assert client.post("/v1/chat/completions", json={}).json()["id"] == "gen-json-1"
    with httpx.Client(base_url=llm, event_hooks=event_hooks(Recorder(), labels=labels)) as client:
        assert client.post("/v1/chat/completions", json={}).json()["id"] == "gen-json-1"


def test_default_emitter_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, llm: str) -> None:
    from zenmux_emit import emit

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(5)
        monkeypatch.setattr(emit, "_default", None)
        monkeypatch.setenv(emit.ENV_VAR, f"udp://127.0.0.1:{receiver.getsockname()[1]}")
        with httpx.Client(base_url=llm, event_hooks=event_hooks()) as client:
            client.post("/v1/chat/completions", json={})
        assert receiver.recv(100) == b"gen-json-1\n"


@pytest.fixture
async def async_llm() -> AsyncIterator[str]:
    server = HttpServer(fake_llm, "127.0.0.1", 0)
    await server.start()
    yield f"http://127.0.0.1:{server.port}"
    await server.close()


async def test_async_client_json_and_stream(async_llm: str) -> None:
    recorder = Recorder()
    async with httpx.AsyncClient(base_url=async_llm, event_hooks=async_event_hooks(recorder)) as client:
        response = await client.post("/v1/chat/completions", json={})
        assert response.json()["id"] == "gen-json-1"
        async with client.stream("POST", "/v1/messages", json={}) as stream:
            assert recorder.ids == ["gen-json-1"]
            body = b"".join([chunk async for chunk in stream.aiter_bytes()])
        assert body == ANTHROPIC_STREAM
    assert recorder.ids == ["gen-json-1", "msg_01abc"]


async def test_async_simulated_zenmux(sim: tuple[SimulatedZenMux, str]) -> None:
    simulated, url = sim
    recorder = Recorder()
    hook = AsyncGenerationIdHook(recorder, match=lambda r: r.url.path == CREATE_PATH)
    async with httpx.AsyncClient(base_url=url, event_hooks={"response": [hook]}) as client:
        response = await client.post(CREATE_PATH, json={"streamed": True}, headers={"Authorization": f"Bearer {KEY}"})
    assert recorder.ids == [response.json()["id"]]
    assert simulated.record(recorder.ids[0]) is not None


def test_a_large_body_is_not_parsed_whole() -> None:
    """A large body whose end is not JSON still yields the id at its start: the hook never parsed all of it."""
    body = b'{"id": "gen-head", "choices": [{"text": "' + b"x" * 400_000 + b" <cut>"
    recorder = Recorder()
    with _mock_client(GenerationIdHook(recorder), {"content-type": "application/json"}, [body]) as client:
        assert client.post("https://x/v1/chat/completions").content == body
    assert recorder.ids == ["gen-head"]


def test_a_first_event_in_a_chunk_larger_than_the_look_is_still_read() -> None:
    body = b'data: {"id":"gen-wide","pad":"' + b"p" * 100_000 + b'"}\n\n' + b"data: [DONE]\n\n"
    recorder = Recorder()
    with _mock_client(GenerationIdHook(recorder), {"content-type": "text/event-stream"}, [body]) as client:
        assert client.post("https://x/v1/chat/completions").content == body
    assert recorder.ids == ["gen-wide"]
