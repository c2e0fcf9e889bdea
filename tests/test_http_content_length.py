"""The metrics server answers a Content-Length that int() refuses or that is too large (400/413) instead of
raising, and keeps serving."""

from __future__ import annotations

import asyncio

import pytest

from exporter.web import HttpServer, Request, Response, text


async def raw_request(port: int, head: bytes) -> bytes:
    """Sends bytes as they are: the server reads headers as latin-1, so b"\\xb2" is '²' (isdigit(), not int())."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return answer


@pytest.mark.parametrize(
    ("length", "status"),
    [("²", b"400"), ("1³", b"400"), ("-1", b"400"), ("9" * 5000, b"400"), ("9" * 13, b"413")],
)
async def test_a_content_length_int_refuses_is_answered_not_raised(length: str, status: bytes) -> None:
    async def handler(request: Request) -> Response:
        return text(200, f"got {len(request.body)}\n")

    server = HttpServer(handler, "127.0.0.1", 0)
    await server.start()
    try:
        answer = await raw_request(
            server.port, f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode("latin-1")
        )
        assert answer.startswith(b"HTTP/1.1 " + status)
        ok = await raw_request(
            server.port, b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi"
        )
        assert ok.startswith(b"HTTP/1.1 200") and ok.endswith(b"got 2\n")
    finally:
        await server.close()
