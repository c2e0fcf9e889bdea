"""One asyncio protocol both HTTP sides read and write through: a bounded receive buffer and write back-pressure."""

from __future__ import annotations

import asyncio


class Receiver(asyncio.Protocol):
    """Buffers what the peer sends (reading pauses past `high_water` bytes) and wakes the one reader waiting."""

    def __init__(self, loop: asyncio.AbstractEventLoop, high_water: int) -> None:
        self.loop = loop
        self.high_water = high_water
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False
        self.error: BaseException | None = None
        self.reading_paused = False
        self._readable: asyncio.Future[bool] | None = None
        self._writable: asyncio.Future[bool] | None = None
        self.lost: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > self.high_water and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()
        _resolve(self._readable, True)

    def eof_received(self) -> bool:
        self.closed = True
        _resolve(self._readable, True)
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.error = exc
        _resolve(self._readable, True)
        _resolve(self._writable, True)
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        self._writable = self.loop.create_future()

    def resume_writing(self) -> None:
        _resolve(self._writable, True)
        self._writable = None

    def take(self, max_bytes: int) -> bytes:
        """Up to `max_bytes` of what has arrived; reading resumes once the buffer is below a quarter of the mark."""
        buffer = self.buffer
        data = bytes(buffer[:max_bytes])
        del buffer[:max_bytes]
        if self.reading_paused and len(buffer) < self.high_water // 4 and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()
        return data

    async def readable(self, seconds: float | None) -> bool:
        """Waits for data or the end of the connection; False if `seconds` passed first."""
        if self.buffer or self.closed:
            return True
        waiter: asyncio.Future[bool] = self.loop.create_future()
        self._readable = waiter
        timer = None if seconds is None else self.loop.call_later(max(seconds, 0.0), _resolve, waiter, False)
        try:
            return await waiter
        finally:
            self._readable = None
            if timer is not None:
                timer.cancel()

    async def writable(self, seconds: float | None) -> bool:
        """Waits until the transport takes more data (it asked us to pause); False if `seconds` passed first."""
        waiter = self._writable
        if waiter is None or waiter.done():
            return True
        timer = None if seconds is None else self.loop.call_later(max(seconds, 0.0), _resolve, waiter, False)
        try:
            return await asyncio.shield(waiter)
        finally:
            if timer is not None:
                timer.cancel()


def _resolve(waiter: asyncio.Future[bool] | None, value: bool) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(value)
