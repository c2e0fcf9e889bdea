"""The HTTP server: bounded connections (eviction of the stalest), deadlines, framing by h11, HTTP/1.0."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from exporter.telemetry import HttpCollector
from exporter.web import HttpServer, Limits, Request, Response
from tests.support import SMUGGLING, make_cert, wait_until

SHORT = Limits(max_connections=2, idle_seconds=0.3, header_seconds=0.3, body_seconds=0.3, write_stall_seconds=0.3,
               response_seconds=2.0, handshake_seconds=0.3)


async def ok(request: Request) -> Response:
    return Response(200, b"ok " + request.path.encode() + b"\n")


@pytest.fixture
async def server() -> AsyncIterator[HttpServer]:
    server = HttpServer(ok, "127.0.0.1", 0, limits=SHORT)
    await server.start()
    yield server
    await server.close()


async def exchange(port: int, data: bytes) -> bytes:
    """Sends `data`, then reads until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return answer


def collector(server: HttpServer) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(HttpCollector(lambda: server.open_connections, lambda: server.rejected_connections,
                                    server.max_connections, lambda: server.rejected))
    return registry


async def test_at_the_bound_a_new_connection_takes_the_place_of_the_stalest(server: HttpServer) -> None:
    registry = collector(server)
    held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
    for _, writer in held:
        writer.write(b"GET /")  # an unfinished request keeps the connection open
        await writer.drain()
    await wait_until(lambda: server.open_connections == 2, what="both connections being served")
    assert registry.get_sample_value("zenmux_exporter_http_connections") == 2
    assert registry.get_sample_value("zenmux_exporter_http_max_connections") == 2
    answer = await exchange(server.port, b"GET /fresh HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok /fresh\n")
    assert await asyncio.wait_for(held[0][0].read(), 5) == b""  # the stalest was closed for it
    assert (registry.get_sample_value("zenmux_exporter_http_requests_rejected_total", {"reason": "evicted"}) or 0) >= 1
    assert registry.get_sample_value("zenmux_exporter_http_connections_refused_total") == 0
    for _, writer in held:
        writer.close()


async def test_connections_whose_handler_runs_are_not_evicted_and_the_next_is_refused() -> None:
    release = asyncio.Event()
    entered = 0

    async def slow(_: Request) -> Response:
        nonlocal entered
        entered += 1
        await release.wait()
        return Response(200, b"done\n")

    server = HttpServer(slow, "127.0.0.1", 0, limits=SHORT)
    await server.start()
    try:
        busy = [asyncio.create_task(exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
                for _ in range(2)]
        await wait_until(lambda: entered == 2, what="both handlers running")
        assert await exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b""
        assert server.rejected_connections == 1
        release.set()
        for answer in await asyncio.gather(*busy):
            assert answer.endswith(b"done\n")
    finally:
        await server.close()


@pytest.mark.parametrize(("data", "reason"), [
    (b"", ""),  # silent: closed after the keep-alive idle deadline, not counted as rejected
    (b"GET / HTTP/1.1\r\nHost: x\r\n", "header_timeout"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nab", "body_timeout"),
])
async def test_a_connection_that_makes_no_progress_is_closed(server: HttpServer, data: bytes, reason: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(data)
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    await wait_until(lambda: server.open_connections == 0, what="the connection forgotten")
    if reason:
        assert server.rejected[reason] == 1




@pytest.mark.parametrize("shape", SMUGGLING)
async def test_smuggling_shapes_get_one_4xx_and_close(server: HttpServer, shape: str) -> None:
    answer = await exchange(server.port, SMUGGLING[shape])
    assert answer.startswith(b"HTTP/1.1 400") or answer.startswith(b"HTTP/1.1 431")
    assert answer.count(b"HTTP/1.1") == 1 and b"smuggled" not in answer


async def test_a_chunked_body_is_framed_not_read_as_the_next_request(server: HttpServer) -> None:
    answer = await exchange(server.port, b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                         b"1a\r\nGET /smuggled HTTP/1.1\r\n\r\n\r\n0\r\n\r\n"
                                         b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.count(b"HTTP/1.1 200") == 2 and b"ok /a" in answer and b"ok /b" in answer
    assert b"smuggled" not in answer


async def test_http_1_0_is_answered_and_closed(server: HttpServer) -> None:
    answer = await exchange(server.port, b"GET /old HTTP/1.0\r\n\r\n")  # no Host: fine in 1.0; closed after
    assert answer.startswith(b"HTTP/1.1 200") and b"connection: close" in answer.lower()


async def test_pipelined_requests_are_answered_in_order(server: HttpServer) -> None:
    requests = b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(20))
    answer = await exchange(server.port, requests + b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert [int(line.split(b"/")[1]) for line in answer.split(b"\n") if line.startswith(b"ok /") and
            line[4:5].isdigit()] == list(range(20))


async def test_a_peer_that_does_not_read_is_cut_at_the_write_deadline() -> None:
    async def big(_: Request) -> Response:
        return Response(200, b"x" * (8 * 1024 * 1024))

    server = HttpServer(big, "127.0.0.1", 0, limits=SHORT)
    await server.start()
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port, limit=1024)
        writer.transport.pause_reading()  # type: ignore[attr-defined]
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_until(lambda: server.rejected["write_timeout"] == 1, what="the non-reader cut")
        assert server.open_connections == 0
        writer.close()
    finally:
        await server.close()


async def test_a_tls_handshake_counts_against_the_bound_and_has_a_deadline(tmp_path: Path) -> None:

    cert, key = make_cert(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = HttpServer(ok, "127.0.0.1", 0, ssl_context=context, limits=SHORT)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)  # plain TCP: no ClientHello
        await wait_until(lambda: server.open_connections == 1, what="the handshake counted as a connection")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert server.rejected["handshake_timeout"] == 1
        client = ssl.create_default_context(cafile=str(cert))
        answer = await exchange_tls(server.port, client)
        assert answer.startswith(b"HTTP/1.1 200")
    finally:
        await server.close()


async def exchange_tls(port: int, context: ssl.SSLContext) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return answer
