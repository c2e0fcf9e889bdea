"""The transport's flow control on real loopback sockets: a connection stops reading past HIGH_WATER_BYTES of
unread data and resumes below a quarter of it (plain and TLS), and a write the peer does not take waits for
asyncio's resume_writing, or times out."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import httpcore
import httpx
import pytest

from exporter.transport import HIGH_WATER_BYTES, AsyncioStream, PooledTransport, connect_tcp
from tests.support import make_cert, wait_until

BODY = os.urandom(4 * HIGH_WATER_BYTES)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def server(handler: Handler, context: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """A loopback server running `handler` per connection; yields its port."""
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    try:
        yield listener.sockets[0].getsockname()[1]
    finally:
        for task in tasks:
            task.cancel()
        listener.close()
        await listener.wait_closed()


async def send_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(BODY)
    await writer.drain()
    await reader.read()  # until the client closes


async def assert_paused_then_resumed(stream: AsyncioStream) -> None:
    receiver = stream._receiver
    await wait_until(lambda: receiver.reading_paused, what="reading to pause past the high-water mark")
    assert receiver.transport is not None and not receiver.transport.is_reading()
    # Paused: nothing more is taken from the socket, so the buffer stays within one read of the mark.
    assert HIGH_WATER_BYTES < len(receiver.buffer) <= 2 * HIGH_WATER_BYTES
    received = bytearray()
    while len(receiver.buffer) >= HIGH_WATER_BYTES // 4:
        assert receiver.reading_paused
        received += await stream.read(16 * 1024, timeout=10)
    received += await stream.read(16 * 1024, timeout=10)  # the read that leaves less than a quarter resumes
    assert not receiver.reading_paused and receiver.transport.is_reading()
    received += await read_all_rest(stream, len(BODY) - len(received))
    assert bytes(received) == BODY


async def read_all_rest(stream: AsyncioStream, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = await stream.read(64 * 1024, timeout=10)
        assert chunk, "the connection ended early"
        out += chunk
    return bytes(out)


async def test_reading_pauses_past_the_high_water_mark_and_resumes_below_a_quarter() -> None:
    async with server(send_body) as port:
        stream = await connect_tcp("127.0.0.1", port, timeout=5)
        try:
            await assert_paused_then_resumed(stream)
        finally:
            await stream.aclose()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting it)."""
    cert, key = make_cert(tmp_path_factory.mktemp("tls"))
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    return server_context, ssl.create_default_context(cafile=str(cert))


async def test_reading_pauses_and_resumes_on_the_tls_transport(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_context, client_context = tls
    async with server(send_body, server_context) as port:
        plain = await connect_tcp("127.0.0.1", port, timeout=5)
        stream = await plain.start_tls(client_context, server_hostname="localhost", timeout=5)
        assert isinstance(stream, AsyncioStream)
        try:
            # The receiver pauses the TLS transport, not the raw socket's, which start_tls took over.
            assert stream._receiver.transport is stream._transport
            await assert_paused_then_resumed(stream)
        finally:
            await stream.aclose()


@contextlib.asynccontextmanager
async def deaf_peer() -> AsyncIterator[tuple[int, asyncio.Event, bytearray]]:
    """A server that reads nothing until the event is set, then everything; yields (port, event, received)."""
    listen = asyncio.Event()
    received = bytearray()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await listen.wait()
        while chunk := await reader.read(1024 * 1024):
            received.extend(chunk)

    async with server(handler) as port:
        yield port, listen, received


# More than the kernel's socket buffers and asyncio's write high-water mark take: the transport must pause us.
LARGE = os.urandom(32 * 1024 * 1024)


async def test_a_write_the_peer_does_not_take_waits_for_resume_writing() -> None:
    async with deaf_peer() as (port, listen, received):
        stream = await connect_tcp("127.0.0.1", port, timeout=5)
        receiver = stream._receiver
        try:
            writing = asyncio.create_task(stream.write(LARGE, timeout=30))
            await wait_until(lambda: receiver._writable is not None, what="the transport to pause writing")
            assert not writing.done()
            listen.set()
            await writing  # resume_writing woke it
            assert receiver._writable is None
            await stream.aclose()
            await wait_until(lambda: len(received) == len(LARGE), what="the peer to receive everything")
            assert bytes(received) == LARGE
        finally:
            await stream.aclose()


async def test_a_write_the_peer_never_takes_times_out() -> None:
    async with deaf_peer() as (port, _, _):
        stream = await connect_tcp("127.0.0.1", port, timeout=5)
        try:
            with pytest.raises(httpcore.WriteTimeout):
                await stream.write(LARGE, timeout=0.2)
        finally:
            await stream.aclose()


async def test_a_large_response_through_the_pool_arrives_whole_after_pausing() -> None:
    """End to end: httpx reads a body larger than the high-water mark through PooledTransport, slowly."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY)
        await writer.drain()
        await reader.read()

    async with server(answer) as port:
        transport = PooledTransport(ssl_context=ssl.create_default_context(), max_connections=1)
        async with httpx.AsyncClient(transport=transport) as client, client.stream(
            "GET", f"http://127.0.0.1:{port}/"
        ) as response:
            (connection,) = transport._connections
            stream = connection._network_stream
            assert isinstance(stream, AsyncioStream)
            await wait_until(lambda: stream._receiver.reading_paused, what="reading to pause")
            body = b"".join([chunk async for chunk in response.aiter_raw()])
            assert not stream._receiver.reading_paused
    assert body == BODY
