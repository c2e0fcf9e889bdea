"""Tails a log file: follows rename+create and copytruncate rotation (a truncated file's unread tail is read from
its rotated copy), resumes from its persisted position."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from exporter.config import FileSourceConfig
from exporter.ids import LINE_TOO_LONG, LinesParser
from exporter.ingest import Ingest
from exporter.sources.rotated import (
    DECOMPRESS_ERRORS,
    EMPTY_FINGERPRINT,
    FINGERPRINT_BYTES,
    TAIL_BYTES,
    candidates,
    find_copy,
    fingerprint,
    holds,
    read_head,
    read_tail,
    stat_or_none,
)
from exporter.store import FilePosition, StateError, Store
from exporter.telemetry import SelfMetrics

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
CHUNKS_PER_POLL = 8
ROTATION_GRACE_POLLS = 4
STATE_RETRY_SECONDS = 1.0
# A file with nothing new is polled less and less often, down to this many times less than the configured
# interval: every wakeup of an idle sidecar costs CPU (~0.7 ms each on a small VM), while ids wait out a
# billing delay of minutes anyway. The first line written resets the interval.
QUIET_BACKOFF = 4


@dataclass
class _Open:
    handle: BinaryIO
    device: int
    inode: int
    offset: int  # end of the last complete line consumed
    fingerprint: bytes = EMPTY_FINGERPRINT  # as last saved
    head: bytes = b""  # the file's first bytes, up to FINGERPRINT_BYTES, as far as known
    tail: bytes = b""  # the TAIL_BYTES before `offset`
    # Set while a rotated copy (or a file rotated away while we were stopped) is read to its end: its path,
    # and how many lines came from it.
    rotated: Path | None = None
    lines: int = 0


class FileSource:
    """Reads new lines from one file path, in chunks, and hands them to the ingest with the new position.

    The position is saved in the same transaction as the ids it covers, so after a crash the file is read
    again from exactly the first line whose ids are not in the queue.
    """

    def __init__(
        self, config: FileSourceConfig, parse: LinesParser, ingest: Ingest, state: Store, metrics: SelfMetrics
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
        # A failed write left the source closed: it must continue from the saved position once the database
        # answers again, not take the file at the path for a new one (that would skip a rotated file's tail).
        self._resume_pending = False

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
        self._resume_pending = True
        try:
            await self._resume()
        except StateError:
            self.close()  # poll() resumes once the database answers, never from byte 0 of the file now there

    async def _resume(self) -> None:
        """Continues from the last saved position (finishing a file rotated away meanwhile); with nothing saved
        yet, the file appeared after start-up and poll() reads it from the beginning."""
        if await self._state.position(self.name) is not None:
            await self.open_initial()
        self._resume_pending = False

    def _progress(self) -> tuple[int, int] | None:
        """Which file is read and how far: a poll that changes neither found nothing new."""
        return None if self._current is None else (self._current.inode, self._current.offset)

    def close(self) -> None:
        self._read_up_to = None
        if self._current is not None:
            self._current.handle.close()
            self._current = None

    async def open_initial(self) -> None:
        """Resumes from the saved position. A file truncated or rotated away while we were not running is
        finished first, from its rotated copy; then the file at the path is read from its start."""
        saved = await self._state.position(self.name)
        stat = stat_or_none(self._path)
        if saved is None:
            if stat is not None:
                start = _end_of_last_line(self._path, stat.st_size) if self._config.start_at == "end" else 0
                await self._switch_to(start)
            return
        if stat is not None and (stat.st_dev, stat.st_ino) == (saved.device, saved.inode):
            handle = self._path.open("rb")
            window = holds(handle, saved) if stat.st_size >= saved.offset else None
            if window is not None:
                head, tail = window
                self._current = _Open(handle, saved.device, saved.inode, saved.offset, saved.fingerprint, head, tail)
                return
            handle.close()
            log.info("%s: %s was truncated while the exporter was stopped", self.name, self._path)
            self._metrics.file_rotations.labels(self.name, "truncate").inc()
            if not await self._open_copy(saved, truncated=True):
                await self._switch_to(0)
            return
        # Renamed away (perhaps compressed since), or the rotated copy we were reading when we stopped.
        if not await self._open_copy(saved, truncated=False):
            log.warning(
                "%s: the file last read up to byte %d (inode %d) is not among the rotated files beside %s "
                "(deleted, or where sources[].rotated_glob does not look): what it held after that byte was not read",
                self.name,
                saved.offset,
                saved.inode,
                self._path,
            )
            if stat is not None:
                await self._switch_to(0)

    async def _open_copy(self, saved: FilePosition, *, truncated: bool) -> bool:
        """Makes the one rotated file that holds the bytes up to the saved position (rotated.find_copy) the
        file being read, from that offset; poll() reads it to its end, then the file at the path from its
        start. Several different files that hold them are refused, and logged."""
        paths, found = candidates(self._path, self._config.rotated_glob)
        if found > len(paths):
            log.warning("%s: %d rotated files match, only the newest %d are looked at", self.name, found, len(paths))
        # Matching may decompress copies up to the saved offset: off the event loop (scrapes, probes, UDP).
        chosen, matched = await asyncio.to_thread(find_copy, paths, saved, stat_or_none(self._path))
        if chosen is None:
            if truncated:
                self._metrics.file_rotations.labels(self.name, "copytruncate_unrecovered").inc()
            if matched:
                log.error(
                    "%s: several rotated files hold %s up to byte %d (%s): what follows that byte is read from "
                    "none of them, as the wrong one would count lines this log never had (narrow "
                    "sources[].rotated_glob to one rotation scheme)",
                    self.name,
                    self._path,
                    saved.offset,
                    ", ".join(map(str, matched)),
                )
            elif truncated:
                log.warning(
                    "%s: %s was truncated and no rotated copy holds it up to byte %d: lines written after that "
                    "byte and before the truncation, if any, were not read",
                    self.name,
                    self._path,
                    saved.offset,
                )
            return False
        if truncated:
            self._metrics.file_rotations.labels(self.name, "copytruncate_recovered").inc()
        self.close()
        device, inode = chosen.stat.st_dev, chosen.stat.st_ino
        self._current = _Open(
            chosen.handle, device, inode, saved.offset, saved.fingerprint, chosen.head, chosen.tail, chosen.path
        )
        self._skipping = False
        await self._state.save_position(self.name, self._position())  # a crash from here on resumes in the copy
        log.info(
            "%s: reading %s from byte %d to its end (%s)",
            self.name,
            chosen.path,
            saved.offset,
            f"a copy of {self._path}, since truncated" if truncated else f"{self._path}, rotated while stopped",
        )
        return True

    async def _finish_copy(self) -> bool:
        """Reads the rotated copy on (nobody writes to it); at its end, the file at the path from its start."""
        current = self._current
        assert current is not None and current.rotated is not None
        busy = await self._read_available(final=False)
        if busy or self._ingest.full:
            return busy
        await self._read_available(final=True)  # a last line without newline
        self._metrics.file_recovered_lines.labels(self.name).inc(current.lines)
        log.info(
            "%s: read %d lines from %s (to byte %d); continuing with %s from its start",
            self.name,
            current.lines,
            current.rotated,
            current.offset,
            self._path,
        )
        await self._switch_to(0)
        return self._current is not None

    async def _switch_to(self, offset: int) -> None:
        """Opens the file now at the path, at `offset`, and records the position (even with no ids yet)."""
        self.close()  # forgets what was read, too
        try:
            handle = self._path.open("rb")
        except OSError:
            return
        stat = os.fstat(handle.fileno())
        offset = min(offset, stat.st_size)
        head = read_head(handle)
        tail = read_tail(handle, head, offset)
        self._current = _Open(handle, stat.st_dev, stat.st_ino, offset, head=head, tail=tail)
        self._skipping = False
        self._rotated_size, self._rotated_quiet_polls = -1, 0
        await self._state.save_position(self.name, self._position())

    def _position(self) -> FilePosition:
        assert self._current is not None
        current = self._current
        if len(current.head) < min(current.offset, FINGERPRINT_BYTES):  # a file grown past the head we knew
            current.head = read_head(current.handle)
        current.fingerprint = self._identity(current)
        return FilePosition(current.device, current.inode, current.offset, current.fingerprint)

    @staticmethod
    def _identity(current: _Open) -> bytes:
        return fingerprint(current.head[: min(current.offset, FINGERPRINT_BYTES)], current.tail)

    async def poll(self) -> bool:
        """Follows rotation, then reads what is new; True when it stopped early with more to read."""
        if self._ingest.full:
            return False  # backpressure: the file keeps the ids until the queue has room
        if self._current is None and self._resume_pending:
            await self._resume()  # a StateError here: the database is still away, run() waits and retries
        if self._current is None:
            if stat_or_none(self._path) is None:
                return False
            await self._switch_to(0)  # the file appeared after we started: all of it is new
            if self._current is None:
                return False
        current = self._current
        if current.rotated is not None:
            return await self._finish_copy()
        stat = stat_or_none(self._path)
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
                # Copied and truncated, perhaps already refilled past our offset: what we had not read yet is
                # in the copy (read first), then the file is read from its start.
                self._metrics.file_rotations.labels(self.name, "truncate").inc()
                # What we read, as we read it (the file now holds other bytes).
                read = FilePosition(current.device, current.inode, current.offset, self._identity(current))
                if await self._open_copy(read, truncated=True):
                    return await self._finish_copy()
                await self._switch_to(0)
        busy = await self._read_available(final=False, verify=True)
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
        """The file no longer holds what we read: shorter than our offset, or other bytes at its head or just
        before the offset (truncated and refilled past it between two polls)."""
        if os.fstat(current.handle.fileno()).st_size < current.offset:
            return True
        length = min(current.offset, FINGERPRINT_BYTES)
        current.handle.seek(0)
        if current.handle.read(length) != current.head[:length]:
            return True
        current.handle.seek(current.offset - len(current.tail))
        return current.handle.read(len(current.tail)) != current.tail

    async def _read_available(self, *, final: bool, verify: bool = False) -> bool:
        """Consumes complete lines (and, when final, a last line without newline); True if the budget ran out.

        A final read (the file was rotated away) has no budget: it must reach the end before we switch.
        `verify` (the file at the path): each chunk counts only if the file still holds what was read before
        it once the chunk is read: truncated and refilled past the offset during the read, the chunk would be
        the middle of the new file. Then it returns True and the next poll takes the truncation.
        """
        current = self._current
        assert current is not None
        chunks = 0
        while final or chunks < CHUNKS_PER_POLL:
            if not final and self._ingest.full:
                return False  # backpressure: the ids stay in the file until the queue has room
            chunks += 1
            chunk = self._read_chunk(current)
            if not chunk:
                return False
            if verify and self._truncated(current):
                self._read_up_to = None
                return True
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                await self._consume(chunk[: cut + 1])
            elif final:
                await self._consume(chunk)
            elif len(chunk) == CHUNK_BYTES or len(chunk) > self._config.max_line_bytes:
                await self._reject_overlong(chunk)
            else:
                return False  # a partial line: wait for the rest
        return True

    def _read_chunk(self, current: _Open) -> bytes:
        current.handle.seek(current.offset)  # where it is already, for a compressed copy: no rewind
        if current.rotated is None:
            return current.handle.read(CHUNK_BYTES)
        try:
            return current.handle.read(CHUNK_BYTES)
        except DECOMPRESS_ERRORS as err:
            log.error("%s: %s cannot be read past byte %d (%s); the rest of it is skipped", self.name,
                      current.rotated, current.offset, err)
            return b""

    async def _reject_overlong(self, chunk: bytes) -> None:
        assert self._current is not None
        if not self._skipping:
            self._metrics.ids_rejected.labels(self.name, LINE_TOO_LONG).inc()
        self._skipping = True
        self._advance(chunk)
        await self._state.save_position(self.name, self._position())

    def _advance(self, consumed: bytes) -> None:
        """Moves the offset past `consumed`, keeping the bytes before it (the position's tail digest)."""
        current = self._current
        assert current is not None
        current.offset += len(consumed)
        current.tail = (current.tail[-TAIL_BYTES:] + consumed[-TAIL_BYTES:])[-TAIL_BYTES:]

    async def _consume(self, data: bytes) -> None:
        assert self._current is not None
        self._advance(data)
        if self._current.rotated is not None:  # whole lines (or the last one, without newline)
            self._current.lines += data.count(b"\n") + (not data.endswith(b"\n"))
        if self._skipping:
            self._skipping = False
            cut = data.find(b"\n")  # what precedes it is the tail of an overlong line, already counted
            data = data[cut + 1 :] if cut >= 0 else b""
        parsed = self._parse(data) if data else []
        await self._ingest.submit(self.name, parsed, self._position(), bounded=False)


def _end_of_last_line(path: Path, size: int) -> int:
    """Where "start at the end" starts: after the last complete line, so a line being written is read whole."""
    with path.open("rb") as handle:
        handle.seek(max(size - CHUNK_BYTES, 0))
        tail = handle.read(min(size, CHUNK_BYTES))
    cut = tail.rfind(b"\n")
    return size if cut < 0 else size - len(tail) + cut + 1
