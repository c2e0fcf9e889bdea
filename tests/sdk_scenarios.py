"""Real openai/anthropic/google-genai calls through the zenmux_emit hooks, run as a script in either SDK venv.

Usage: python tests/sdk_scenarios.py BASE_URL API_KEY EMIT_FILE. Every scenario uses its own clients, hooked
with a FileEmitter writing to EMIT_FILE with the label scenario=NAME; stdout gets one JSON object: the SDK
versions and, per scenario, the ids the application itself saw, the text it read, or the error it got.
Only the standard library and the SDKs are imported, so the previous majors' venv needs nothing else.
"""

from __future__ import annotations

import asyncio
import json
import sys
import traceback
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from typing import Any

import anthropic
import openai
from google import genai
from google.genai import types
from zenmux_emit import hooks
from zenmux_emit.emit import FileEmitter

CHAT_MODEL = "openai/gpt-4.1-mini"
CLAUDE = "anthropic/claude-sonnet-4"
GEMINI = "gemini-2.5-flash"
MESSAGES = [{"role": "user", "content": "hello"}]


class Run:
    def __init__(self, base: str, key: str, emit_path: str) -> None:
        self.base = base
        self.key = key
        self.emit_path = emit_path
        self.results: dict[str, dict[str, Any]] = {}

    # Clients are typed Any: this script runs against two majors of each SDK, whose types differ.
    def _hooks(self, name: str, *, asynchronous: bool) -> Any:
        emitter = FileEmitter(self.emit_path)
        labels = {"scenario": name}
        if asynchronous:
            return hooks.async_event_hooks(emitter, labels=labels)
        return hooks.event_hooks(emitter, labels=labels)

    def openai(self, name: str, headers: dict[str, str] | None = None, key: str | None = None) -> Any:
        return openai.OpenAI(
            base_url=self.base + "/api/v1",
            api_key=key or self.key,
            max_retries=0,
            default_headers=headers,
            http_client=openai.DefaultHttpxClient(event_hooks=self._hooks(name, asynchronous=False)),
        )

    def aopenai(self, name: str) -> Any:
        return openai.AsyncOpenAI(
            base_url=self.base + "/api/v1",
            api_key=self.key,
            max_retries=0,
            http_client=openai.DefaultAsyncHttpxClient(event_hooks=self._hooks(name, asynchronous=True)),
        )

    def anthropic(self, name: str) -> Any:
        return anthropic.Anthropic(
            base_url=self.base + "/api/anthropic",
            api_key=self.key,
            max_retries=0,
            http_client=anthropic.DefaultHttpxClient(event_hooks=self._hooks(name, asynchronous=False)),
        )

    def aanthropic(self, name: str) -> Any:
        return anthropic.AsyncAnthropic(
            base_url=self.base + "/api/anthropic",
            api_key=self.key,
            max_retries=0,
            http_client=anthropic.DefaultAsyncHttpxClient(event_hooks=self._hooks(name, asynchronous=True)),
        )

    def genai(self, name: str) -> Any:
        options = types.HttpOptions(
            base_url=self.base + "/api/vertex-ai",
            api_version="v1",
            client_args={"event_hooks": self._hooks(name, asynchronous=False)},
            async_client_args={"event_hooks": self._hooks(name, asynchronous=True)},
        )
        return genai.Client(vertexai=True, api_key=self.key, http_options=options)

    def record(self, name: str, call: Callable[[], tuple[list[str], str]]) -> None:
        try:
            ids, text = call()
            self.results[name] = {"ids": ids, "text": text}
        except Exception as exc:
            self.results[name] = {"error": type(exc).__name__, "detail": traceback.format_exc(limit=3)}

    async def arecord(self, name: str, call: Callable[[], Awaitable[tuple[list[str], str]]]) -> None:
        try:
            ids, text = await call()
            self.results[name] = {"ids": ids, "text": text}
        except Exception as exc:
            self.results[name] = {"error": type(exc).__name__, "detail": traceback.format_exc(limit=3)}


def _one(ids: list[str]) -> list[str]:
    return sorted(set(ids))


def sync_scenarios(run: Run) -> None:
    def chat() -> tuple[list[str], str]:
        done = run.openai("openai.chat").chat.completions.create(model=CHAT_MODEL, messages=MESSAGES)
        return [done.id], done.choices[0].message.content or ""

    def chat_stream() -> tuple[list[str], str]:
        chunks = list(
            run.openai("openai.chat.stream").chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, stream=True)
        )
        return _one([c.id for c in chunks]), "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    def chat_helper() -> tuple[list[str], str]:
        client = run.openai("openai.chat.stream_helper")
        with client.chat.completions.stream(model=CHAT_MODEL, messages=MESSAGES) as stream:
            for _ in stream:
                pass
            final = stream.get_final_completion()
        return [final.id], final.choices[0].message.content or ""

    def chat_raw() -> tuple[list[str], str]:
        raw = run.openai("openai.chat.with_raw_response").chat.completions.with_raw_response.create(
            model=CHAT_MODEL, messages=MESSAGES
        )
        done = raw.parse()
        return [done.id], done.choices[0].message.content or ""

    def chat_streaming_response() -> tuple[list[str], str]:
        client = run.openai("openai.chat.with_streaming_response")
        with client.chat.completions.with_streaming_response.create(model=CHAT_MODEL, messages=MESSAGES) as response:
            done = response.parse()
        return [done.id], done.choices[0].message.content or ""

    def chat_header() -> tuple[list[str], str]:
        client = run.openai("openai.chat.header", headers={"x-sim-id-header": "1"})
        done = client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES)
        return [done.id], done.choices[0].message.content or ""

    def chat_encoded(encoding: str, stream: bool) -> Callable[[], tuple[list[str], str]]:
        def call() -> tuple[list[str], str]:
            client = run.openai(f"openai.chat.{encoding}{'.stream' if stream else ''}")
            headers = {"x-sim-content-encoding": encoding}
            if stream:
                chunks = list(
                    client.chat.completions.create(
                        model=CHAT_MODEL, messages=MESSAGES, stream=True, extra_headers=headers
                    )
                )
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                return _one([c.id for c in chunks]), text
            done = client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, extra_headers=headers)
            return [done.id], done.choices[0].message.content or ""

        return call

    def responses() -> tuple[list[str], str]:
        done = run.openai("openai.responses").responses.create(model=CHAT_MODEL, input="hello")
        return [done.id], done.output_text

    def responses_stream() -> tuple[list[str], str]:
        client = run.openai("openai.responses.stream")
        events = list(client.responses.create(model=CHAT_MODEL, input="hello", stream=True))
        ids = [e.response.id for e in events if e.type == "response.created"]
        return ids, "".join(e.delta for e in events if e.type == "response.output_text.delta")

    def responses_helper() -> tuple[list[str], str]:
        client = run.openai("openai.responses.stream_helper")
        with client.responses.stream(model=CHAT_MODEL, input="hello") as stream:
            for _ in stream:
                pass
            final = stream.get_final_response()
        return [final.id], final.output_text

    def bad_key() -> tuple[list[str], str]:
        try:
            client = run.openai("openai.bad_key", key="sk-ai-v1-wrong")
            client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES)
        except openai.AuthenticationError as exc:
            return [], f"AuthenticationError {exc.status_code}"
        return [], "no error"

    def messages() -> tuple[list[str], str]:
        done = run.anthropic("anthropic.messages").messages.create(model=CLAUDE, max_tokens=64, messages=MESSAGES)
        return [done.id], "".join(b.text for b in done.content if b.type == "text")

    def messages_stream() -> tuple[list[str], str]:
        events = list(
            run.anthropic("anthropic.messages.stream").messages.create(
                model=CLAUDE, max_tokens=64, messages=MESSAGES, stream=True
            )
        )
        ids = [e.message.id for e in events if e.type == "message_start"]
        text = "".join(e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta")
        return ids, text

    def messages_helper() -> tuple[list[str], str]:
        client = run.anthropic("anthropic.messages.stream_helper")
        with client.messages.stream(model=CLAUDE, max_tokens=64, messages=MESSAGES) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        return [final.id], text

    def messages_raw() -> tuple[list[str], str]:
        raw = run.anthropic("anthropic.messages.with_raw_response").messages.with_raw_response.create(
            model=CLAUDE, max_tokens=64, messages=MESSAGES
        )
        done = raw.parse()
        return [done.id], "".join(b.text for b in done.content if b.type == "text")

    def gemini() -> tuple[list[str], str]:
        client = run.genai("genai.generate")  # held: a collected Client closes its HTTP client
        done = client.models.generate_content(model=GEMINI, contents="hello")
        return [str(done.response_id)], done.text or ""

    def gemini_stream() -> tuple[list[str], str]:
        client = run.genai("genai.generate.stream")
        chunks = list(client.models.generate_content_stream(model=GEMINI, contents="hello"))
        return _one([str(c.response_id) for c in chunks]), "".join(c.text or "" for c in chunks)

    run.record("openai.chat", chat)
    run.record("openai.chat.stream", chat_stream)
    run.record("openai.chat.stream_helper", chat_helper)
    run.record("openai.chat.with_raw_response", chat_raw)
    run.record("openai.chat.with_streaming_response", chat_streaming_response)
    run.record("openai.chat.header", chat_header)
    for encoding in ("gzip", "br", "zstd"):
        run.record(f"openai.chat.{encoding}", chat_encoded(encoding, False))
        run.record(f"openai.chat.{encoding}.stream", chat_encoded(encoding, True))
    run.record("openai.responses", responses)
    run.record("openai.responses.stream", responses_stream)
    run.record("openai.responses.stream_helper", responses_helper)
    run.record("openai.bad_key", bad_key)
    run.record("anthropic.messages", messages)
    run.record("anthropic.messages.stream", messages_stream)
    run.record("anthropic.messages.stream_helper", messages_helper)
    run.record("anthropic.messages.with_raw_response", messages_raw)
    run.record("genai.generate", gemini)
    run.record("genai.generate.stream", gemini_stream)


async def async_scenarios(run: Run) -> None:
    async def chat() -> tuple[list[str], str]:
        done = await run.aopenai("async.openai.chat").chat.completions.create(model=CHAT_MODEL, messages=MESSAGES)
        return [done.id], done.choices[0].message.content or ""

    async def chat_stream() -> tuple[list[str], str]:
        stream = await run.aopenai("async.openai.chat.stream").chat.completions.create(
            model=CHAT_MODEL, messages=MESSAGES, stream=True
        )
        chunks = [c async for c in stream]
        return _one([c.id for c in chunks]), "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    async def responses_helper() -> tuple[list[str], str]:
        async with run.aopenai("async.openai.responses.stream_helper").responses.stream(
            model=CHAT_MODEL, input="hello"
        ) as stream:
            async for _ in stream:
                pass
            final = await stream.get_final_response()
        return [final.id], final.output_text

    async def messages_helper() -> tuple[list[str], str]:
        async with run.aanthropic("async.anthropic.messages.stream_helper").messages.stream(
            model=CLAUDE, max_tokens=64, messages=MESSAGES
        ) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        return [final.id], text

    async def messages() -> tuple[list[str], str]:
        done = await run.aanthropic("async.anthropic.messages").messages.create(
            model=CLAUDE, max_tokens=64, messages=MESSAGES
        )
        return [done.id], "".join(b.text for b in done.content if b.type == "text")

    async def gemini() -> tuple[list[str], str]:
        client = run.genai("async.genai.generate")
        done = await client.aio.models.generate_content(model=GEMINI, contents="hello")
        return [str(done.response_id)], done.text or ""

    async def gemini_own_client() -> tuple[list[str], str]:
        # google-genai 2.x sends async calls through aiohttp when it is installed, unless given an httpx client.
        try:
            import httpx2 as http
        except ImportError:
            import httpx as http  # type: ignore[no-redef]
        hooked = http.AsyncClient(event_hooks=run._hooks("async.genai.own_client", asynchronous=True))
        options = types.HttpOptions(base_url=run.base + "/api/vertex-ai", api_version="v1", httpx_async_client=hooked)
        client = genai.Client(vertexai=True, api_key=run.key, http_options=options)
        done = await client.aio.models.generate_content(model=GEMINI, contents="hello")
        await hooked.aclose()
        return [str(done.response_id)], done.text or ""

    async def gemini_stream() -> tuple[list[str], str]:
        client = run.genai("async.genai.generate.stream")
        stream = await client.aio.models.generate_content_stream(model=GEMINI, contents="hello")
        chunks = [c async for c in stream]
        return _one([str(c.response_id) for c in chunks]), "".join(c.text or "" for c in chunks)

    await run.arecord("async.openai.chat", chat)
    await run.arecord("async.openai.chat.stream", chat_stream)
    await run.arecord("async.openai.responses.stream_helper", responses_helper)
    await run.arecord("async.anthropic.messages", messages)
    await run.arecord("async.anthropic.messages.stream_helper", messages_helper)
    await run.arecord("async.genai.generate", gemini)
    await run.arecord("async.genai.generate.stream", gemini_stream)
    await run.arecord("async.genai.own_client", gemini_own_client)


def main(argv: list[str]) -> int:
    base, key, emit_path = argv[1:4]
    run = Run(base.rstrip("/"), key, emit_path)
    sync_scenarios(run)
    asyncio.run(async_scenarios(run))
    versions = {name: version(name) for name in ("openai", "anthropic", "google-genai")}
    print(json.dumps({"versions": versions, "results": run.results}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
