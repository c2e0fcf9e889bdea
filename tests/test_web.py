"""The small HTTP server: bounded connections."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from exporter.telemetry import HttpCollector
from exporter.web import HttpServer, Request, Response
from tests.support import wait_until


async def ok(_: Request) -> Response:
    return Response(200, b"ok\n")


async def test_connections_beyond_the_bound_are_closed_and_the_rest_served() -> None:
    server = HttpServer(ok, "127.0.0.1", 0, max_connections=2)
    registry = CollectorRegistry()
    registry.register(HttpCollector(lambda: server.open_connections, lambda: server.rejected_connections,
                                    server.max_connections))
    await server.start()
    held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
    for _, writer in held:
        writer.write(b"GET /")  # an unfinished request keeps the connection open
        await writer.drain()
    await wait_until(lambda: server.open_connections == 2, what="both connections being served")
    assert registry.get_sample_value("zenmux_exporter_http_connections") == 2
    assert registry.get_sample_value("zenmux_exporter_http_max_connections") == 2
    assert registry.get_sample_value("zenmux_exporter_http_connections_refused_total") == 0
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed without an answer
    writer.close()
    assert registry.get_sample_value("zenmux_exporter_http_connections_refused_total") == 1
    first_reader, first_writer = held[0]
    first_writer.write(b"x HTTP/1.1\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(first_reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 404") or answer.startswith(b"HTTP/1.1 200")
    assert server.rejected_connections == 1
    for _, w in held:
        w.close()
    await server.close()
