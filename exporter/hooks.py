"""httpx response hooks that hand each LLM response's generation id to an emitter, without consuming its body.

For the OpenAI and Anthropic Python SDKs (and anything else built on httpx)::

    import openai
    from exporter import hooks

    client = openai.OpenAI(
        base_url="https://zenmux.ai/api/v1",
        http_client=openai.DefaultHttpxClient(event_hooks=hooks.event_hooks()),
    )
    # AsyncOpenAI: http_client=openai.DefaultAsyncHttpxClient(event_hooks=hooks.async_event_hooks())

Where the id comes from, first found wins:

1. the ``x-generation-id`` response header (emitted as soon as the headers arrive);
2. a JSON body: ``id``, ``responseId`` (Gemini), ``message.id`` or ``response.id`` — parsed when the caller has
   read the whole body;
3. a ``text/event-stream`` body: the same keys in the first events, as the caller reads them (Anthropic's
   ``message_start`` carries ``message.id``, the Responses API's ``response.created`` carries ``response.id``).

The hook never reads the body itself: it wraps the response's byte stream and looks at the bytes the
caller pulls through it, so a stream reaches the caller exactly as it would without the hook. Only
successful (2xx) responses to requests accepted by ``match`` (by default POSTs to the generation
endpoints) are looked at. Nothing here raises into the caller.
"""

from __future__ import annotations

import contextlib
import json
import logging
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any

import httpx

from exporter import emit as _emit
from exporter.emit import Emitter, LabelValue

__all__ = [
    "GENERATION_ID_HEADER",
    "AsyncGenerationIdHook",
    "GenerationIdHook",
    "async_event_hooks",
    "event_hooks",
    "extract_id",
    "is_generation_request",
]

log = logging.getLogger(__name__)

GENERATION_ID_HEADER = "x-generation-id"
# Paths (suffixes) of the endpoints that create generations, across the protocols ZenMux speaks.
GENERATION_PATH_SUFFIXES = ("/chat/completions", "/completions", "/responses", "/messages", "/embeddings")
GENERATION_PATH_MARKERS = (":generateContent", ":streamGenerateContent")
# The keys looked at, in order; dotted keys are nested.
ID_KEYS = ("id", "responseId", "message.id", "response.id")
DEFAULT_MAX_JSON_BYTES = 8 * 1024 * 1024
# A stream whose first events (this many, or this many bytes) carry no id is left alone.
MAX_SSE_EVENTS = 4
MAX_SSE_BYTES = 64 * 1024

Labels = Mapping[str, LabelValue] | Callable[[httpx.Request], Mapping[str, LabelValue]] | None
Match = Callable[[httpx.Request], bool]


def is_generation_request(request: httpx.Request) -> bool:
    """The default `match`: a POST to a chat/completions, responses, messages, embeddings or generateContent path."""
    if request.method != "POST":
        return False
    path = request.url.path.rstrip("/")
    return path.endswith(GENERATION_PATH_SUFFIXES) or any(m in path for m in GENERATION_PATH_MARKERS)


def extract_id(document: Any) -> str | None:
    """The generation id in a decoded JSON response or event (see ID_KEYS), if it is a valid id."""
    for key in ID_KEYS:
        value: Any = document
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if _emit.valid_id(value):
            return str(value)
    return None


class _Decoder:
    """Content-Encoding undone incrementally: identity, gzip or deflate; anything else turns the hook off."""

    def __init__(self, encoding: str) -> None:
        encoding = encoding.strip().lower()
        self.ok = True
        self._z: Any = None
        if encoding == "gzip":
            self._z = zlib.decompressobj(zlib.MAX_WBITS | 16)
        elif encoding == "deflate":
            self._z = zlib.decompressobj()
        elif encoding not in ("", "identity"):
            self.ok = False

    def decode(self, data: bytes, limit: int) -> bytes:
        if self._z is None:
            return data
        return bytes(self._z.decompress(data, limit))


class _Watcher:
    """Looks at the bytes of one response as they pass, and emits the id once it is known."""

    def __init__(
        self, hook: _BaseHook, response: httpx.Response, labels: Mapping[str, LabelValue], *, decoded: bool = False
    ) -> None:
        self._hook = hook
        self._labels = labels
        content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        self._sse = content_type == "text/event-stream"
        self._decoder = _Decoder("" if decoded else response.headers.get("content-encoding", ""))
        self._buffer = bytearray()
        self._events = 0
        self._seen = 0
        self._limit = MAX_SSE_BYTES if self._sse else hook.max_json_bytes
        self.done = not self._decoder.ok

    def feed(self, chunk: bytes) -> None:
        if self.done or not chunk:
            return
        try:
            room = self._limit - self._seen
            data = self._decoder.decode(chunk, room + 1)
            self._seen += len(data)
            self._buffer += data
            if self._seen > self._limit:
                self.done = True
                self._buffer.clear()
            elif self._sse:
                self._scan_events()
        except Exception:
            self._give_up()

    def finish(self) -> None:
        """The caller read the body to its end: a JSON body is complete now."""
        if self.done:
            return
        with contextlib.suppress(Exception):
            if self._sse:
                self._buffer += b"\n\n"  # a last event without its blank line
                self._scan_events()
            else:
                self._found(extract_id(json.loads(bytes(self._buffer))))
        self._give_up()

    def _scan_events(self) -> None:
        while not self.done:
            data = bytes(self._buffer).replace(b"\r\n", b"\n")
            end = data.find(b"\n\n")
            if end < 0:
                return
            event, rest = data[:end], data[end + 2 :]
            self._buffer = bytearray(rest)
            lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
            if not lines:
                continue  # a comment or keep-alive
            self._events += 1
            payload = b"\n".join(lines)
            if payload.strip() != b"[DONE]":
                with contextlib.suppress(ValueError):
                    self._found(extract_id(json.loads(payload)))
            if self._events >= MAX_SSE_EVENTS:
                self._give_up()

    def _found(self, generation_id: str | None) -> None:
        if generation_id is not None and not self.done:
            self._hook._send(generation_id, self._labels)
            self._give_up()

    def _give_up(self) -> None:
        self.done = True
        self._buffer = bytearray()


class _WatchedSyncStream(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, watcher: _Watcher) -> None:
        self._inner = inner
        self._watcher = watcher

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self._watcher.feed(chunk)
            yield chunk
        self._watcher.finish()

    def close(self) -> None:
        self._inner.close()


class _WatchedAsyncStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, watcher: _Watcher) -> None:
        self._inner = inner
        self._watcher = watcher

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            self._watcher.feed(chunk)
            yield chunk
        self._watcher.finish()

    async def aclose(self) -> None:
        await self._inner.aclose()


class _BaseHook:
    def __init__(
        self,
        emitter: Emitter | None = None,
        *,
        labels: Labels = None,
        match: Match = is_generation_request,
        header: str = GENERATION_ID_HEADER,
        max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
    ) -> None:
        self._emitter = emitter
        self.labels = labels
        self.match = match
        self.header = header
        self.max_json_bytes = max_json_bytes

    @property
    def emitter(self) -> Emitter:
        return self._emitter if self._emitter is not None else _emit.default_emitter()

    def _send(self, generation_id: str, labels: Mapping[str, LabelValue]) -> None:
        try:
            self.emitter.emit(generation_id, labels)
        except Exception:
            log.debug("emitter raised; id %s dropped", generation_id, exc_info=True)

    def _watch(self, response: httpx.Response) -> _Watcher | None:
        """Handles what the headers allow; returns a watcher when the body has to be looked at."""
        if not 200 <= response.status_code < 300 or not self.match(response.request):
            return None
        labels = self.labels(response.request) if callable(self.labels) else (self.labels or {})
        from_header = response.headers.get(self.header, "").strip()
        if _emit.valid_id(from_header):
            self._send(from_header, labels)
            return None
        if hasattr(response, "_content"):  # already read (e.g. a mocked transport): nothing left to wrap
            watcher = _Watcher(self, response, labels, decoded=True)
            watcher.feed(response.content)
            watcher.finish()
            return None
        watcher = _Watcher(self, response, labels)
        return None if watcher.done else watcher


class GenerationIdHook(_BaseHook):
    """A response hook for `httpx.Client(event_hooks={"response": [GenerationIdHook(...)]})`."""

    def __call__(self, response: httpx.Response) -> None:
        try:
            watcher = self._watch(response)
            if watcher is not None and isinstance(response.stream, httpx.SyncByteStream):
                response.stream = _WatchedSyncStream(response.stream, watcher)
        except Exception:
            log.debug("generation id hook failed", exc_info=True)


class AsyncGenerationIdHook(_BaseHook):
    """A response hook for `httpx.AsyncClient(event_hooks={"response": [AsyncGenerationIdHook(...)]})`."""

    async def __call__(self, response: httpx.Response) -> None:
        try:
            watcher = self._watch(response)
            if watcher is not None and isinstance(response.stream, httpx.AsyncByteStream):
                response.stream = _WatchedAsyncStream(response.stream, watcher)
        except Exception:
            log.debug("generation id hook failed", exc_info=True)


def event_hooks(
    emitter: Emitter | None = None,
    *,
    labels: Labels = None,
    match: Match = is_generation_request,
) -> dict[str, list[Callable[[httpx.Response], None]]]:
    """`event_hooks=` for an httpx.Client; emitter defaults to `exporter.emit.default_emitter()` ($ZENMUX_EMIT).

    labels: fixed extra labels, or a function of the request returning them (e.g. from a request header).
    """
    return {"response": [GenerationIdHook(emitter, labels=labels, match=match)]}


def async_event_hooks(
    emitter: Emitter | None = None,
    *,
    labels: Labels = None,
    match: Match = is_generation_request,
) -> dict[str, list[Callable[[httpx.Response], Awaitable[None]]]]:
    """`event_hooks=` for an httpx.AsyncClient; see `event_hooks`."""
    return {"response": [AsyncGenerationIdHook(emitter, labels=labels, match=match)]}
