"""The exporter's HTTP/1.1 server: h11 parses and frames, this module bounds connections, memory and time.

h11 (already installed through httpcore) owns the protocol: request lines, headers, Content-Length and
chunked framing, keep-alive and HTTP/1.0's close. What a sans-IO parser leaves to its caller is here:
- every wait has a deadline: the first byte of a request (keep-alive idle), the rest of the head, the body,
  each write that makes no progress, the whole response and the TLS handshake;
- each connection holds at most `Limits.read_buffer_bytes` unread (reading pauses beyond it; pipelined
  requests wait there, answered one at a time), a head of at most `max_header_bytes` and a body of at most
  `max_body_bytes`; a response is written in `WRITE_CHUNK` pieces, each waiting for the peer to take the last;
- at most `max_connections` are open, TLS handshakes included; at the bound a new connection takes the place
  of the open one that has waited longest without progress (not one whose handler runs), so slow or silent
  clients cannot keep a fresh scraper or a probe out; only when every connection is busy is it refused;
- out of file descriptors, accepting backs off (until a connection closes, at most a second) and says so once
  a minute, not once per attempt.
Each cut-off is counted by reason (`rejected`), for zenmux_exporter_http_requests_rejected_total.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import NoReturn
from urllib.parse import parse_qsl, urlsplit

import h11

from exporter.netio import Receiver

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 1024 * 1024
# Scrapers and probes hold a handful of connections; the bound keeps a flood from exhausting file descriptors
# or memory.
MAX_CONNECTIONS = 256
WRITE_CHUNK = 64 * 1024
_FD_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# Why a request or connection was cut off (label values of zenmux_exporter_http_requests_rejected_total).
REJECT_REASONS = (
    "header_timeout",
    "body_timeout",
    "write_timeout",
    "header_too_large",
    "body_too_large",
    "bad_request",
    "evicted",
    "handshake_timeout",
    "handshake_failed",
)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    # Fault injection for the simulated API: drop the connection instead of answering,
    # or announce more bytes than are sent (a truncated body).
    abort: bool = False
    declared_length: int | None = None


Handler = Callable[[Request], Awaitable[Response]]


def text(status: int, body: str) -> Response:
    return Response(status=status, body=body.encode())


@dataclass(frozen=True)
class Limits:
    """The server's bounds; the defaults suit /metrics and probes (tests shorten the deadlines)."""

    max_connections: int = MAX_CONNECTIONS
    max_header_bytes: int = MAX_HEADER_BYTES
    max_body_bytes: int = MAX_BODY_BYTES
    read_buffer_bytes: int = 64 * 1024
    idle_seconds: float = 30.0  # keep-alive: waiting for the first byte of the next request
    header_seconds: float = 10.0  # from the first byte to the end of the head
    body_seconds: float = 10.0  # from the end of the head to the end of the body
    write_stall_seconds: float = 10.0  # one write the peer does not take
    response_seconds: float = 60.0  # a whole response, against peers that read a byte at a time
    handshake_seconds: float = 10.0
    # asyncio gives each TLS connection a 256 KiB read buffer from its first byte: a flood of handshakes that
    # never finish is held to this many (the stalest is evicted), not to max_connections.
    max_handshakes: int = 64


class _Cut(Exception):
    """Ends a connection; `reason` (when not empty) is counted."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason


class _Connection:
    def __init__(self, task: asyncio.Task[None] | None = None) -> None:
        self.task = task
        self.receiver: Receiver | None = None
        self.progress_at = time.monotonic()
        self.busy = False  # a handler runs: never evicted
        self.handshaking = False


class HttpServer:
    """Serves one handler on host:port (see the module docstring for the bounds)."""

    def __init__(
        self,
        handler: Handler,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | Callable[[], ssl.SSLContext] | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_connections: int = MAX_CONNECTIONS,
        limits: Limits | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """`ssl_context` may be a function, asked on each new connection (so certificates can be reloaded);
        `headers` are added to every response (web config's http_server_config.headers)."""
        self._handler = handler
        self._host = host
        self._port = port
        self._tls = ssl_context
        self._limits = limits or Limits(max_connections=max_connections, max_body_bytes=max_body_bytes)
        self._extra_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
        self.rejected_connections = 0
        self.rejected: Counter[str] = Counter({reason: 0 for reason in REJECT_REASONS})
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._connections: dict[asyncio.Task[None], _Connection] = {}
        self._closed_one = asyncio.Event()
        self._fd_errors = 0
        self._fd_logged_at = -1e9

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    @property
    def max_connections(self) -> int:
        return self._limits.max_connections

    @property
    def port(self) -> int:
        assert self._listener is not None, "server not started"
        return int(self._listener.getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            self._host or None, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, address = infos[0]
        listener = socket.socket(family, kind, proto)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(address)
            listener.listen(1024)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._accepting = asyncio.create_task(self._accept_loop(listener), name=f"http accept {self._host}")

    async def close(self) -> None:
        if self._listener is None:
            return
        assert self._accepting is not None
        self._accepting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._accepting
        self._listener.close()
        self._listener = None
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.05
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as err:
                if err.errno not in _FD_ERRORS:
                    log.debug("accept failed: %s", err)  # a peer that went away before accept (ECONNABORTED)
                    continue
                self._out_of_descriptors(err)
                # Until a connection closes (its descriptor is free again), at most `backoff`.
                self._closed_one.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed_one.wait(), backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            if self._tls is not None:
                handshakes = [c for c in self._connections.values() if c.handshaking]
                if len(handshakes) >= self._limits.max_handshakes:
                    self._evict(handshakes)
            if len(self._connections) >= self._limits.max_connections and not self._evict():
                self.rejected_connections += 1
                if self.rejected_connections == 1 or self.rejected_connections % 1000 == 0:
                    log.warning("%d connections refused: %d open at once, all busy", self.rejected_connections,
                                self._limits.max_connections)
                sock.close()
                continue
            connection = _Connection()
            connection.handshaking = self._tls is not None
            task = asyncio.create_task(self._serve(sock, connection))
            connection.task = task
            self._connections[task] = connection

    def _out_of_descriptors(self, err: OSError) -> None:
        self._fd_errors += 1
        now = time.monotonic()
        if now - self._fd_logged_at >= 60.0:
            self._fd_logged_at = now
            log.error("cannot accept connections: %s (%d times so far); backing off until one closes",
                      err.strerror or err, self._fd_errors)

    def _evict(self, among: list[_Connection] | None = None) -> bool:
        """Closes the connection that has waited longest without progress and runs no handler."""
        idle = [c for c in (self._connections.values() if among is None else among) if not c.busy]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.progress_at)
        assert victim.task is not None
        del self._connections[victim.task]
        self.rejected["evicted"] += 1
        victim.task.cancel()
        return True

    async def _serve(self, sock: socket.socket, connection: _Connection) -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        limits = self._limits
        receiver = Receiver(loop, limits.read_buffer_bytes)
        connection.receiver = receiver
        graceful = False
        try:
            tls = self._tls() if callable(self._tls) else self._tls
            try:
                transport, _ = await loop.connect_accepted_socket(
                    lambda: receiver, sock, ssl=tls, ssl_handshake_timeout=limits.handshake_seconds if tls else None
                )
            except (ConnectionAbortedError, TimeoutError):
                raise _Cut("handshake_timeout" if tls else "") from None
            except (OSError, ssl.SSLError):
                raise _Cut("handshake_failed" if tls else "") from None
            assert isinstance(transport, asyncio.Transport)
            connection.handshaking = False
            receiver.transport = transport
            transport.set_write_buffer_limits(high=WRITE_CHUNK)
            connection.progress_at = time.monotonic()
            await self._exchange(h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes),
                                 receiver, connection)
            graceful = True
        except _Cut as cut:
            graceful = not cut.reason
            if cut.reason:
                self.rejected[cut.reason] += 1
        except (ConnectionError, ssl.SSLError, asyncio.CancelledError):
            pass
        except Exception:  # a bug here must cost one connection, not the server
            log.exception("HTTP connection failed")
        finally:
            try:
                await self._close(receiver, sock, graceful)
            finally:
                self._connections.pop(task, None)
                self._closed_one.set()

    async def _close(self, receiver: Receiver, sock: socket.socket, graceful: bool) -> None:
        """Flushes what is written (a peer that does not take it within the write deadline is cut), or cuts."""
        transport = receiver.transport
        if transport is None:
            sock.close()
            return
        if not graceful:
            transport.abort()
            return
        transport.close()
        try:
            await asyncio.wait_for(asyncio.shield(receiver.lost), self._limits.write_stall_seconds)
        except (TimeoutError, asyncio.CancelledError):
            transport.abort()

    async def _exchange(self, conn: h11.Connection, receiver: Receiver, connection: _Connection) -> None:
        """Requests and responses until the connection must close."""
        limits = self._limits
        while True:
            try:
                request = await self._read_request(conn, receiver, connection)
            except h11.RemoteProtocolError as err:
                status = err.error_status_hint
                await self._reject(conn, receiver, status, "header_too_large" if status == 431 else "bad_request")
            if request is None:
                return
            connection.busy = True
            try:
                response = await self._handler(request)
            except Exception:
                log.exception("handler failed for %s %s", request.method, request.path)
                response = text(500, "internal error\n")
            finally:
                connection.busy = False
            if response.abort:
                raise _Cut()
            try:
                async with asyncio.timeout(limits.response_seconds):
                    await self._respond(conn, receiver, connection, response)
            except TimeoutError:
                raise _Cut("write_timeout") from None
            if response.declared_length is not None or conn.our_state is h11.MUST_CLOSE:
                raise _Cut()
            conn.start_next_cycle()

    async def _read_request(
        self, conn: h11.Connection, receiver: Receiver, connection: _Connection
    ) -> Request | None:
        limits = self._limits
        head: h11.Request | None = None
        body = bytearray()
        started: float | None = None  # first byte of this request
        fed = len(conn.trailing_data[0])  # bytes of this request (and any pipelined after it) h11 was given
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                now = time.monotonic()
                if receiver.buffer and started is None:
                    started = now
                if head is not None:
                    assert started is not None
                    deadline, reason = started + limits.header_seconds + limits.body_seconds, "body_timeout"
                elif started is not None:
                    deadline, reason = started + limits.header_seconds, "header_timeout"
                else:
                    deadline, reason = now + limits.idle_seconds, ""
                if not await receiver.readable(deadline - now):
                    raise _Cut(reason)
                if started is None:
                    started = time.monotonic()
                data = receiver.take(limits.read_buffer_bytes)
                connection.progress_at = time.monotonic()
                if not data and receiver.error is not None:
                    raise _Cut()
                fed += len(data)
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                head = event
                # h11 bounds only a head still incomplete; one that arrived whole in a read is measured here.
                if fed - len(conn.trailing_data[0]) > limits.max_header_bytes:
                    await self._reject(conn, receiver, 431, "header_too_large")
                names = {name for name, _ in event.headers}
                if b"content-length" in names and b"transfer-encoding" in names:
                    # RFC 9112 6.3: a request smuggling shape; h11 would frame by chunked and go on.
                    await self._reject(conn, receiver, 400, "bad_request")
                declared = dict(event.headers).get(b"content-length", b"0")
                if len(declared) > 12 or int(declared) > limits.max_body_bytes:  # h11 checked it is digits
                    await self._reject(conn, receiver, 413, "body_too_large")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > limits.max_body_bytes:
                    await self._reject(conn, receiver, 413, "body_too_large")
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return _request(head, bytes(body))
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None

    async def _reject(self, conn: h11.Connection, receiver: Receiver, status: int, reason: str) -> NoReturn:
        """Answers `status` (when h11 still allows an answer) and ends the connection; counted by `reason`."""
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with contextlib.suppress(h11.LocalProtocolError):
                phrase = HTTPStatus(status).phrase
                data = conn.send(h11.Response(
                    status_code=status,
                    headers=[(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close"),
                             (b"content-length", str(len(phrase) + 1).encode())],
                    reason=phrase.encode(),
                ))
                assert data is not None
                await self._write(receiver, data + phrase.encode() + b"\n")
        raise _Cut(reason)

    async def _respond(
        self, conn: h11.Connection, receiver: Receiver, connection: _Connection, response: Response
    ) -> None:
        length = response.declared_length if response.declared_length is not None else len(response.body)
        headers = [
            (b"content-type", response.content_type.encode("latin-1")),
            (b"content-length", str(length).encode()),
            *self._extra_headers,
            *((k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()),
        ]
        status = response.status
        reason = HTTPStatus(status).phrase.encode() if status in HTTPStatus._value2member_map_ else b""
        head = conn.send(h11.Response(status_code=status, headers=headers, reason=reason))
        assert head is not None
        await self._write(receiver, head)
        connection.progress_at = time.monotonic()
        if conn.our_state is h11.SEND_BODY:  # not for HEAD, 204 or 304
            body = memoryview(response.body)
            for offset in range(0, len(body), WRITE_CHUNK):
                chunk = body[offset: offset + WRITE_CHUNK]
                if response.declared_length is not None:
                    await self._write(receiver, chunk)  # h11 would refuse to send a short body
                else:
                    # Passed through without a copy (a 59 MB identity body is not copied twice).
                    for piece in conn.send_with_data_passthrough(h11.Data(data=chunk)) or ():  # type: ignore[arg-type]
                        await self._write(receiver, piece)
                connection.progress_at = time.monotonic()
        if response.declared_length is None:
            data = conn.send(h11.EndOfMessage())
            assert data is not None
            await self._write(receiver, data)

    async def _write(self, receiver: Receiver, data: bytes | memoryview) -> None:
        transport = receiver.transport
        if transport is None or transport.is_closing() or receiver.error is not None:
            raise _Cut()
        transport.write(data)
        if not await receiver.writable(self._limits.write_stall_seconds):
            raise _Cut("write_timeout")
        if receiver.error is not None:
            raise _Cut()


def _request(head: h11.Request, body: bytes) -> Request:
    headers: dict[str, str] = {}
    for name, value in head.headers:
        key = name.decode("latin-1")  # h11 gives names lower-cased
        text_value = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text_value}" if key in headers else text_value
    url = urlsplit(head.target.decode("latin-1"))
    return Request(head.method.decode("latin-1"), url.path, dict(parse_qsl(url.query)), headers, body)
