"""Receives ids as UDP datagrams (one id or JSON object a line); never blocks, counts what it drops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from exporter.config import UdpSourceConfig, split_host_port
from exporter.ids import DATAGRAM_TOO_LARGE, LinesParser, Sighting
from exporter.ingest import Ingest
from exporter.store import StateError
from exporter.telemetry import SelfMetrics

log = logging.getLogger(__name__)

FLUSH_INTERVAL_SECONDS = 0.05
FLUSH_BATCH = 5000
STATE_RETRY_SECONDS = 1.0


class UdpSource:
    """Parses datagrams as they arrive into a bounded buffer; a flusher writes the buffer to the queue.

    The buffer is the durability boundary of UDP: ids in it for up to FLUSH_INTERVAL_SECONDS are lost
    if the process dies, like datagrams in flight.

    The socket is drained in batches (up to READS_PER_WAKEUP datagrams), not read one datagram per event
    loop iteration as asyncio's datagram transport does: at tens of thousands of datagrams a second, the
    loop iteration, not the id, was the cost. While datagrams keep coming it is read on a timer (every
    POLL_SECONDS), not on each readiness event; idle, it waits for readiness. The datagrams of one batch
    are parsed together, as one buffer of lines: parsing them one by one cost as much as receiving them.
    """

    READS_PER_WAKEUP = 256
    POLL_SECONDS = 0.001

    def __init__(self, config: UdpSourceConfig, parse: LinesParser, ingest: Ingest, metrics: SelfMetrics) -> None:
        self.name = config.name
        self._config = config
        self._parse = parse
        self._ingest = ingest
        self._buffer: list[Sighting | str] = []
        self._buffered_ids = 0
        self._datagrams = metrics.udp_datagrams.labels(self.name)
        self._dropped = metrics.udp_dropped.labels(self.name)
        self._sock: socket.socket | None = None
        self._next_poll: asyncio.Handle | None = None
        self._has_data = asyncio.Event()
        self._batch_full = asyncio.Event()
        self._failing = False
        self.port = 0

    async def start(self) -> None:
        host, port = split_host_port(self._config.listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._config.receive_buffer_bytes)
            sock.bind((host, port))
        except OSError as err:
            sock.close()
            # Which source and which address: "Address already in use" alone does not say.
            raise OSError(
                err.errno, f"source {self.name}: cannot listen on udp {self._config.listen}: {err.strerror or err}"
            ) from None
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._sock = sock
        self._wait_readable()
        log.info("%s: listening for ids on udp %s:%d", self.name, host, self.port)

    def _wait_readable(self) -> None:
        assert self._sock is not None
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._readable)

    def _readable(self) -> None:
        """Datagrams arrive: from now on the socket is read every POLL_SECONDS while it has any, not on each
        readiness event. Woken per event, the loop woke for every few datagrams, and each wakeup cost more
        CPU than the datagrams it read; the kernel's buffer holds a poll interval's datagrams many times over."""
        assert self._sock is not None
        asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._poll()

    def _poll(self) -> None:
        self._next_poll = None
        if self._sock is None:
            return
        received = 0
        try:
            received = self._read_ready()
        finally:  # whatever happened, the socket stays watched (an error propagates to the loop's handler)
            loop = asyncio.get_running_loop()
            if received == self.READS_PER_WAKEUP:
                self._next_poll = loop.call_soon(self._poll)  # a backlog: the rest after the loop's other work
            elif received:
                self._next_poll = loop.call_later(self.POLL_SECONDS, self._poll)
            else:
                self._wait_readable()  # idle: no wakeups until the next datagram

    def stop_receiving(self) -> None:
        if self._next_poll is not None:
            self._next_poll.cancel()
            self._next_poll = None
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            # What the kernel already holds was sent before we stopped: take it (the buffer's bound applies).
            while self._read_ready() == self.READS_PER_WAKEUP:
                pass
            self._sock.close()
            self._sock = None

    def _read_ready(self) -> int:
        """Reads what the socket holds (bounded, so lookups and scrapes still get their turn); how many."""
        if self._sock is None:
            return 0
        # One byte over the limit is enough to tell an oversized datagram (it is truncated, then rejected).
        recv, size = self._sock.recv, self._config.max_datagram_bytes + 1
        batch: list[bytes] = []
        append = batch.append
        try:
            for _ in range(self.READS_PER_WAKEUP):
                append(recv(size))
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as err:
            log.warning("%s: receiving from the udp socket failed: %s", self.name, err)
        if batch:
            self._datagrams.inc(len(batch))
            self._receive(batch)
        return len(batch)

    def _receive(self, batch: list[bytes]) -> None:
        """Parses a batch of datagrams into the buffer: joined by newlines and parsed as one buffer of lines
        (one pass for the whole batch) when none is oversized and even one id a line keeps the buffer under its
        bound; otherwise one datagram at a time, each dropped whole once the buffer is full."""
        config = self._config
        data = b"\n".join(batch)
        if (
            max(map(len, batch)) <= config.max_datagram_bytes
            and self._buffered_ids + data.count(b"\n") + 1 < config.max_buffered_ids
        ):
            parsed = self._parse(data + b"\n")
        else:
            parsed = []
            for datagram in batch:
                if self._buffered_ids + len(parsed) >= config.max_buffered_ids:
                    self._dropped.inc()
                elif len(datagram) > config.max_datagram_bytes:
                    parsed.append(DATAGRAM_TOO_LARGE)
                else:
                    parsed.extend(self._parse(datagram))
        if not parsed:
            return
        self._buffer.extend(parsed)
        self._buffered_ids += len(parsed)
        self._has_data.set()
        if self._buffered_ids >= FLUSH_BATCH:
            self._batch_full.set()

    async def flush(self) -> bool:
        """Writes the buffer to the queue; False if the state could not be written (the buffer is kept)."""
        if not self._buffer:
            return True
        batch, self._buffer, self._buffered_ids = self._buffer, [], 0
        try:
            await self._ingest.submit(self.name, batch)
        except StateError as err:
            # Kept for the next try; meanwhile the buffer's bound drops (and counts) what does not fit.
            self._buffer = batch + self._buffer
            self._buffered_ids += len(batch)
            if not self._failing and not err.reported:
                log.error("%s: %s; holding %d ids in memory and retrying", self.name, err, len(self._buffer))
            self._failing = True
            return False
        if self._failing:
            log.info("%s: the state database accepts ids again", self.name)
            self._failing = False
        return True

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
                if not await self.flush():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), STATE_RETRY_SECONDS)
                    self._has_data.set()  # try again even if nothing new arrives
            stopping.cancel()
        finally:
            self.stop_receiving()
            if not await self.flush():
                log.error("%s: %d received ids could not be saved before stopping", self.name, len(self._buffer))
