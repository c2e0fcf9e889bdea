"""Receives ids as UDP datagrams (one id or JSON object a line); never blocks, counts what it drops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from exporter.config import SourceConfig, split_host_port
from exporter.ids import LineParser, Sighting, parse_datagram
from exporter.ingest import Ingest
from exporter.telemetry import SelfMetrics

log = logging.getLogger(__name__)

FLUSH_INTERVAL_SECONDS = 0.05
FLUSH_BATCH = 5000


class UdpSource(asyncio.DatagramProtocol):
    """Parses datagrams as they arrive into a bounded buffer; a flusher writes the buffer to the queue.

    The buffer is the durability boundary of UDP: ids in it for up to FLUSH_INTERVAL_SECONDS are lost
    if the process dies, like datagrams in flight.
    """

    def __init__(self, config: SourceConfig, parse: LineParser, ingest: Ingest, metrics: SelfMetrics) -> None:
        self.name = config.name
        self._config = config
        self._parse = parse
        self._ingest = ingest
        self._buffer: list[Sighting | str] = []
        self._buffered_ids = 0
        self._datagrams = metrics.udp_datagrams.labels(self.name)
        self._dropped = metrics.udp_dropped.labels(self.name)
        self._transport: asyncio.DatagramTransport | None = None
        self._has_data = asyncio.Event()
        self._batch_full = asyncio.Event()
        self.port = 0

    async def start(self) -> None:
        host, port = split_host_port(self._config.listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._config.receive_buffer_bytes)
        sock.bind((host, port))
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(lambda: self, sock=sock)
        self._transport = transport
        log.info("%s: listening for ids on udp %s:%d", self.name, host, self.port)

    def stop_receiving(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self._datagrams.inc()
        if self._buffered_ids >= self._config.max_buffered_ids:
            self._dropped.inc()
            return
        parsed = parse_datagram(data, self._parse, self._config.max_datagram_bytes)
        self._buffer.extend(parsed)
        self._buffered_ids += len(parsed)
        self._has_data.set()
        if self._buffered_ids >= FLUSH_BATCH:
            self._batch_full.set()

    def flush(self) -> None:
        if self._buffer:
            batch, self._buffer, self._buffered_ids = self._buffer, [], 0
            self._ingest.submit(self.name, batch)

    async def serve(self, stop: asyncio.Event) -> None:
        """Flushes received ids to the queue until `stop`; then closes the socket and flushes the rest."""
        try:
            stopping = asyncio.ensure_future(stop.wait())
            while not stop.is_set():
                # Idle costs nothing: wait for data, then gather a batch for one transaction.
                arrived = asyncio.ensure_future(self._has_data.wait())
                await asyncio.wait([arrived, stopping], return_when=asyncio.FIRST_COMPLETED)
                arrived.cancel()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._batch_full.wait(), FLUSH_INTERVAL_SECONDS)
                self._has_data.clear()
                self._batch_full.clear()
                self.flush()
            stopping.cancel()
        finally:
            self.stop_receiving()
            self.flush()
