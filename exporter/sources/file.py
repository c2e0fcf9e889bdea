"""Tails a log file: follows rename+create and copytruncate rotation, resumes from its persisted position."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from exporter.config import SourceConfig
from exporter.ids import LINE_TOO_LONG, LinesParser
from exporter.ingest import Ingest
from exporter.store import FilePosition, StateError, Store
from exporter.telemetry import SelfMetrics

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
CHUNKS_PER_POLL = 8
ROTATION_GRACE_POLLS = 4
FINGERPRINT_BYTES = 256
STATE_RETRY_SECONDS = 1.0
# A file with nothing new is polled less and less often, down to this many times less than the configured
# interval: every wakeup of an idle sidecar costs CPU (~0.7 ms each on a small VM), while ids wait out a
# billing delay of minutes anyway. The first line written resets the interval.
QUIET_BACKOFF = 4
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")


def head_fingerprint(handle: BinaryIO, length: int) -> bytes:
    """Identifies a file by its first bytes, so a reused inode or a truncated-and-refilled file is noticed."""
    handle.seek(0)
    head = handle.read(min(length, FINGERPRINT_BYTES))
    return len(head).to_bytes(2, "big") + hashlib.sha256(head).digest()[:16]


EMPTY_FINGERPRINT = (0).to_bytes(2, "big") + hashlib.sha256(b"").digest()[:16]


def matches(handle: BinaryIO, position: FilePosition) -> bool:
    length = int.from_bytes(position.fingerprint[:2], "big")
    return head_fingerprint(handle, length) == position.fingerprint


@dataclass
class _Open:
    handle: BinaryIO
    device: int
    inode: int
    offset: int  # end of the last complete line consumed
    fingerprint: bytes = EMPTY_FINGERPRINT  # of the head as last saved


class FileSource:
    """Reads new lines from one file path, in chunks, and hands them to the ingest with the new position.

    The position is saved in the same transaction as the ids it covers, so after a crash the file is read
    again from exactly the first line whose ids are not in the queue.
    """

    def __init__(
        self, config: SourceConfig, parse: LinesParser, ingest: Ingest, state: Store, metrics: SelfMetrics
    ) -> None:
        self.name = config.name
        self._path = Path(config.path)
        self._config = config
        self._parse = parse
        self._ingest = ingest
        self._state = state
        self._metrics = metrics
        self._current: _Open | None = None
        self._skipping = False  # inside an overlong line, discarding until its newline
        self._rotated_size, self._rotated_quiet_polls = -1, 0  # the renamed-away file, while it settles
        # (size, mtime, ctime) of the file at the path when it was last read as far as it goes.
        self._read_up_to: tuple[int, int, int] | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Polls until `stop`, then reads what the writer left before closing (open_initial() comes first)."""
        base = self._config.poll_interval_seconds
        interval = base
        while not stop.is_set():
            before = self._progress()
            try:
                busy = await self.poll()
            except StateError as err:
                await self._recover(stop, err)
                continue
            if busy:
                await asyncio.sleep(0)  # let lookups and scrapes run between large chunks
                continue
            interval = base if self._progress() != before else min(interval * 2, base * QUIET_BACKOFF)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
        with contextlib.suppress(StateError):  # unsaved lines are read again at the next start
            while await self.poll():  # what the writer left before we were stopped
                pass
        self.close()

    async def _recover(self, stop: asyncio.Event, err: StateError) -> None:
        """A state write failed (disk full, read-only): none of it was saved, so after a pause the file is
        read again from the last saved position (ids already queued are deduplicated)."""
        if err.operation == "position":  # the ingest counted its own (enqueue)
            self._metrics.state_errors.labels("position").inc()
        log.error("%s: cannot save to the state database (%s); re-reading from the last saved position", self.name,
                  err)
        self.close()
        self._skipping = False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), STATE_RETRY_SECONDS)
        try:
            if await self._state.position(self.name) is not None:
                await self.open_initial()
            # Nothing saved yet: the file appeared after start-up, and poll() reads it from the beginning.
        except StateError:
            self.close()

    def _progress(self) -> tuple[int, int] | None:
        """Which file is read and how far: a poll that changes neither found nothing new."""
        return None if self._current is None else (self._current.inode, self._current.offset)

    def close(self) -> None:
        self._read_up_to = None
        if self._current is not None:
            self._current.handle.close()
            self._current = None

    async def open_initial(self) -> None:
        """Resumes from the saved position, finishing a file rotated away while we were not running."""
        saved = await self._state.position(self.name)
        stat = _stat(self._path)
        if saved is None:
            if stat is not None:
                start = _end_of_last_line(self._path, stat.st_size) if self._config.start_at == "end" else 0
                await self._switch_to(start)
            return
        if stat is not None and (stat.st_dev, stat.st_ino) == (saved.device, saved.inode):
            handle = self._path.open("rb")
            if stat.st_size >= saved.offset and matches(handle, saved):
                self._current = _Open(handle, saved.device, saved.inode, saved.offset, saved.fingerprint)
                return
            handle.close()
            log.info("%s: %s was truncated while we were stopped; reading it from the start", self.name, self._path)
            await self._switch_to(0)
            return
        rotated = self._find_rotated(saved)
        if rotated is not None:
            log.info("%s: finishing %s, rotated while the exporter was stopped", self.name, rotated)
            handle = rotated.open("rb")
            self._current = _Open(handle, saved.device, saved.inode, saved.offset, saved.fingerprint)
            await self._read_available(final=True)
            handle.close()
            self._current = None
        else:
            log.warning(
                "%s: the file last read up to byte %d (inode %d) is no longer beside %s (moved elsewhere or "
                "compressed?): whatever it held after that byte was not read",
                self.name,
                saved.offset,
                saved.inode,
                self._path,
            )
        if stat is not None:
            await self._switch_to(0)

    def _find_rotated(self, saved: FilePosition) -> Path | None:
        try:
            siblings = list(self._path.parent.iterdir())
        except OSError:
            return None
        for candidate in siblings:
            if not candidate.name.startswith(self._path.name) or candidate == self._path:
                continue
            if candidate.name.endswith(COMPRESSED_SUFFIXES):
                continue
            stat = _stat(candidate)
            if stat is None or (stat.st_dev, stat.st_ino) != (saved.device, saved.inode):
                continue
            with candidate.open("rb") as handle:
                if matches(handle, saved):
                    return candidate
        return None

    async def _switch_to(self, offset: int) -> None:
        """Opens the file now at the path, at `offset`, and records the position (even with no ids yet)."""
        self.close()  # forgets what was read, too
        try:
            handle = self._path.open("rb")
        except OSError:
            return
        stat = os.fstat(handle.fileno())
        self._current = _Open(handle, stat.st_dev, stat.st_ino, min(offset, stat.st_size))
        self._skipping = False
        self._rotated_size, self._rotated_quiet_polls = -1, 0
        await self._state.save_position(self.name, self._position())

    def _position(self) -> FilePosition:
        assert self._current is not None
        current = self._current
        current.fingerprint = head_fingerprint(current.handle, current.offset)
        return FilePosition(current.device, current.inode, current.offset, current.fingerprint)

    async def poll(self) -> bool:
        """Follows rotation, then reads what is new; True when it stopped early with more to read."""
        if self._ingest.full:
            return False  # backpressure: the file keeps the ids until the queue has room
        if self._current is None:
            if _stat(self._path) is None:
                return False
            await self._switch_to(0)  # the file appeared after we started: all of it is new
            if self._current is None:
                return False
        current = self._current
        stat = _stat(self._path)
        seen = None if stat is None else (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        if stat is not None and (stat.st_dev, stat.st_ino) != (current.device, current.inode):
            # Renamed away and a new file created. The writer may append to the old file until it reopens
            # its log, so the old file is read on until it has stayed unchanged for a few polls.
            busy = await self._read_available(final=False)
            if busy or not self._rotated_file_settled(current):
                return busy
            await self._read_available(final=True)  # only a last line without newline can be left
            self._metrics.file_rotations.labels(self.name, "rename").inc()
            await self._switch_to(0)
        else:
            if seen is not None and seen == self._read_up_to:
                return False  # unchanged since it was read to the end: no read, no fingerprint (idle polls)
            if self._truncated(current):
                # Copied and truncated, perhaps already refilled past our offset: start over from the beginning.
                self._metrics.file_rotations.labels(self.name, "truncate").inc()
                await self._switch_to(0)
        busy = await self._read_available(final=False)
        if self._current is not None:
            size = os.fstat(self._current.handle.fileno()).st_size
            self._metrics.file_read_bytes.labels(self.name).set(self._current.offset)
            self._metrics.file_size_bytes.labels(self.name).set(size)
            if not busy and not self._ingest.full and seen is not None and seen[0] == size:
                self._read_up_to = seen
        return busy

    def _rotated_file_settled(self, current: _Open) -> bool:
        size = os.fstat(current.handle.fileno()).st_size
        if size != self._rotated_size:
            self._rotated_size, self._rotated_quiet_polls = size, 0
            return False
        self._rotated_quiet_polls += 1
        return self._rotated_quiet_polls >= ROTATION_GRACE_POLLS

    def _truncated(self, current: _Open) -> bool:
        if os.fstat(current.handle.fileno()).st_size < current.offset:
            return True
        length = int.from_bytes(current.fingerprint[:2], "big")
        return head_fingerprint(current.handle, length) != current.fingerprint

    async def _read_available(self, *, final: bool) -> bool:
        """Consumes complete lines (and, when final, a last line without newline); True if the budget ran out.

        A final read (the file was rotated away) has no budget: it must reach the end before we switch.
        """
        current = self._current
        assert current is not None
        chunks = 0
        while final or chunks < CHUNKS_PER_POLL:
            if not final and self._ingest.full:
                return False  # backpressure: the ids stay in the file until the queue has room
            chunks += 1
            current.handle.seek(current.offset)
            chunk = current.handle.read(CHUNK_BYTES)
            if not chunk:
                return False
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                await self._consume(chunk[: cut + 1], cut + 1)
            elif final:
                await self._consume(chunk, len(chunk))
            elif len(chunk) == CHUNK_BYTES or len(chunk) > self._config.max_line_bytes:
                await self._reject_overlong(len(chunk))
            else:
                return False  # a partial line: wait for the rest
        return True

    async def _reject_overlong(self, consumed: int) -> None:
        assert self._current is not None
        if not self._skipping:
            self._metrics.ids_rejected.labels(self.name, LINE_TOO_LONG).inc()
        self._skipping = True
        self._current.offset += consumed
        await self._state.save_position(self.name, self._position())

    async def _consume(self, data: bytes, length: int) -> None:
        assert self._current is not None
        if self._skipping:
            self._skipping = False
            cut = data.find(b"\n")  # what precedes it is the tail of an overlong line, already counted
            data = data[cut + 1 :] if cut >= 0 else b""
        parsed = self._parse(data) if data else []
        self._current.offset += length
        await self._ingest.submit(self.name, parsed, self._position(), bounded=False)


def _end_of_last_line(path: Path, size: int) -> int:
    """Where "start at the end" starts: after the last complete line, so a line being written is read whole."""
    with path.open("rb") as handle:
        handle.seek(max(size - CHUNK_BYTES, 0))
        tail = handle.read(min(size, CHUNK_BYTES))
    cut = tail.rfind(b"\n")
    return size if cut < 0 else size - len(tail) + cut + 1


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None
