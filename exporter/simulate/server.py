"""The simulated API's HTTP edge: the standard library's http.server, so lookups are tested against a peer we
did not write (the exporter's own server is h11 behind exporter/web.py; the client is httpcore's h11).

Each connection gets a thread (ThreadingHTTPServer); a request is handed to the async handler on the event
loop that called `serve_threaded` and the thread waits for its Response. `exporter.web.Request`/`Response`
are the interface, so the handler neither knows nor cares which server runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import socket
import struct
import threading
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from exporter.web import Handler, Request, Response

MAX_BODY_BYTES = 1024 * 1024
# A handler that has not answered in this long (the loop is gone, or a test hangs) gets a 503.
ANSWER_TIMEOUT_SECONDS = 120.0


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # socketserver's default backlog is 5: a burst of new connections from a test's client pool overflows it.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], handler: Handler, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(address, _RequestHandler)
        self.handler = handler
        self.loop = loop
        self.open: set[socket.socket] = set()
        self.lock = threading.Lock()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away mid-answer (a lookup timed out) is routine here, not a traceback."""


class _RequestHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.open.add(self.connection)

    def finish(self) -> None:
        with self.server.lock:
            self.server.open.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the simulator's stats endpoint counts requests."""

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.send_error(413)
            return
        body = self.rfile.read(length) if length else b""
        url = urlsplit(self.path)
        request = Request(
            self.command, url.path, dict(parse_qsl(url.query)), {k.lower(): v for k, v in self.headers.items()}, body
        )
        handler = self.server.handler

        async def answer() -> Response:
            return await handler(request)

        try:
            response = asyncio.run_coroutine_threadsafe(answer(), self.server.loop).result(ANSWER_TIMEOUT_SECONDS)
        except Exception:
            response = Response(503, b"simulator unavailable\n")
        if response.abort:
            # A reset, not a close: SO_LINGER 0 makes the close send RST.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        length = response.declared_length if response.declared_length is not None else len(response.body)
        self.send_header("Content-Length", str(length))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)
        if response.declared_length is not None:
            self.close_connection = True  # a truncated body: the promise is broken by hanging up


class ThreadedServer:
    """A running simulator server: `.port`, and `close()` (which also cuts kept-alive connections)."""

    def __init__(self, server: _Server) -> None:
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    async def close(self) -> None:
        await asyncio.to_thread(self._server.shutdown)
        self._server.server_close()
        with self._server.lock:
            connections = list(self._server.open)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


async def serve_threaded(handler: Handler, host: str, port: int) -> ThreadedServer:
    server = _Server((host, port), handler, asyncio.get_running_loop())
    return ThreadedServer(server)
