"""A hostile API (the standard library's http.server with handlers written to harm): gzip bombs single and
stacked, bodies that never end or drip, and an API that echoes the key into errors, request ids and records.
What is allocated stays bounded, each lookup is an outcome, and no piece of the key reaches a result, span, log or
/metrics."""

from __future__ import annotations

import functools
import gzip
import http.server
import json
import logging
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from exporter.account import AccountClient, PollError
from exporter.clock import ManualClock
from exporter.config import ZenMuxConfig
from exporter.records import Outcome
from exporter.redact import MIN_PIECE
from exporter.zenmux import ZenMuxClient
from tests.support import (
    Spans,
    StartExporter,
    append_lines,
    make_config,
    peak_allocations,
    scrape,
    value,
    wait_until,
)

KEY = "sk-ai-v1-" + "7f3a9c1e5b2d4f6a8c0e" * 4  # 89 characters: longer than any cut of an error message
LIMIT = 1024 * 1024  # zenmux.max_response_bytes


def deflated(size: int, *, wbits: int = 16 + zlib.MAX_WBITS) -> bytes:
    """`size` zero bytes, gzip-compressed a megabyte at a time (never whole in memory)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    block = bytes(1024 * 1024)
    parts = [compressor.compress(block) for _ in range(size // len(block))]
    return b"".join([*parts, compressor.flush()])


@functools.cache
def bomb(stacked: bool) -> bytes:
    """~130 KB that inflate to 128 MB (128 times zenmux.max_response_bytes); stacked: that, gzipped again."""
    single = deflated(128 * 1024 * 1024)
    return gzip.compress(single, 9) if stacked else single


# Generous on purpose: it catches reading a body whole (128 MB inflated, or endless), not a few MB.
ALLOCATION_BOUND = 16 * LIMIT


Reply = Callable[[http.server.BaseHTTPRequestHandler], None]


@contextmanager
def hostile(reply: Reply) -> Iterator[str]:
    """A stdlib HTTP server whose every GET is answered by `reply`; yields its base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            try:
                reply(self)
            except OSError:  # the client gave up on us: what these handlers are for
                self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def send(handler: http.server.BaseHTTPRequestHandler, status: int, body: bytes, **headers: str) -> None:
    handler.send_response(status)
    for name, text in {"Content-Length": str(len(body)), "Content-Type": "application/json", **headers}.items():
        handler.send_header(name.replace("_", "-"), text)
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[[str], ZenMuxClient]]:
    clients: list[ZenMuxClient] = []

    def make(url: str) -> ZenMuxClient:
        client = ZenMuxClient(ZenMuxConfig(base_url=url, timeout_seconds=1.0, max_response_bytes=LIMIT), KEY)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.mark.parametrize(("stacked", "encoding"), [(False, "gzip"), (True, "gzip, gzip")], ids=["single", "stacked"])
async def test_gzip_bombs_stop_at_the_decoded_limit(
    client_for: Callable[[str], ZenMuxClient], stacked: bool, encoding: str
) -> None:
    body = bomb(stacked)
    with hostile(lambda h: send(h, 200, body, Content_Encoding=encoding)) as url, peak_allocations() as peak:
        result = await client_for(url).lookup("gen-1")
    assert result.outcome is Outcome.TOO_LARGE and "decoded" in result.detail
    assert peak[0] < ALLOCATION_BOUND, f"{peak[0] / 2**20:.0f} MB allocated for a {len(body)}-byte bomb"
    print(f"{encoding} bomb of {len(body)} bytes (128 MB inflated): peak allocations {peak[0] / 2**20:.1f} MB")


async def test_the_account_client_bounds_decoded_bytes_too() -> None:
    body = bomb(True)
    client: AccountClient | None = None
    with hostile(lambda h: send(h, 200, body, Content_Encoding="gzip, gzip")) as url, peak_allocations() as peak:
        client = AccountClient(url, "sk-mg-v1-" + "5" * 40, timeout_seconds=5, clock=ManualClock(0))
        try:
            with pytest.raises(PollError) as caught:
                await client.balance()
        finally:
            await client.aclose()
    assert caught.value.outcome is Outcome.TOO_LARGE
    assert peak[0] < ALLOCATION_BOUND, f"{peak[0] / 2**20:.0f} MB allocated for a {len(body)}-byte bomb"


async def test_three_codings_and_unknown_codings_are_malformed(client_for: Callable[[str], ZenMuxClient]) -> None:
    with hostile(lambda h: send(h, 200, gzip.compress(bomb(True)), Content_Encoding="gzip, gzip, gzip")) as url:
        assert (await client_for(url).lookup("gen-1")).outcome is Outcome.MALFORMED
    with hostile(lambda h: send(h, 200, b"\x00" * 10, Content_Encoding="br")) as url:
        assert (await client_for(url).lookup("gen-1")).outcome is Outcome.MALFORMED


def endless(handler: http.server.BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    chunk = b"10000\r\n" + b"{" * 0x10000 + b"\r\n"
    while True:
        handler.wfile.write(chunk)


def dripping(handler: http.server.BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", "100000")
    handler.end_headers()
    while True:  # a byte at a time, each inside httpx's read timeout, forever
        handler.wfile.write(b" ")
        handler.wfile.flush()
        time.sleep(0.05)  # the peer's pace, not a synchronisation


async def test_endless_and_dripping_bodies_are_bounded(client_for: Callable[[str], ZenMuxClient]) -> None:
    with hostile(endless) as url, peak_allocations() as peak:
        assert (await client_for(url).lookup("gen-1")).outcome is Outcome.TOO_LARGE
    assert peak[0] < ALLOCATION_BOUND, f"{peak[0] / 2**20:.0f} MB allocated for an endless body"
    with hostile(dripping) as url:
        assert (await client_for(url).lookup("gen-1")).outcome is Outcome.TIMEOUT  # zenmux.timeout_seconds


async def test_any_exception_in_a_lookup_is_an_outcome() -> None:
    class Exhausted(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            raise MemoryError

    class Broken(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            raise KeyError("a bug")

    config = ZenMuxConfig(base_url="http://127.0.0.1:9")
    assert (await ZenMuxClient(config, KEY, transport=Exhausted()).lookup("g")).outcome is Outcome.TOO_LARGE
    assert (await ZenMuxClient(config, KEY, transport=Broken()).lookup("g")).outcome is Outcome.CONNECTION_ERROR


def pieces_of_the_key(text: str) -> list[str]:
    secret = KEY[len("sk-ai-v1-"):]
    return [secret[i: i + MIN_PIECE] for i in range(len(secret) - MIN_PIECE + 1) if secret[i: i + MIN_PIECE] in text]


def echo_key(handler: http.server.BaseHTTPRequestHandler) -> None:
    """Echoes the Authorization header's key everywhere it can: error type (cut at 64 by us), message,
    request id (whole, and cut to 40), and, on 200, in the record's strings that become labels."""
    key = handler.headers["Authorization"].removeprefix("Bearer ")
    if "status=200" in handler.path or handler.path.endswith("gen-ok"):
        record = {"generationId": "gen-ok", "model": f"model-{key}", "api": key[:40], "finishReason": key[5:30],
                  "nativeTokens": {"prompt_tokens": 1, "completion_tokens": 1},
                  "usage": 0.1, "ratingResponses": {"billAmount": 0.1, "ratingDetails": [
                      {"feeItemCode": key, "billAmount": 0.1}]}}
        send(handler, 200, json.dumps(record).encode(), X_ZenMux_RequestId=key[:40])
        return
    error = {"error": {"type": f"invalid key {key}", "message": f"the key {key} is not valid"}}
    send(handler, 401, json.dumps(error).encode(), X_ZenMux_RequestId=f"req-{key}")


async def test_an_echoed_key_is_redacted_whole_or_cut(client_for: Callable[[str], ZenMuxClient]) -> None:
    with hostile(echo_key) as url:
        client = client_for(url)
        failed = await client.lookup("gen-bad")
        resolved = await client.lookup("gen-ok")
    assert failed.outcome is Outcome.UNAUTHORIZED and resolved.outcome is Outcome.RESOLVED
    assert resolved.record is not None and resolved.record.billing is not None
    texts = [failed.detail, failed.request_id or "", resolved.request_id or "", resolved.record.model,
             resolved.record.protocol, resolved.record.finish_reason, resolved.record.billing.fee_items[0].code]
    for text in texts:
        assert not pieces_of_the_key(text), text
    assert "<redacted>" in (failed.request_id or "") and failed.detail.startswith("401: invalid key")


async def test_an_echoed_key_reaches_no_span_log_or_metric(
    tmp_path: Path, start_exporter: StartExporter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    spans = Spans()
    with hostile(echo_key) as url:
        config = make_config(tmp_path, url, zenmux={"api_key": KEY, "timeout_seconds": 2})
        exporter = await start_exporter(config, tracing=spans.provider())
        append_lines(tmp_path / "app.log", [json.dumps({"generation_id": "gen-bad"}),
                                             json.dumps({"generation_id": "gen-ok"})])

        async def looked_up() -> bool:
            text = await scrape(exporter.metrics_port)
            return value(text, "zenmux_exporter_lookups_total", outcome="unauthorized") >= 1 and value(
                text, "zenmux_exporter_lookups_total", outcome="resolved") >= 1

        await wait_until(looked_up, what="both lookups answered")
        outputs = {"metrics": await scrape(exporter.metrics_port),
                   "openmetrics": await scrape(exporter.metrics_port, openmetrics=True)}
    # The exporter's own records (httpcore's DEBUG trace shows the Authorization header we send; in
    # production every record passes the redacting handler, tests/test_secrets.py).
    outputs["logs"] = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("exporter"))
    assert "rejects the API key" in outputs["logs"]
    outputs["spans"] = "\n".join(span.to_json() for span in spans.exporter.get_finished_spans())
    assert "zenmux.request_id" in outputs["spans"]
    for where, text in outputs.items():
        assert not pieces_of_the_key(text), f"a piece of the key in {where}"
