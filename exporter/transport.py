"""A lean httpx transport: httpcore's HTTP/1.1 connections over asyncio's own sockets, pooled here.

httpx's default transport reaches the socket through anyio streams: every read and write opens a cancel
scope with its own timer, maps exceptions through two context managers, and every pooled connection's
health check builds anyio's attribute table and polls the socket. That was ~40 % of the exporter's CPU per
lookup. Here a plain asyncio protocol buffers what arrives; a read takes from the buffer or waits on one
future with one timer, and an idle connection knows it was closed by its peer without a syscall. HTTP
itself (h11, keep-alive, timeouts) is still httpcore's `AsyncHTTP11Connection` (which keeps its own anyio
lock), requests and responses are httpx's; the pool and its bound are `PooledTransport`'s. A lookup's own
GET (`PooledTransport.get`) parses its response with httptools (llhttp, C) instead.
"""

# ruff: noqa: ASYNC109 -- httpcore's network interface passes timeouts as arguments
from __future__ import annotations

import asyncio
import re
import ssl
import time
import typing
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial

import h11
import httpcore
import httptools
import httpx

from exporter.netio import Receiver

# A response is read as it arrives; past this much unread data the socket stops being read (resumed below a
# quarter of it), so a peer cannot make a connection buffer without bound.
HIGH_WATER_BYTES = 256 * 1024
# As httpcore's HTTP/1.1 connection: the most a response's status line and headers may take, and a read's size.
MAX_HEADER_BYTES = 100 * 1024
READ_BYTES = 64 * 1024
# `get`'s serialized request heads kept (one per distinct header list; a client has one).
MAX_REQUEST_HEADS = 8


# httpcore's errors as httpx's (most specific first), so callers see the same exceptions as with httpx's own
# transport.
_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)
_CORE_ERRORS = tuple(core for core, _mapped in _ERRORS)
# What a request on a kept-alive connection meets when the server closed it before answering.
_STALE_CONNECTION = (httpcore.RemoteProtocolError, httpcore.ReadError, httpcore.WriteError)
_SAFE_TO_RESEND = (b"GET", b"HEAD")


def as_httpx_error(err: Exception) -> Exception:
    for core, mapped in _ERRORS:
        if isinstance(err, core):
            return mapped(str(err))
    return err


class AsyncioStream(httpcore.AsyncNetworkStream):
    def __init__(self, transport: asyncio.Transport, receiver: Receiver) -> None:
        self._transport = transport
        self._receiver = receiver

    @property
    def receiver(self) -> Receiver:
        return self._receiver

    def close(self) -> None:
        self._transport.close()

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        receiver = self._receiver
        if not await receiver.readable(timeout):
            raise httpcore.ReadTimeout("timed out reading the response")
        if receiver.buffer:
            return receiver.take(max_bytes)
        if receiver.error is not None:
            raise httpcore.ReadError(str(receiver.error) or type(receiver.error).__name__)
        return b""  # the peer closed the connection: httpcore's end-of-stream signal

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        if self._receiver.closed or self._transport.is_closing():
            raise httpcore.WriteError("the connection is closed")
        self._transport.write(buffer)
        if not await self._receiver.writable(timeout):
            raise httpcore.WriteTimeout("timed out writing the request")

    async def aclose(self) -> None:
        self._transport.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        receiver = self._receiver
        try:
            async with asyncio.timeout(timeout):
                transport = await receiver.loop.start_tls(
                    self._transport, receiver, ssl_context, server_hostname=server_hostname
                )
        except TimeoutError:
            self._transport.close()
            raise httpcore.ConnectTimeout("timed out in the TLS handshake") from None
        except (OSError, ssl.SSLError) as err:
            self._transport.close()
            raise httpcore.ConnectError(str(err)) from None
        if transport is None:  # the peer closed the connection during the handshake
            self._transport.close()
            raise httpcore.ConnectError("the connection was closed during the TLS handshake")
        assert isinstance(transport, asyncio.Transport)
        # start_tls does not call connection_made again: the receiver pauses and resumes the TLS transport.
        receiver.transport = transport
        return AsyncioStream(transport, receiver)

    def get_extra_info(self, info: str) -> typing.Any:
        if info == "is_readable":
            # An idle connection is sent nothing; data or an end there means the server is closing it.
            return bool(self._receiver.buffer) or self._receiver.closed
        names = {"ssl_object": "ssl_object", "client_addr": "sockname", "server_addr": "peername", "socket": "socket"}
        name = names.get(info)
        return None if name is None else self._transport.get_extra_info(name)


async def connect_tcp(host: str, port: int, timeout: float | None) -> AsyncioStream:
    """A TCP connection on the running event loop's own transport, as the stream httpcore reads and writes."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            transport, receiver = await loop.create_connection(lambda: Receiver(loop, HIGH_WATER_BYTES), host, port)
    except TimeoutError:
        raise httpcore.ConnectTimeout(f"timed out connecting to {host}:{port}") from None
    except OSError as err:
        raise httpcore.ConnectError(str(err)) from None
    assert isinstance(transport, asyncio.Transport)
    return AsyncioStream(transport, receiver)


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(
        self, stream: typing.AsyncIterable[bytes], on_close: typing.Callable[[], typing.Awaitable[None]]
    ) -> None:
        self._stream = stream
        self._on_close = on_close

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                yield chunk
        except _CORE_ERRORS as err:
            raise as_httpx_error(err) from err

    async def aclose(self) -> None:
        try:
            closer = getattr(self._stream, "aclose", None)
            if closer is not None:
                await closer()  # the connection is idle again, or closed if the response was not read to its end
        finally:
            await self._on_close()


class PooledTransport(httpx.AsyncBaseTransport):
    """httpx transport over httpcore's HTTP/1.1 connections on asyncio streams (`connect_tcp`), pooled here.

    httpcore's own pool serves any number of waiting requests: a lock, an event and a scan of every
    connection and queued request per request, and again when each response closes (~a third of the CPU of
    a lookup). A lookup here takes an idle connection or opens one, and gives it back when its response is
    closed; at most `max_connections` are in use at once (callers beyond wait for one to be given back).
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | Callable[[], ssl.SSLContext],
        max_connections: int,
        keepalive_expiry: float = 5.0,
    ) -> None:
        # A factory is called at the first TLS connection: loading the CA bundle is ~0.05 s of start-up otherwise.
        self._make_ssl_context = ssl_context if callable(ssl_context) else lambda: ssl_context
        self._ssl_context: ssl.SSLContext | None = None
        self._keepalive_expiry = keepalive_expiry
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[httpcore.AsyncHTTP11Connection] = []  # most recently used last
        self._connections: set[httpcore.AsyncHTTP11Connection] = set()
        # `get`'s own connections (the lookup's path), under the same bound.
        self._lean_idle: list[_LeanConnection] = []
        self._lean: set[_LeanConnection] = set()
        # Each header list's serialized request head (`request_head`): one, in practice.
        self._heads: dict[tuple[tuple[bytes, bytes], ...], bytes] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        assert isinstance(request.stream, httpx.AsyncByteStream)
        origin = httpcore.Origin(url.raw_scheme, url.raw_host, url.port or (443 if url.scheme == "https" else 80))
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        await self._slots.acquire()
        try:
            connection, response = await self._send(origin, core)
        except BaseException as err:
            self._slots.release()
            if isinstance(err, _CORE_ERRORS):
                raise as_httpx_error(err) from err
            raise
        assert isinstance(response.stream, typing.AsyncIterable)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response.stream, partial(self._checkin, connection)),
            extensions=response.extensions,
        )

    async def _send(
        self, origin: httpcore.Origin, request: httpcore.Request
    ) -> tuple[httpcore.AsyncHTTP11Connection, httpcore.Response]:
        """Sends on an idle connection, or a new one; a connection that fails is closed and forgotten."""
        connection = await self._checkout(origin)
        if connection is not None:
            try:
                return connection, await connection.handle_async_request(request)
            except BaseException as err:
                await self._discard(connection)
                if not (isinstance(err, _STALE_CONNECTION) and request.method in _SAFE_TO_RESEND):
                    raise
                # A kept-alive connection the server closed as the request went out (its idle timeout may be as
                # short as our keep-alive): no answer came, so a GET is sent once more, on a new connection.
        connection = await self._connect(origin, request)
        try:
            return connection, await connection.handle_async_request(request)
        except BaseException:
            await self._discard(connection)
            raise

    async def _checkout(self, origin: httpcore.Origin) -> httpcore.AsyncHTTP11Connection | None:
        idle = self._idle
        while idle:
            connection = idle.pop()
            if connection.can_handle_request(origin) and connection.is_idle() and not connection.has_expired():
                return connection
            await self._discard(connection)  # expired, closed by the server, or for another origin
        return None

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = self._make_ssl_context()
            self._ssl_context.set_alpn_protocols(["http/1.1"])
        return self._ssl_context

    async def _connect(self, origin: httpcore.Origin, request: httpcore.Request) -> httpcore.AsyncHTTP11Connection:
        timeout = request.extensions.get("timeout", {}).get("connect")
        host = origin.host.decode("ascii")
        stream: httpcore.AsyncNetworkStream = await connect_tcp(host, origin.port, timeout)
        if origin.scheme == b"https":
            stream = await stream.start_tls(self._tls(), server_hostname=host, timeout=timeout)
        connection = httpcore.AsyncHTTP11Connection(origin, stream, keepalive_expiry=self._keepalive_expiry)
        self._connections.add(connection)
        return connection

    async def _checkin(self, connection: httpcore.AsyncHTTP11Connection) -> None:
        self._slots.release()
        if connection.is_idle():
            self._idle.append(connection)
        else:
            await self._discard(connection)

    async def _discard(self, connection: httpcore.AsyncHTTP11Connection) -> None:
        self._connections.discard(connection)
        if not connection.is_closed():
            await connection.aclose()

    def idle_connections_closed_by_peer(self) -> bool:
        """Whether every idle connection has seen its server close it (so the next request opens a new one)."""
        now = time.monotonic()
        return all(connection.has_expired() for connection in self._idle) and not any(
            connection.reusable(now) for connection in self._lean_idle
        )

    async def aclose(self) -> None:
        connections, self._connections, self._idle = self._connections, set(), []
        lean, self._lean, self._lean_idle = self._lean, set(), []
        for connection in connections:
            await connection.aclose()
        for lean_connection in lean:
            lean_connection.close()

    # -- the lookup's path ------------------------------------------------------------------------------------

    async def get(
        self,
        origin: tuple[bytes, bytes, int],
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        timeouts: dict[str, float | None],
        limit: int,
    ) -> Answer:
        """GET `target` (path and query) from `origin` (scheme, host, port) with exactly `headers` (Host
        included), the body read and decoded within `limit` bytes, on a connection of this pool (within the same
        `max_connections`). What a lookup needs without httpx's and httpcore's request and response models.
        Raises httpx's transport errors, as `handle_async_request` does."""
        await self._slots.acquire()
        try:
            if _TARGET.fullmatch(target) is None:
                raise httpcore.LocalProtocolError("the request target is not visible ASCII")
            request = b"GET " + target + self._head(headers)
            connection = self._lean_checkout(origin)
            if connection is not None:
                try:
                    return await self._lean_exchange(connection, request, timeouts, limit)
                except _STALE_CONNECTION:
                    pass  # closed by the server as the request went out: sent once more, on a new connection
            connection = await self._lean_connect(origin, timeouts.get("connect"))
            return await self._lean_exchange(connection, request, timeouts, limit)
        except _CORE_ERRORS as err:
            raise as_httpx_error(err) from err
        finally:
            self._slots.release()

    def _head(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        key = tuple(headers)
        head = self._heads.get(key)
        if head is None:
            head = request_head(headers)
            if len(self._heads) >= MAX_REQUEST_HEADS:
                self._heads.clear()
            self._heads[key] = head
        return head

    async def _lean_exchange(
        self, connection: _LeanConnection, request: bytes, timeouts: dict[str, float | None], limit: int
    ) -> Answer:
        try:
            answer = await connection.exchange(request, timeouts, limit)
        except BaseException:
            self._lean_discard(connection)
            raise
        if answer.problem is None and connection.done(time.monotonic()):
            self._lean_idle.append(connection)
        else:
            self._lean_discard(connection)  # a body not read to its end leaves the connection unusable
        return answer

    def _lean_checkout(self, origin: tuple[bytes, bytes, int]) -> _LeanConnection | None:
        idle = self._lean_idle
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.key == origin and connection.reusable(now):
                return connection
            self._lean_discard(connection)  # expired, closed by the server, or for another origin
        return None

    async def _lean_connect(self, origin: tuple[bytes, bytes, int], timeout: float | None) -> _LeanConnection:
        scheme, host, port = origin
        name = host.decode("ascii")
        stream = await connect_tcp(name, port, timeout)
        if scheme == b"https":
            secure = await stream.start_tls(self._tls(), server_hostname=name, timeout=timeout)
            assert isinstance(secure, AsyncioStream)
            stream = secure
        connection = _LeanConnection(origin, stream, self._keepalive_expiry)
        self._lean.add(connection)
        return connection

    def _lean_discard(self, connection: _LeanConnection) -> None:
        self._lean.discard(connection)
        connection.close()


# -- reading a response body within a bound ------------------------------------------------------------------

# More codings than this on one response is no real server: a stack of gzip layers multiplies a bomb.
MAX_CONTENT_CODINGS = 2


class BodyTooLarge(Exception):
    """The body, as received or once decoded by any of its content codings, is over the limit."""


class BodyEncodingError(Exception):
    """The body's Content-Encoding is not one we asked for, or its bytes do not decode."""


class _Inflate:
    """One gzip or deflate layer whose output is bounded in total: zlib is never asked for more than fits."""

    def __init__(self, coding: str, limit: int) -> None:
        if coding in ("gzip", "x-gzip"):
            self._wbits = 16 + zlib.MAX_WBITS
        elif coding == "deflate":
            self._wbits = zlib.MAX_WBITS
        else:
            raise BodyEncodingError(f"content-encoding {coding[:32]!r} was not asked for")
        self._coding = coding
        self._zlib = zlib.decompressobj(self._wbits)
        self._started = False
        self._left = limit

    def feed(self, data: bytes) -> bytes:
        try:
            out = self._zlib.decompress(data, self._left + 1)
        except zlib.error:
            if self._wbits != zlib.MAX_WBITS or self._started:
                raise BodyEncodingError(f"the body does not decode as {self._coding}") from None
            # "deflate" is raw deflate for some servers (as httpx's decoder allows).
            self._wbits = -zlib.MAX_WBITS
            self._zlib = zlib.decompressobj(self._wbits)
            return self.feed(data)
        self._started = True
        if len(out) > self._left or self._zlib.unconsumed_tail:
            raise BodyTooLarge("decoded body over the limit")
        self._left -= len(out)
        return out


async def read_bounded(response: httpx.Response, limit: int) -> bytes:
    """The response body decoded, never holding more than `limit` bytes at any layer (a 2 KB gzip bomb that
    inflates to gigabytes stops at `limit` + 1 byte). Raises BodyTooLarge or BodyEncodingError."""
    codings = [c.strip().lower() for c in response.headers.get("content-encoding", "").split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if len(codings) > MAX_CONTENT_CODINGS:
        raise BodyEncodingError(f"{len(codings)} content codings")
    if response.is_stream_consumed:  # built in memory (a mock transport): httpx has decoded it already
        if len(response.content) > limit:
            raise BodyTooLarge("decoded body over the limit")
        return response.content
    body = _Body([_Inflate(coding, limit) for coding in reversed(codings)], limit)  # the last applied undone first
    async for chunk in response.aiter_raw():
        body.add(chunk)
    return bytes(body.decoded)


class _Body:
    """A body as it arrives, through its content codings' inflaters: bounded as received and once decoded."""

    def __init__(self, layers: list[_Inflate], limit: int) -> None:
        self._layers = layers
        self._limit = limit
        self._received = 0
        self.decoded = bytearray()

    def add(self, chunk: bytes) -> None:
        """Raises BodyTooLarge or BodyEncodingError."""
        self._received += len(chunk)
        if self._received > self._limit:
            raise BodyTooLarge("body over the limit as received")
        for layer in self._layers:
            chunk = layer.feed(chunk)
        self.decoded += chunk
        if len(self.decoded) > self._limit:
            raise BodyTooLarge("decoded body over the limit")


# -- the lookup's own path: one GET on a connection of the pool, parsed by httptools, read within a bound ----------


@dataclass
class Answer:
    """A response read by `PooledTransport.get`: the body decoded, or why it was not (`problem`)."""

    status: int
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value
    body: bytes = b""
    problem: BodyTooLarge | BodyEncodingError | None = None


class _Response:
    """httptools' callbacks for one response: its status and headers, raw body pieces as they are parsed."""

    __slots__ = (
        "complete", "head_done", "headers", "informational", "keep_alive", "more", "parser", "pieces", "status"
    )

    def __init__(self) -> None:
        self.parser: httptools.HttpResponseParser | None = None
        self.status = 0
        self.headers: dict[str, str] = {}  # names lower-cased; a repeated header keeps its last value
        self.head_done = False
        self.informational = False
        self.pieces: list[bytes] = []
        self.complete = False
        self.keep_alive = False
        self.more = False  # bytes came after the response: the connection is not reused

    def on_message_begin(self) -> None:
        if self.complete:
            self.more = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1").strip(" \t")

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None
        status = parser.get_status_code()
        if 100 <= status < 200:  # an informational (1xx) response is read past, as h11 does
            self.informational = True
            self.headers = {}
            return
        self.status = status
        self.head_done = True
        # Asked here: once the message is complete, llhttp has reset what it says for the next one.
        self.keep_alive = parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.pieces.append(body)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
        else:
            self.complete = True


# h11's request-target: visible ASCII, no spaces.
_TARGET = re.compile(rb"[\x21-\x7e]+")


class _LeanConnection:
    """One kept-alive HTTP/1.1 connection for a GET with no body: what a lookup needs, no more.

    The response is parsed by httptools (llhttp, the C parser uvicorn uses): h11's pure-Python parser, its
    events and its state machine were ~70 % of an exchange's CPU. The request's bytes are h11's (`request_head`
    serializes and validates the headers once). llhttp frames the body (Content-Length, chunked); a body
    framed by neither ends with the connection, as RFC 9112 says, which httptools cannot be told: that end is
    seen here.
    """

    def __init__(self, key: tuple[bytes, bytes, int], stream: AsyncioStream, keepalive_expiry: float) -> None:
        self.key = key
        self.stream = stream
        self._keepalive_expiry = keepalive_expiry
        self._expires = float("inf")
        self._reusable = False

    def reusable(self, now: float) -> bool:
        """Idle, not past its keep-alive and not closed (or being closed) by the server."""
        receiver = self.stream.receiver
        return now < self._expires and not receiver.closed and not receiver.buffer

    async def exchange(self, request: bytes, timeouts: dict[str, float | None], limit: int) -> Answer:
        """Sends `request`, reads the answer within `limit` decoded bytes. Raises httpcore's errors."""
        self._reusable = False
        stream = self.stream
        await stream.write(request, timeouts.get("write"))
        read_timeout = timeouts.get("read")
        response = _Response()
        parser = response.parser = httptools.HttpResponseParser(response)
        try:
            answer: Answer | None = None
            body = _Body([], limit)
            head_bytes = 0
            while not response.complete:
                chunk = await stream.read(READ_BYTES, read_timeout)
                if not chunk:
                    if answer is None:
                        raise httpcore.RemoteProtocolError("Server disconnected without sending a response.")
                    if "content-length" in answer.headers or "transfer-encoding" in answer.headers:
                        raise httpcore.RemoteProtocolError("Server disconnected without sending the whole body.")
                    answer.body = bytes(body.decoded)  # framed by the connection's end: all of it arrived
                    return answer
                try:
                    parser.feed_data(chunk)
                except (httptools.HttpParserError, httptools.HttpParserUpgrade) as err:
                    if not response.complete:
                        raise httpcore.RemoteProtocolError(f"invalid response: {err}") from None
                    response.more = True  # garbage after a whole response: the answer stands, the connection goes
                if not response.head_done:
                    head_bytes += len(chunk)
                    if head_bytes > MAX_HEADER_BYTES:
                        raise httpcore.RemoteProtocolError("the response's head is too large")
                    continue
                if answer is None:
                    answer = Answer(response.status, response.headers)
                    try:
                        body = _Body(_layers(answer.headers.get("content-encoding", ""), limit), limit)
                    except BodyEncodingError as err:
                        # Without its traceback: this frame (and the connection's buffers) would be kept by a cycle
                        # (error -> traceback -> frame -> answer -> error) until a full garbage collection.
                        answer.problem = err.with_traceback(None)
                        return answer  # the connection is dropped: its body was not read
                if response.pieces:
                    pieces, response.pieces = response.pieces, []
                    try:
                        for piece in pieces:
                            body.add(piece)
                    except (BodyTooLarge, BodyEncodingError) as err:
                        answer.problem = err.with_traceback(None)  # no cycle through this frame, as above
                        return answer
            assert answer is not None
            answer.body = bytes(body.decoded)
            self._reusable = response.keep_alive and not response.more
            return answer
        finally:
            response.parser = None  # it refers to `response`: no cycle left to the garbage collector

    def done(self, now: float) -> bool:
        """After a whole exchange: whether the connection may carry another request (then it is readied)."""
        if self._reusable:
            self._expires = now + self._keepalive_expiry
            return True
        return False

    def close(self) -> None:
        self.stream.close()


def request_head(headers: list[tuple[bytes, bytes]]) -> bytes:
    """What follows a GET's target in its request: h11's serialization of the request line's end and the headers
    (h11 validates them). Raises httpcore.LocalProtocolError."""
    try:
        data = h11.Connection(h11.CLIENT).send(h11.Request(method="GET", target=b"/", headers=headers))
    except h11.LocalProtocolError as err:
        raise httpcore.LocalProtocolError(str(err)) from None
    assert data is not None and data.startswith(b"GET / ")
    return data[len(b"GET /") :]


def _layers(content_encoding: str, limit: int) -> list[_Inflate]:
    codings = [c.strip().lower() for c in content_encoding.split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if len(codings) > MAX_CONTENT_CODINGS:
        raise BodyEncodingError(f"{len(codings)} content codings")
    return [_Inflate(coding, limit) for coding in reversed(codings)]  # the last applied is undone first
