"""A small asyncio HTTP/1.1 server: enough for /metrics, the probes and the simulated API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qsl, urlsplit

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 1024 * 1024
# Scrapers and probes hold a handful of connections; beyond this, new ones are closed at once so a flood
# of idle connections cannot exhaust file descriptors or memory.
MAX_CONNECTIONS = 256
IDLE_TIMEOUT_SECONDS = 30.0
MAX_LENGTH_DIGITS = 12


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


class HttpServer:
    """Serves one handler on host:port; keep-alive, bounded headers and bodies."""

    def __init__(
        self,
        handler: Handler,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._handler = handler
        self._host = host
        self._port = port
        self._ssl = ssl_context
        self._max_body = max_body_bytes
        self._max_connections = max_connections
        self.rejected_connections = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    @property
    def max_connections(self) -> int:
        return self._max_connections

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self._host, self._port, ssl=self._ssl, limit=MAX_HEADER_BYTES
        )

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self._max_connections:
            self.rejected_connections += 1
            if self.rejected_connections == 1 or self.rejected_connections % 1000 == 0:
                log.warning("%d connections refused: more than %d open at once", self.rejected_connections,
                            self._max_connections)
            writer.close()
            return
        self._connections.add(task)
        try:
            while True:
                request = await self._read_request(reader, writer)
                if request is None:
                    return
                try:
                    response = await self._handler(request)
                except Exception:
                    log.exception("handler failed for %s %s", request.method, request.path)
                    response = text(500, "internal error\n")
                if response.abort:
                    writer.transport.abort()
                    return
                keep_alive = request.header("connection").lower() != "close"
                await self._write(writer, response, keep_alive, head_only=request.method == "HEAD")
                if not keep_alive or response.declared_length is not None:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError):
            return
        except asyncio.CancelledError:
            return
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Request | None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT_SECONDS)
        except (asyncio.LimitOverrunError, ValueError):
            await self._write(writer, text(431, "request header too large\n"), False)
            return None
        except asyncio.IncompleteReadError:
            return None
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            await self._write(writer, text(400, "bad request line\n"), False)
            return None
        method, target, _version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                await self._write(writer, text(400, "bad header\n"), False)
                return None
            headers[name.strip().lower()] = value.strip()
        declared = headers.get("content-length", "0")
        # isdigit() alone admits '²' and other digits int() refuses; int() refuses over 4300 digits.
        if not (declared.isascii() and declared.isdigit()):
            await self._write(writer, text(400, "bad content-length\n"), False)
            return None
        length = int(declared) if len(declared) <= MAX_LENGTH_DIGITS else self._max_body + 1
        if length > self._max_body:
            await self._write(writer, text(413, "body too large\n"), False)
            return None
        body = await reader.readexactly(length) if length else b""
        url = urlsplit(target)
        return Request(method, url.path, dict(parse_qsl(url.query)), headers, body)

    @staticmethod
    async def _write(
        writer: asyncio.StreamWriter, response: Response, keep_alive: bool, *, head_only: bool = False
    ) -> None:
        reason = HTTPStatus(response.status).phrase if response.status in HTTPStatus._value2member_map_ else ""
        length = response.declared_length if response.declared_length is not None else len(response.body)
        head = [
            f"HTTP/1.1 {response.status} {reason}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {length}",
            f"Connection: {'keep-alive' if keep_alive else 'close'}",
        ]
        head += [f"{k}: {v}" for k, v in response.headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        if not head_only:
            writer.write(response.body)
        await writer.drain()
