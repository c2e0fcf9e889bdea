"""The simulated ZenMux's LLM endpoints: Chat Completions, Responses, Anthropic Messages and Vertex AI, JSON and SSE.

Close enough to the real protocols for the official openai, anthropic and google-genai SDKs (their `.stream()`
helpers included). Each call creates a generation through `SimulatedZenMux.create`, so its billing record
appears after the billing delay, and answers with that generation's id where the protocol puts it (``id``,
Anthropic ``message.id`` in ``message_start``, Responses ``response.id``, Vertex ``responseId``) and its
metering inline. Base URLs, as ZenMux documents them: ``/api/v1`` (OpenAI), ``/api/anthropic`` (Anthropic) and
``/api/vertex-ai`` (Vertex AI, ``v1`` with or without ``projects/P/locations/L/``).

The answer is always the same whole text (finish reason stop, so the SDKs' stream helpers never raise on a
cut answer); the record's own finishReason is drawn as for any generation. Two request headers exist for tests
only: ``x-sim-id-header: 1`` adds the ``x-generation-id`` response header,
and ``x-sim-content-encoding: gzip|br|zstd`` compresses the body (when the request accepts that encoding).
"""

from __future__ import annotations

import gzip
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

# api imports this module only when a SimulatedZenMux is built, so importing it back here is no cycle.
from exporter.simulate.api import SimulatedZenMux, inline_usage, iso_ms
from exporter.web import Request, Response

CHAT_PATH = "/api/v1/chat/completions"
RESPONSES_PATH = "/api/v1/responses"
MESSAGES_PATH = "/api/anthropic/v1/messages"
VERTEX_PATH = re.compile(
    r"/api/vertex-ai/v1(?:beta1)?/(?:projects/[^/]+/locations/[^/]+/)?publishers/([^/]+)/models/([^/:]+)"
    r":(generateContent|streamGenerateContent)"
)
ANSWER = "A simulated answer from the ZenMux simulator."
SSE_TYPE = "text/event-stream; charset=utf-8"
JSON_TYPE = "application/json"

Handler = Callable[[Request], Awaitable[Response]]


def _dumps(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def _sse(events: Iterable[tuple[str | None, Any]]) -> bytes:
    """A whole event stream: each (event name or None, data); data that is not bytes is JSON-encoded."""
    out = bytearray()
    for name, data in events:
        if name is not None:
            out += b"event: " + name.encode() + b"\n"
        out += b"data: " + (data if isinstance(data, bytes) else _dumps(data)) + b"\n\n"
    return bytes(out)


def _words(text: str) -> list[str]:
    parts = text.split(" ")
    return [p + " " for p in parts[:-1]] + parts[-1:]


def _error(status: int, message: str) -> Response:
    body = _dumps({"error": {"code": str(status), "type": "invalid_request_error", "message": message}})
    return Response(status=status, body=body, content_type=JSON_TYPE)


def _encode(request: Request, response: Response) -> Response:
    wanted = request.header("x-sim-content-encoding").strip().lower()
    accepted = {part.split(";")[0].strip().lower() for part in request.header("accept-encoding").split(",")}
    if not wanted or wanted not in accepted:
        return response
    if wanted == "gzip":
        response.body = gzip.compress(response.body)
    elif wanted == "br":
        import brotli  # a test-only dependency: only a test asks for it

        response.body = brotli.compress(response.body)
    elif wanted == "zstd":
        import zstandard

        response.body = zstandard.ZstdCompressor().compress(response.body)
    else:
        return response
    response.headers["Content-Encoding"] = wanted
    return response


class Protocols:
    """The protocol endpoints of one SimulatedZenMux; `route(path)` gives the handler for a path, or None."""

    def __init__(self, sim: SimulatedZenMux) -> None:
        self._sim = sim
        self._exact: dict[str, Handler] = {
            CHAT_PATH: self._chat,
            RESPONSES_PATH: self._responses,
            MESSAGES_PATH: self._messages,
        }

    def route(self, path: str) -> Handler | None:
        handler = self._exact.get(path)
        if handler is None and VERTEX_PATH.fullmatch(path):
            return self._vertex
        return handler

    # -- shared ---------------------------------------------------------------------------------------

    def _start(self, request: Request) -> dict[str, Any] | Response:
        """Checks method, key and body; returns the parsed body or the error to answer with."""
        if request.method != "POST":
            return _error(405, "use POST")
        bearer = request.header("authorization").partition(" ")[2].strip()
        key = bearer or request.header("x-api-key").strip() or request.header("x-goog-api-key").strip()
        kind = self._sim.config.keys.get(key)
        if kind is None:
            return _error(401, "Invalid API key")
        if kind == "management":
            return _error(403, "Management keys cannot call models")
        try:
            body = json.loads(request.body)
        except ValueError:
            return _error(400, "body must be JSON")
        if not isinstance(body, dict):
            return _error(400, "body must be a JSON object")
        return body

    def _begin(self, request: Request, api: str) -> tuple[dict[str, Any], bool] | Response:
        """For the protocols that name the model and ask to stream in the body: the created generation's record
        and whether to stream, or the error to answer with."""
        body = self._start(request)
        if isinstance(body, Response):
            return body
        stream = body.get("stream") is True
        record = self._create(body.get("model"), api, stream)
        return record if isinstance(record, Response) else (record, stream)

    def _create(self, model: object, api: str, streamed: bool) -> dict[str, Any] | Response:
        if not isinstance(model, str):
            return _error(400, "model is required")
        try:
            return self._sim.create(model=model, api=api, streamed=streamed)
        except ValueError as exc:
            return _error(400, str(exc))

    def _answer(self, request: Request, record: dict[str, Any], body: bytes, *, sse: bool) -> Response:
        response = Response(status=200, body=body, content_type=SSE_TYPE if sse else JSON_TYPE)
        if request.header("x-sim-id-header") == "1":
            response.headers["x-generation-id"] = record["generationId"]
        return _encode(request, response)

    # -- OpenAI Chat Completions ------------------------------------------------------------------------

    async def _chat(self, request: Request) -> Response:
        begun = self._begin(request, "chat.completions")
        if isinstance(begun, Response):
            return begun
        record, stream = begun
        gid, model, created = record["generationId"], record["model"], int(time.time())
        finish = "stop"  # the simulated answer is always whole (the SDKs' helpers raise on "length")
        usage = inline_usage(record)
        if not stream:
            document = {
                "id": gid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": ANSWER, "refusal": None},
                        "finish_reason": finish,
                        "logprobs": None,
                    }
                ],
                "usage": usage,
            }
            return self._answer(request, record, _dumps(document), sse=False)
        head = {"id": gid, "object": "chat.completion.chunk", "created": created, "model": model}
        events: list[tuple[str | None, Any]] = []
        for i, word in enumerate(_words(ANSWER)):
            delta = {"role": "assistant", "content": word} if i == 0 else {"content": word}
            events.append((None, {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}))
        events.append((None, {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}))
        events.append((None, {**head, "choices": [], "usage": usage}))
        events.append((None, b"[DONE]"))
        return self._answer(request, record, _sse(events), sse=True)

    # -- OpenAI Responses -------------------------------------------------------------------------------

    async def _responses(self, request: Request) -> Response:
        begun = self._begin(request, "responses")
        if isinstance(begun, Response):
            return begun
        record, stream = begun
        gid = record["generationId"]
        message_id = "msg_" + gid.removeprefix("resp_")[:32]
        text_part = {"type": "output_text", "text": ANSWER, "annotations": []}
        message = {"type": "message", "id": message_id, "status": "completed", "role": "assistant"}
        done = self._response_object(record, "completed", [{**message, "content": [text_part]}], inline_usage(record))
        if not stream:
            return self._answer(request, record, _dumps(done), sse=False)
        started = self._response_object(record, "in_progress", [], None)
        part0 = {"type": "output_text", "text": "", "annotations": []}
        where = {"item_id": message_id, "output_index": 0, "content_index": 0}
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": started},
            {"type": "response.in_progress", "response": started},
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {**message, "status": "in_progress", "content": []},
            },
            {"type": "response.content_part.added", **where, "part": part0},
        ]
        events += [
            {"type": "response.output_text.delta", **where, "delta": word, "logprobs": []} for word in _words(ANSWER)
        ]
        events += [
            {"type": "response.output_text.done", **where, "text": ANSWER, "logprobs": []},
            {"type": "response.content_part.done", **where, "part": text_part},
            {"type": "response.output_item.done", "output_index": 0, "item": {**message, "content": [text_part]}},
            {"type": "response.completed", "response": done},
        ]
        numbered = [(e["type"], {**e, "sequence_number": n}) for n, e in enumerate(events)]
        return self._answer(request, record, _sse(numbered), sse=True)

    @staticmethod
    def _response_object(
        record: dict[str, Any], status: str, output: list[Any], usage: dict[str, Any] | None
    ) -> dict[str, Any]:
        return {
            "id": record["generationId"],
            "object": "response",
            "created_at": int(time.time()),
            "status": status,
            "model": record["model"],
            "output": output,
            "usage": usage,
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "metadata": {},
            "parallel_tool_calls": True,
            "temperature": 1.0,
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "text": {"format": {"type": "text"}},
        }

    # -- Anthropic Messages -----------------------------------------------------------------------------

    async def _messages(self, request: Request) -> Response:
        begun = self._begin(request, "messages")
        if isinstance(begun, Response):
            return begun
        record, stream = begun
        usage = inline_usage(record)
        stop = "end_turn"
        message = {
            "id": record["generationId"],
            "type": "message",
            "role": "assistant",
            "model": record["model"],
            "stop_sequence": None,
        }
        if not stream:
            document = {**message, "content": [{"type": "text", "text": ANSWER}], "stop_reason": stop, "usage": usage}
            return self._answer(request, record, _dumps(document), sse=False)
        start_usage = {**usage, "output_tokens": 1}
        events: list[tuple[str | None, Any]] = [
            (
                "message_start",
                {
                    "type": "message_start",
                    "message": {**message, "content": [], "stop_reason": None, "usage": start_usage},
                },
            ),
            (
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
        ]
        events += [
            (
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}},
            )
            for word in _words(ANSWER)
        ]
        events += [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop, "stop_sequence": None},
                    "usage": {"output_tokens": usage["output_tokens"]},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        return self._answer(request, record, _sse(events), sse=True)

    # -- Vertex AI --------------------------------------------------------------------------------------

    async def _vertex(self, request: Request) -> Response:
        body = self._start(request)
        if isinstance(body, Response):
            return body
        matched = VERTEX_PATH.fullmatch(request.path)
        assert matched is not None  # route() only sends matching paths here
        publisher, model, method = matched.groups()
        stream = method == "streamGenerateContent"
        record = self._create(f"{publisher}/{model}", "generateContent", stream)
        if isinstance(record, Response):
            return record
        tail = {"modelVersion": model, "createTime": iso_ms(time.time()), "responseId": record["generationId"]}
        finish = "STOP"

        def chunk(text: str, last: bool) -> dict[str, Any]:
            candidate: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}
            if last:
                candidate["finishReason"] = finish
            out: dict[str, Any] = {"candidates": [candidate]}
            if last:
                out["usageMetadata"] = inline_usage(record)
            return {**out, **tail}

        if not stream:
            return self._answer(request, record, _dumps(chunk(ANSWER, True)), sse=False)
        words = _words(ANSWER)
        chunks = [chunk(word, i == len(words) - 1) for i, word in enumerate(words)]
        if request.query.get("alt") == "sse":
            return self._answer(request, record, _sse((None, c) for c in chunks), sse=True)
        return self._answer(request, record, _dumps(chunks), sse=False)  # without alt=sse: one JSON array
