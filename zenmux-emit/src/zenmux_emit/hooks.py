"""httpx/httpx2 response hooks that hand each LLM response's generation id to an emitter, without consuming its body.

For the openai, anthropic and google-genai SDKs, on `httpx2` (openai 3, anthropic 2, google-genai 3) or `httpx`
(openai 2, anthropic 0.x, google-genai 2)::

    import openai
    from zenmux_emit import hooks

    client = openai.OpenAI(
        base_url="https://zenmux.ai/api/v1",
        http_client=openai.DefaultHttpxClient(event_hooks=hooks.event_hooks()),
    )
    # AsyncOpenAI: http_client=openai.DefaultAsyncHttpxClient(event_hooks=hooks.async_event_hooks())
    # google-genai: http_options=types.HttpOptions(client_args={"event_hooks": hooks.event_hooks()},
    #                                              async_client_args={"event_hooks": hooks.async_event_hooks()})

Where the id comes from, first found wins:

1. the ``x-generation-id`` response header (emitted as soon as the headers arrive);
2. a JSON body: ``id`` (chat completion, Responses, Anthropic message) or ``responseId`` (Vertex AI / Gemini),
   found once the caller has read the whole body;
3. a ``text/event-stream`` body: ``id``, ``responseId``, ``message.id`` (Anthropic ``message_start``) or
   ``response.id`` (Responses ``response.created``) in the first events, as the caller reads them.

The hook never reads the body itself and checks no class of either httpx: it taps the response's own
content decoder, so it sees the decoded bytes the caller pulls (gzip, deflate, and brotli or zstd when the
application's httpx can decode them) and the stream reaches the caller unchanged. A large JSON body is not
parsed again: the hook keeps its first and last 64 KiB and reads the id's key there. Only successful (2xx)
responses to requests accepted by ``match`` (by default POSTs to the generation endpoints) are looked at.
Nothing here raises into the caller.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any

from zenmux_emit import emit as _emit
from zenmux_emit.emit import Emitter, LabelValue

__all__ = [
    "GENERATION_ID_HEADER",
    "AsyncGenerationIdHook",
    "GenerationIdHook",
    "async_event_hooks",
    "event_hooks",
    "extract_id",
    "find_body_id",
    "is_generation_request",
]

log = logging.getLogger(__name__)

GENERATION_ID_HEADER = "x-generation-id"
# Paths (suffixes) of the endpoints that create generations, across the protocols ZenMux speaks.
GENERATION_PATH_SUFFIXES = ("/chat/completions", "/completions", "/responses", "/messages", "/embeddings")
GENERATION_PATH_MARKERS = (":generateContent", ":streamGenerateContent")
# The keys looked at, in order; dotted keys are nested.
ID_KEYS = ("id", "responseId", "message.id", "response.id")
# A JSON body up to twice this is parsed whole; a larger one is read in its first and last this many bytes.
EDGE_BYTES = 64 * 1024
# A stream whose first events (this many, or this many bytes give or take the chunk being read) carry no id is
# left alone.
MAX_SSE_EVENTS = 4
MAX_SSE_BYTES = 64 * 1024

# httpx.Request or httpx2.Request: typed loosely so that neither package is imported.
Request = Any
Labels = Mapping[str, LabelValue] | Callable[[Request], Mapping[str, LabelValue]] | None
Match = Callable[[Request], bool]

# Vertex AI puts responseId after the candidates; a key's quotes are never escaped, a string's always are.
_TAIL_RESPONSE_ID = re.compile(rb'(?<!\\)"responseId"[ \t\r\n]*:[ \t\r\n]*"([A-Za-z0-9_.:-]{1,128})"')
_MAX_HEAD_KEYS = 32


def is_generation_request(request: Request) -> bool:
    """The default `match`: a POST to a chat/completions, responses, messages, embeddings or generateContent path."""
    if request.method != "POST":
        return False
    path = str(request.url.path).rstrip("/")
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


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _head_id(head: bytes) -> str | None:
    """A top-level id or responseId among the scalar keys that open a JSON object (a container ends the look)."""
    decoder = json.JSONDecoder()
    text = head.decode("utf-8", "replace")
    pos = _skip_space(text, 0)
    if text[pos : pos + 1] != "{":
        return None
    for _ in range(_MAX_HEAD_KEYS):
        pos = _skip_space(text, pos + 1)
        if text[pos : pos + 1] != '"':
            return None
        key, pos = decoder.raw_decode(text, pos)
        pos = _skip_space(text, pos)
        if text[pos : pos + 1] != ":":
            return None
        pos = _skip_space(text, pos + 1)
        if text[pos : pos + 1] in ("{", "["):
            return None  # decoding a container would be the second parse this avoids
        value, pos = decoder.raw_decode(text, pos)
        if key in ("id", "responseId") and _emit.valid_id(value):
            return str(value)
        pos = _skip_space(text, pos)
        if text[pos : pos + 1] != ",":
            return None
    return None


def find_body_id(head: bytes, tail: bytes = b"", *, whole: bool = True) -> str | None:
    """The id of a JSON response body, given all of it (whole) or its first and last bytes (not whole)."""
    with contextlib.suppress(ValueError):
        if whole:
            return extract_id(json.loads(head))
        found = _head_id(head)
        if found is not None:
            return found
        matches = _TAIL_RESPONSE_ID.findall(tail)
        if matches:
            return str(matches[-1].decode("ascii"))
    return None


class _Watcher:
    """Looks at the decoded bytes of one response as they pass, and emits the id once it is known."""

    def __init__(self, hook: _BaseHook, sse: bool, labels: Mapping[str, LabelValue]) -> None:
        self._hook = hook
        self._labels = labels
        self._sse = sse
        self._head = bytearray()
        self._tail = bytearray()
        self._whole = True
        self._seen = 0
        self._events = 0
        self.done = False

    def feed(self, chunk: bytes | bytearray) -> None:
        if self.done or not chunk:
            return
        try:
            if self._sse:
                self._head += chunk
                self._seen += len(chunk)
                self._scan_events()
                if self._seen > MAX_SSE_BYTES:
                    self._give_up()  # the first events are over and carried no id
                return
            room = 2 * EDGE_BYTES - len(self._head) if self._whole else 0
            if room > 0:
                self._head += chunk[:room]
                chunk = chunk[room:]
                if not chunk:
                    return
            if self._whole:  # past the size parsed whole: keep the head's first bytes and a tail window
                self._whole = False
                self._tail = self._head[EDGE_BYTES:]
                del self._head[EDGE_BYTES:]
            self._tail += chunk
            if len(self._tail) > EDGE_BYTES:
                del self._tail[: len(self._tail) - EDGE_BYTES]
        except Exception:
            self._give_up()

    def finish(self) -> None:
        """The caller read the body to its end: a JSON body is complete now."""
        if self.done:
            return
        with contextlib.suppress(Exception):
            if self._sse:
                self._head += b"\n\n"  # a last event without its blank line
                self._scan_events()
            else:
                self._found(find_body_id(bytes(self._head), bytes(self._tail), whole=self._whole))
        self._give_up()

    def _scan_events(self) -> None:
        while not self.done:
            data = bytes(self._head).replace(b"\r\n", b"\n")
            end = data.find(b"\n\n")
            if end < 0:
                return
            event = data[:end]
            self._head = bytearray(data[end + 2 :])
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
        self._head = bytearray()
        self._tail = bytearray()


class _TappedDecoder:
    """Stands in for the response's content decoder and shows each decoded chunk to the watcher.

    httpx's decoders return bytes, httpx2's an iterator of bytes; both are passed through as they are.
    """

    def __init__(self, inner: Any, watcher: _Watcher) -> None:
        self._inner = inner
        self._watcher = watcher

    def decode(self, data: bytes) -> Any:
        out = self._inner.decode(data)
        if isinstance(out, bytes | bytearray):
            self._watcher.feed(out)
            return out
        return self._tap(out, finish=False)

    def flush(self) -> Any:
        out = self._inner.flush()
        if isinstance(out, bytes | bytearray):
            self._watcher.feed(out)
            self._watcher.finish()
            return out
        return self._tap(out, finish=True)

    def _tap(self, chunks: Iterable[bytes], *, finish: bool) -> Iterator[bytes]:
        for chunk in chunks:
            self._watcher.feed(chunk)
            yield chunk
        if finish:
            self._watcher.finish()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _BaseHook:
    def __init__(
        self,
        emitter: Emitter | None = None,
        *,
        labels: Labels = None,
        match: Match = is_generation_request,
        header: str = GENERATION_ID_HEADER,
    ) -> None:
        self._emitter = emitter
        self.labels = labels
        self.match = match
        self.header = header

    @property
    def emitter(self) -> Emitter:
        return self._emitter if self._emitter is not None else _emit.default_emitter()

    def _send(self, generation_id: str, labels: Mapping[str, LabelValue]) -> None:
        try:
            self.emitter.emit(generation_id, labels)
        except Exception:
            log.debug("emitter raised; id %s dropped", generation_id, exc_info=True)

    def _watch(self, response: Any) -> None:
        """Emits what the headers give, or taps the body's decoder; never raises."""
        try:
            if not 200 <= response.status_code < 300 or not self.match(response.request):
                return
            labels = self.labels(response.request) if callable(self.labels) else (self.labels or {})
            from_header = response.headers.get(self.header, "").strip()
            if _emit.valid_id(from_header):
                self._send(from_header, labels)
                return
            content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
            watcher = _Watcher(self, content_type == "text/event-stream", labels)
            if hasattr(response, "_content"):  # already read (e.g. a mocked transport): nothing left to tap
                watcher.feed(response.content)
                watcher.finish()
                return
            # httpx and httpx2 both build the decoder here once and keep it in _decoder; one they cannot
            # build (br without brotli) raises, and the caller's own read will raise the same error.
            response._decoder = _TappedDecoder(response._get_content_decoder(), watcher)
        except Exception:
            log.debug("generation id hook failed", exc_info=True)


class GenerationIdHook(_BaseHook):
    """A response hook for `httpx.Client`/`httpx2.Client(event_hooks={"response": [GenerationIdHook(...)]})`."""

    def __call__(self, response: Any) -> None:
        self._watch(response)


class AsyncGenerationIdHook(_BaseHook):
    """A response hook for `httpx.AsyncClient`/`httpx2.AsyncClient(event_hooks={"response": [...]})`."""

    async def __call__(self, response: Any) -> None:
        self._watch(response)


def event_hooks(
    emitter: Emitter | None = None,
    *,
    labels: Labels = None,
    match: Match = is_generation_request,
) -> dict[str, list[Callable[[Any], None]]]:
    """`event_hooks=` for a sync client; emitter defaults to `zenmux_emit.emit.default_emitter()` ($ZENMUX_EMIT).

    labels: fixed extra labels, or a function of the request returning them (e.g. from a request header).
    """
    return {"response": [GenerationIdHook(emitter, labels=labels, match=match)]}


def async_event_hooks(
    emitter: Emitter | None = None,
    *,
    labels: Labels = None,
    match: Match = is_generation_request,
) -> dict[str, list[Callable[[Any], Awaitable[None]]]]:
    """`event_hooks=` for an async client; see `event_hooks`."""
    return {"response": [AsyncGenerationIdHook(emitter, labels=labels, match=match)]}
