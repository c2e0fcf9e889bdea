"""The asyncio transport under httpcore: TLS, keep-alive, timeouts, peers that close or reset, big bodies.

Every request goes both ways the pool offers: httpx's interface (httpcore's connections) and `get`, the lookup's
own h11 path."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from exporter.transport import HIGH_WATER_BYTES, PooledTransport, _Response
from exporter.zenmux import environment_proxy
from tests.support import make_cert

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
TIMEOUTS = httpx.Timeout(2.0).as_dict()


def response(body: bytes, *, close: bool = False) -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n"
    return (head + ("Connection: close\r\n" if close else "") + "\r\n").encode() + body


async def read_request(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def requests(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The requests a client sends on one connection, until it closes it."""
    while True:
        try:
            yield await read_request(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            return


@asynccontextmanager
async def server(handler: Handler, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    srv = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ssl_context)
    try:
        yield int(srv.sockets[0].getsockname()[1])
    finally:
        srv.close()


@asynccontextmanager
async def transport(ssl_context: ssl.SSLContext | None = None, connections: int = 2) -> AsyncIterator[PooledTransport]:
    client = PooledTransport(ssl_context=ssl_context or ssl.create_default_context(), max_connections=connections)
    try:
        yield client
    finally:
        await client.aclose()


VIA = ["httpx"]


@pytest.fixture(autouse=True, params=["httpx", "lean"])
def via(request: pytest.FixtureRequest) -> None:
    VIA[0] = request.param


async def get(client: PooledTransport, url: str, timeouts: dict[str, float | None] = TIMEOUTS) -> tuple[int, bytes]:
    if VIA[0] == "lean":
        parsed = httpx.URL(url)
        origin = (parsed.raw_scheme, parsed.raw_host, parsed.port or (443 if parsed.scheme == "https" else 80))
        got = await client.get(origin, parsed.raw_path, [(b"Host", parsed.netloc)], timeouts, 2**31)
        return got.status, got.body
    answer = await client.handle_async_request(httpx.Request("GET", url, extensions={"timeout": timeouts}))
    try:
        body = b"".join([chunk async for chunk in answer.aiter_bytes()])
    finally:
        await answer.aclose()
    return answer.status_code, body


async def test_keep_alive_reuses_one_connection() -> None:
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        async for request in requests(reader):
            writer.write(response(request.split(b" ")[1]))
        writer.close()

    async with server(handle) as port, transport() as client:
        for i in range(5):
            assert await get(client, f"http://127.0.0.1:{port}/x?id={i}") == (200, f"/x?id={i}".encode())
    assert connections == 1


async def test_a_server_closing_an_idle_connection_is_noticed() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(response(b"once"))  # keep-alive announced, then closed anyway
        await writer.drain()
        writer.close()

    async with server(handle) as port, transport() as client:
        for _ in range(3):
            assert await get(client, f"http://127.0.0.1:{port}/") == (200, b"once")
            # The close arrives while the connection is idle in the pool: wait until it has.
            async with asyncio.timeout(2):
                while not client.idle_connections_closed_by_peer():
                    await asyncio.sleep(0)


async def test_at_most_max_connections_are_open_and_the_rest_wait() -> None:
    open_now = most = 0
    release = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_now, most
        open_now += 1
        most = max(most, open_now)
        try:
            async for _ in requests(reader):
                await release.wait()
                writer.write(response(b"ok"))
        finally:
            open_now -= 1
            writer.close()

    async with server(handle) as port, transport(connections=2) as client:
        lookups = [asyncio.ensure_future(get(client, f"http://127.0.0.1:{port}/")) for _ in range(5)]
        async with asyncio.timeout(2):
            while open_now < 2:
                await asyncio.sleep(0)
        release.set()
        assert await asyncio.gather(*lookups) == [(200, b"ok")] * 5
    assert most == 2


async def test_a_silent_server_is_a_read_timeout() -> None:
    timed_out = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await timed_out.wait()  # silent until the client has given up

    async with server(handle) as port, transport() as client:
        try:
            with pytest.raises(httpx.ReadTimeout):
                await get(client, f"http://127.0.0.1:{port}/", {**TIMEOUTS, "read": 0.2})
        finally:
            timed_out.set()


async def test_a_reset_mid_body_is_a_transport_error() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial")
        await writer.drain()
        writer.transport.abort()

    async with server(handle) as port, transport() as client:
        with pytest.raises(httpx.TransportError):
            await get(client, f"http://127.0.0.1:{port}/")


async def test_a_refused_connection_is_a_connect_error() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async with server(handle) as port:
        pass
    async with transport() as client:
        with pytest.raises(httpx.ConnectError):
            await get(client, f"http://127.0.0.1:{port}/")


async def test_a_body_larger_than_the_high_water_mark_arrives_whole() -> None:
    body = bytes(range(256)) * (4 * HIGH_WATER_BYTES // 256)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(response(body))
        await writer.drain()
        writer.close()

    async with server(handle) as port, transport() as client:
        assert await get(client, f"http://127.0.0.1:{port}/") == (200, body)


async def test_a_lookup_cancelled_while_waiting_for_its_answer_leaves_the_pool_usable() -> None:
    calls = 0
    first_arrived, never = asyncio.Event(), asyncio.Event()  # never set while the lookup waits

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        async for _ in requests(reader):
            calls += 1
            if calls == 1:
                first_arrived.set()
                await never.wait()  # the first request is never answered
            writer.write(response(b"ok"))
        writer.close()

    async with server(handle) as port, transport(connections=1) as client:
        waiting = asyncio.ensure_future(get(client, f"http://127.0.0.1:{port}/"))
        await first_arrived.wait()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        # Its connection is closed, not reused for the next lookup, and its slot is free again.
        assert await get(client, f"http://127.0.0.1:{port}/") == (200, b"ok")
        never.set()  # let the first handler end with the test


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("tls"), "localhost")


async def test_tls_verifies_the_server_and_keeps_the_connection(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        async for _ in requests(reader):
            writer.write(response(b"secret"))
        writer.close()

    async with server(handle, server_context) as port:
        async with transport(ssl.create_default_context(cafile=str(cert))) as trusting:
            for _ in range(3):
                assert await get(trusting, f"https://localhost:{port}/") == (200, b"secret")
        async with transport(ssl.create_default_context()) as untrusting:
            with pytest.raises(httpx.ConnectError):
                await get(untrusting, f"https://localhost:{port}/")
    assert connections in (1, 2)  # one for the trusting client (the refused handshake may count as another)


async def test_the_tls_context_is_made_at_the_first_tls_connection(certificate: tuple[Path, Path]) -> None:
    """A factory given for the context is called once, when a TLS connection is first opened (loading a CA
    bundle is start-up time otherwise); plain HTTP never calls it."""
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    made: list[ssl.SSLContext] = []

    def factory() -> ssl.SSLContext:
        made.append(ssl.create_default_context(cafile=str(cert)))
        return made[-1]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async for _ in requests(reader):
            writer.write(response(b"secret"))
        writer.close()

    client = PooledTransport(ssl_context=factory, max_connections=2)
    try:
        async with server(handle) as port:
            assert await get(client, f"http://127.0.0.1:{port}/") == (200, b"secret")
        assert made == []
        async with server(handle, server_context) as port:
            for _ in range(2):
                assert await get(client, f"https://localhost:{port}/") == (200, b"secret")
        assert len(made) == 1
    finally:
        await client.aclose()


def test_environment_proxies_are_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                 "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert environment_proxy("https://zenmux.ai/api/v1/generation?id=") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert environment_proxy("https://zenmux.ai/api/v1/generation?id=") == "http://proxy.internal:3128"
    assert environment_proxy("http://127.0.0.1:8080/api/v1/generation?id=") is None
    monkeypatch.setenv("NO_PROXY", "zenmux.ai")
    assert environment_proxy("https://zenmux.ai/api/v1/generation?id=") is None


async def test_a_get_on_a_connection_the_server_just_closed_is_sent_again_on_a_new_one() -> None:
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(response(b"first"))  # keep-alive announced
        await writer.drain()
        with contextlib.suppress(asyncio.IncompleteReadError):
            await read_request(reader)  # the next request arrives, and the server closes instead of answering
        writer.close()

    async with server(handle) as port, transport() as client:
        assert await get(client, f"http://127.0.0.1:{port}/") == (200, b"first")
        assert await get(client, f"http://127.0.0.1:{port}/") == (200, b"first")
    assert connections == 2


async def test_a_lookup_cancelled_while_waiting_for_a_connection_leaves_no_slot_taken() -> None:
    release = asyncio.Event()
    served = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        async for _ in requests(reader):
            served += 1
            await release.wait()
            writer.write(response(b"ok"))
        writer.close()

    async with server(handle) as port, transport(connections=1) as client:
        url = f"http://127.0.0.1:{port}/"
        first = asyncio.ensure_future(get(client, url))
        async with asyncio.timeout(2):
            while served < 1:  # the only connection is busy
                await asyncio.sleep(0)
        queued = asyncio.ensure_future(get(client, url))
        await asyncio.sleep(0)  # let it reach the wait for a connection
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        release.set()
        assert await first == (200, b"ok")
        assert await get(client, url) == (200, b"ok")  # the slot the cancelled lookup waited for is free
        assert await get(client, url) == (200, b"ok")


# -- framing: both ways (httpcore's h11 and `get`'s httptools) read the same answers the same way ------------------


async def answer_each_request_with(raw: bytes) -> tuple[Handler, list[int]]:
    """A server answering every request with `raw` (on the same connection while it stays open); the list counts
    its connections."""
    connections = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[0] += 1
        async for _ in requests(reader):
            writer.write(raw)
            await writer.drain()
        writer.close()

    return handle, connections


@pytest.mark.parametrize(
    ("raw", "body", "reused"),
    [
        # chunked, with a chunk extension and a trailer
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n",
         b"abcde", True),
        # an informational answer read past
        (b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok", True),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b"", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"", True),
        # keep-alive refused: a new connection each time
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", b"ok", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok", False),
    ],
)
async def test_framings_and_keep_alive(raw: bytes, body: bytes, reused: bool) -> None:
    handle, connections = await answer_each_request_with(raw)
    async with server(handle) as port, transport() as client:
        for _ in range(3):
            assert await get(client, f"http://127.0.0.1:{port}/") == (200 if b" 204 " not in raw else 204, body)
    assert connections[0] == (1 if reused else 3)


async def test_a_body_framed_by_the_connection_end_is_read_to_it() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil ")
        await writer.drain()
        writer.write(b"the end")
        await writer.drain()
        writer.close()

    async with server(handle) as port, transport() as client:
        for _ in range(2):
            assert await get(client, f"http://127.0.0.1:{port}/") == (200, b"until the end")


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # cut short by the close
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc",  # a chunk cut short
        b"HTTP/1.1 200 OK\r\nContent-Le",  # the head cut short
        b"HTTP/1.1 200 OK\r\n\r\n"[:0],  # nothing at all
        b"garbage that is no HTTP\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",  # a smuggling shape
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * (300 * 1024) + b"\r\n\r\n",  # a head over the limit (100 KB)
    ],
)
async def test_broken_answers_are_protocol_errors(raw: bytes) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(raw)
        await writer.drain()
        writer.close()

    async with server(handle) as port, transport() as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await get(client, f"http://127.0.0.1:{port}/")


async def test_bytes_after_an_answer_cost_the_connection_not_the_answer() -> None:
    handle, connections = await answer_each_request_with(response(b"ok") + b"HTTP/1.1 200 OK\r\nunasked")
    async with server(handle) as port, transport() as client:
        for _ in range(2):
            assert await get(client, f"http://127.0.0.1:{port}/") == (200, b"ok")
    assert connections[0] == 2


async def test_lean_headers_request_and_its_validation() -> None:
    """`get` writes h11's request bytes and returns the headers lower-cased, trimmed, the last of a repeat."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async for request in requests(reader):
            seen.append(request)
            writer.write(b"HTTP/1.1 200 OK\r\nX-Zenmux-RequestId:  req-1 \r\nX-Twice: a\r\nX-Twice: b\r\n"
                         b"Content-Length: 0\r\n\r\n")
        writer.close()

    async with server(handle) as port, transport() as client:
        origin = (b"http", b"127.0.0.1", port)
        headers = [(b"Host", f"127.0.0.1:{port}".encode()), (b"Authorization", b"Bearer k")]
        answer = await client.get(origin, b"/g?id=a%20b", headers, TIMEOUTS, 100)
        assert answer.headers["x-zenmux-requestid"] == "req-1"
        assert answer.headers["x-twice"] == "b"
        expected = f"GET /g?id=a%20b HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer k\r\n\r\n"
        assert seen == [expected.encode()]
        with pytest.raises(httpx.LocalProtocolError):
            await client.get(origin, b"/g?id=a b", headers, TIMEOUTS, 100)
        with pytest.raises(httpx.LocalProtocolError):
            await client.get(origin, b"/g", [*headers, (b"X-Bad", b"a\r\nInjected: 1")], TIMEOUTS, 100)
        assert len(seen) == 1


async def test_a_lookup_leaves_no_cycle_for_the_garbage_collector() -> None:
    """The parser and the object its callbacks reach refer to each other: the link is cut after each answer."""
    handle, _ = await answer_each_request_with(response(b"ok"))
    async with server(handle) as port, transport() as client:
        gc.collect()
        gc.disable()
        try:
            for _ in range(3):
                assert await get(client, f"http://127.0.0.1:{port}/") == (200, b"ok")
            assert not [o for o in gc.get_objects() if isinstance(o, _Response)]
        finally:
            gc.enable()
