"""Tails a log file across any number of rotations: each generation of the log (one life of its content,
whatever its name or compression is now) is read once, from its checkpoint, oldest first, then the log itself."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from exporter.clock import Clock, SystemClock
from exporter.config import FileSourceConfig
from exporter.ids import LINE_TOO_LONG, LinesParser, Sighting
from exporter.ingest import Ingest
from exporter.sources.rotated import (
    DECOMPRESS_ERRORS,
    OPENERS,
    SCAN_ATTEMPTS,
    TAIL_BYTES,
    Scan,
    Target,
    digest,
    last_bytes,
    read_head,
    read_tail,
    scan,
    stat_or_none,
)
from exporter.store import Checkpoint, FileHistory, StateError, Store
from exporter.telemetry import SelfMetrics

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
CHUNKS_PER_POLL = 8
ROTATION_GRACE_POLLS = 4
# A rotated plain file last written this long ago takes no more lines: writers reopen their log at once.
SETTLED_NS = 2_000_000_000
STATE_RETRY_SECONDS = 1.0
# Files a scan could not take yet (a copy gzip is still writing, the twin of a file being read) are looked at
# again after this long, doubling up to the maximum: never a scan per poll.
RESCAN_SECONDS, RESCAN_MAX_SECONDS = 1.0, 60.0
# A file with nothing new is polled less and less often, down to this many times less than the configured
# interval: every wakeup of an idle sidecar costs CPU (~0.7 ms each on a small VM), while ids wait out a
# billing delay of minutes anyway. The first line written resets the interval.
QUIET_BACKOFF = 4


@dataclass
class _Open:
    """The generation being read: in the log itself (`live`), or in a rotated file read to its end."""

    path: Path
    handle: BinaryIO
    device: int
    inode: int
    generation: int
    offset: int  # end of the last complete line consumed
    head: bytes  # the file's first bytes, up to the fingerprint's length, as far as known
    tail: bytes  # the TAIL_BYTES before `offset`
    live: bool
    mtime_ns: int
    # A copy of a generation read elsewhere (a copytruncate's copy, compressed or not): nobody writes to it.
    copy: bool = False
    lines: int = 0  # read while rotated
    broken: bool = False  # a compressed file that ended early (gzip still writing it, or damaged)

    @property
    def compressed(self) -> bool:
        return self.path.suffix in OPENERS


class FileSource:
    """Reads new lines from one file path, in chunks, and hands them to the ingest with the generation's new
    checkpoint.

    The checkpoint is saved in the same transaction as the ids it covers, so after a crash each generation is
    read again from exactly the first line whose ids are not in the queue. At start-up and whenever a rotation
    is seen, a scan (rotated.scan) finds every generation not read to its end, under whatever name.
    """

    def __init__(
        self,
        config: FileSourceConfig,
        parse: LinesParser,
        ingest: Ingest,
        state: Store,
        metrics: SelfMetrics,
        *,
        clock: Clock | None = None,
    ) -> None:
        self.name = config.name
        self._clock = clock or SystemClock()  # bounds the read at stop (final_read_seconds)
        self._path = Path(config.path)
        self._config = config
        self._fingerprint = config.fingerprint_bytes
        self._parse = parse
        self._ingest = ingest
        self._state = state
        self._metrics = metrics
        self._current: _Open | None = None
        self._targets: list[Target] = []
        self._checkpoints: dict[int, Checkpoint] = {}
        self._kept = metrics.file_checkpoints.labels(config.name)
        self._horizon: int | None = None
        self._next_generation = 1
        self._loaded = False
        # start_at: end holds until the first scan's horizon is saved (then the history it skipped stays skipped).
        self._start_at_end = config.start_at == "end"
        self._skipping = False  # inside an overlong line, discarding until its newline
        self._rotated_size, self._rotated_quiet_polls = -1, 0  # a rotated plain file, while it settles
        # (size, mtime, ctime) of the file at the path when it was last read as far as it goes.
        self._read_up_to: tuple[int, int, int] | None = None
        self._rescan_at: float | None = None
        self._history_told: set[Path] = set()
        self._rescan_delay = RESCAN_SECONDS
        self._deferred: set[Path] = set()  # the files the last scan left for later
        self._log_absent = False  # the last scan found no file at the log's path
        # A failed write left the source closed: it continues from the saved checkpoints once the database
        # answers again, never from byte 0 of the file now at the path.
        self._resume_pending = False

    async def run(self, stop: asyncio.Event) -> None:
        """Polls until `stop`, then reads what the writer left, for final_read_seconds at most, before closing
        (open_initial() comes first)."""
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
        await self._read_out()
        self.close()

    async def _read_out(self) -> None:
        """What the writer left before we were stopped, until the deadline: a writer appending faster than we
        read would hold the stop for ever. Each checkpoint is saved with the ids it covers, so whatever is not
        read now is read at the next start, from there."""
        deadline = self._clock.time() + self._config.final_read_seconds
        with contextlib.suppress(StateError):  # unsaved lines are read again at the next start
            while await self.poll():
                if self._clock.time() >= deadline:
                    current = self._current
                    log.info("%s: stopped reading after %.1fs with more to read%s; the rest is read at the next "
                             "start", self.name, self._config.final_read_seconds,
                             "" if current is None else f" ({current.path} from byte {current.offset})")
                    return
                await asyncio.sleep(0)  # scrapes and probes go on answering while we read

    async def _recover(self, stop: asyncio.Event, err: StateError) -> None:
        """A state write failed (disk full, read-only): none of it was saved, so after a pause every generation
        is read again from its last saved checkpoint (ids already queued are deduplicated)."""
        if err.operation == "position":  # the ingest counted its own (enqueue)
            self._metrics.state_errors.labels("position").inc()
        if not err.reported:  # (a shared store says an outage once itself)
            log.error("%s: cannot save its read position to the state database (%s); reading again from the last "
                      "saved one", self.name, err)
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
        await self.open_initial()
        self._resume_pending = False

    def _progress(self) -> tuple[int, int] | None:
        """Which generation is read and how far: a poll that changes neither found nothing new."""
        return None if self._current is None else (self._current.generation, self._current.offset)

    def close(self) -> None:
        self._read_up_to = None
        if self._current is not None:
            self._current.handle.close()
            self._current = None
        for target in self._targets:
            target.file.handle.close()
        self._targets = []

    async def open_initial(self) -> None:
        """Loads the checkpoints and scans: every generation of the log not read to its end is read from its
        checkpoint (or its start), oldest first, then the log itself. A first start with start_at: end takes
        what is there as history and reads the log from its end."""
        history = await self._state.file_history(self.name)
        self._checkpoints = {c.generation: c for c in history.checkpoints}
        self._horizon = history.horizon_ns
        self._next_generation = max(self._checkpoints, default=0) + 1
        if history.checkpoints or history.horizon_ns is not None:
            self._start_at_end = False  # not a first start
        self._loaded = True
        # The generation last read in the log itself: if the log no longer holds it, it was truncated meanwhile.
        stat = stat_or_none(self._path)
        last = [
            c.generation for c in history.checkpoints
            if not c.finished and stat is not None and (c.device, c.inode) == (stat.st_dev, stat.st_ino)
        ]
        await self._scan(truncated=max(last, default=None), maybe=True)

    async def _scan(self, truncated: int | None = None, *, maybe: bool = False) -> None:
        """Finds what to read (rotated.scan, off the event loop: it may decompress), saves what it learnt (known
        copies' new places, expired checkpoints, the horizon), then opens the first file to read. `truncated`:
        the generation of a truncated log (`maybe`: unless the log still holds it), reported as recovered when
        a copy holds it."""
        self.close()
        self._log_absent = stat_or_none(self._path) is None
        history = FileHistory(self._horizon, tuple(self._checkpoints.values()))
        found = await asyncio.to_thread(
            scan, self._path, self._config.rotated_glob, history, self._fingerprint, start_at_end=self._start_at_end
        )
        at_end = self._start_at_end  # _learn saves the first horizon, and with it ends the first start
        try:
            await self._learn(found, truncated, maybe)
        except BaseException:
            found.close()
            raise
        self._targets = found.targets
        if found.deferred or found.unsettled:
            # The wait doubles while the same files are left (an empty rotated log stays so for good): a file
            # not left before (a copy gzip is writing, with lines never read), or a directory that kept changing
            # while it was scanned, is looked at after the first one.
            if found.unsettled or not self._deferred.issuperset(found.deferred):
                self._rescan_delay = RESCAN_SECONDS
            self._rescan_at = time.monotonic() + self._rescan_delay
            self._rescan_delay = min(self._rescan_delay * 2, RESCAN_MAX_SECONDS)
        else:
            self._rescan_at, self._rescan_delay = None, RESCAN_SECONDS
        self._deferred = set(found.deferred)
        await self._next_target(at_end=at_end)

    async def _learn(self, found: Scan, truncated: int | None, maybe: bool) -> None:
        if found.more_candidates:
            log.warning("%s: %d more rotated files match; only the newest are looked at", self.name,
                        found.more_candidates)
        for path, generation in found.conflicts:
            self._metrics.file_identity_conflicts.labels(self.name).inc()
            log.warning(
                "%s: %s begins as the generation read up to byte %d does, but holds other bytes there: read as "
                "another generation (if every file begins with a fixed header, raise sources[].fingerprint_bytes)",
                self.name, path, self._checkpoints[generation].offset,
            )
        new_history = [p for p in found.history if p not in self._history_told]
        if new_history:  # told once a file (per process: a set of paths bounded by the candidates' bound)
            self._history_told = set(found.history)
            self._metrics.file_history_skipped.labels(self.name).inc(len(new_history))
            log.info("%s: not reading %d rotated files written before what this source has read (%s)", self.name,
                     len(new_history), ", ".join(p.name for p in new_history[:5]))
        for checkpoint in found.moved:
            await self._state.save_checkpoint(self.name, checkpoint)
            self._checkpoints[checkpoint.generation] = checkpoint
        for target in found.partials:
            await self._tell_partial(target, found)
        if found.unsettled:
            log.info("%s: %s's directory changed under %d scans in a row (rotations): looking again in %.0fs",
                     self.name, self._path, SCAN_ATTEMPTS, RESCAN_SECONDS)
        # A file left for later, or a scan the directory changed under, may hold an unfinished generation.
        if not found.deferred and not found.unsettled:
            await self._tell_gone(found, truncated)
        found.order()  # a partial file taken for a new generation joined the targets
        await self._retain(found)
        if truncated is not None and not found.unsettled:
            self._report_truncation(truncated, found, maybe)

    async def _tell_gone(self, found: Scan, truncated: int | None) -> None:
        """Generations not read to their end that no file holds any more (deleted, or moved where
        rotated_glob does not look): said once, then marked finished."""
        for checkpoint in list(self._checkpoints.values()):
            if checkpoint.finished or checkpoint.generation in found.seen:
                continue
            if checkpoint.offset and checkpoint.generation != truncated:  # (a truncation is told as such)
                log.warning(
                    "%s: the generation of %s read up to byte %d is in no file matching %r any more (deleted or "
                    "moved before it was read to its end): what it held after that byte was not read",
                    self.name, self._path, checkpoint.offset, self._config.rotated_glob or self._path.name + "*",
                )
            gone = dataclasses.replace(checkpoint, finished=True)
            await self._state.save_checkpoint(self.name, gone)
            self._checkpoints[gone.generation] = gone

    async def _tell_partial(self, target: Target, found: Scan) -> None:
        """A rotated file that begins as a known generation does but ends before what was read of it: a copy
        of its start (copytruncate's copy, taken before the source read on) or another generation behind a
        fixed header as long as the fingerprint. Its last ids tell: known to the state, a copy (not read);
        none known, a new generation (read from its start, counted as an identity conflict). Either way it
        gets a checkpoint of its own, so the question is asked once, while its ids are remembered."""
        file, known = target.file, target.checkpoint
        assert known is not None
        length, end = await asyncio.to_thread(last_bytes, file.handle, TAIL_BYTES)
        ids = [s.id for s in self._parse(end[end.find(b"\n") + 1 :]) if isinstance(s, Sighting)][-3:]
        statuses = [await self._state.status(generation_id) for generation_id in ids]
        if ids and all(status is None for status in statuses):
            self._metrics.file_identity_conflicts.labels(self.name).inc()
            log.warning(
                "%s: %s begins as the generation read up to byte %d does but is shorter, and holds ids never seen: "
                "read as another generation (if every file begins with a fixed header, raise "
                "sources[].fingerprint_bytes)", self.name, file.path, known.offset,
            )
            file.handle.seek(0)
            found.targets.append(Target(file, None))
            return
        file.handle.close()
        own = Checkpoint(
            self._next_generation, digest(file.head[: min(length, self._fingerprint)]), digest(end), length, True,
            file.stat.st_dev, file.stat.st_ino, file.stat.st_mtime_ns,
        )
        self._next_generation += 1
        await self._state.save_checkpoint(self.name, own)
        self._checkpoints[own.generation] = own
        self._kept.set(len(self._checkpoints))
        found.seen.add(own.generation)

    def _report_truncation(self, generation: int, found: Scan, maybe: bool) -> None:
        continued = [t for t in found.targets if t.checkpoint is not None and t.checkpoint.generation == generation]
        if maybe:
            if any(t.file.live for t in continued):
                return
            log.info("%s: %s was truncated while the exporter was stopped", self.name, self._path)
            self._metrics.file_rotations.labels(self.name, "truncate").inc()
        if continued:
            self._metrics.file_rotations.labels(self.name, "copytruncate_recovered").inc()
            return
        self._metrics.file_rotations.labels(self.name, "copytruncate_unrecovered").inc()
        log.warning(
            "%s: %s was truncated and no rotated file holds what it held past byte %d: lines written after that "
            "byte and before the truncation, if any, were not read",
            self.name, self._path, self._checkpoints[generation].offset if generation in self._checkpoints else 0,
        )

    async def _retain(self, found: Scan) -> None:
        """Checkpoints of generations no file on disk holds any more expire by count and age; the horizon
        rises past what they covered, so such a file found again later is history, not new."""
        gone = sorted(
            (c for c in self._checkpoints.values() if c.generation not in found.seen),
            key=lambda c: c.mtime_ns,
            reverse=True,
        )
        oldest = time.time_ns() - int(self._config.checkpoints_max_age_seconds * 1e9)
        expired = [c for i, c in enumerate(gone) if i >= self._config.checkpoints_kept or c.mtime_ns < oldest]
        horizon = max([found.horizon_ns, *(c.mtime_ns for c in expired)])
        if expired or horizon != self._horizon:
            await self._state.forget_checkpoints(self.name, [c.generation for c in expired], horizon)
            self._horizon = horizon
            self._start_at_end = False
            for checkpoint in expired:
                del self._checkpoints[checkpoint.generation]
            self._metrics.file_checkpoints_expired.labels(self.name).inc(len(expired))
        self._kept.set(len(self._checkpoints))

    async def _next_target(self, *, at_end: bool = False) -> None:
        """Opens the next file the scan found; the log itself, last, stays open (a generation never seen from
        its start, or `at_end` from its end)."""
        if not self._targets:
            return
        target = self._targets.pop(0)
        file = target.file
        checkpoint = target.checkpoint
        head = file.head[: self._fingerprint]
        if checkpoint is not None:
            generation, offset, tail = checkpoint.generation, checkpoint.offset, target.tail
        else:
            generation, offset, tail = self._next_generation, 0, b""
            self._next_generation += 1
            if file.live and at_end:
                offset = _end_of_last_line(file.handle, file.stat.st_size)
                tail = read_tail(file.handle, file.head, offset)
        # Not where the generation was read before: a copy (nobody writes to it).
        moved = checkpoint is not None and file.place != (checkpoint.device, checkpoint.inode)
        self._current = _Open(
            file.path, file.handle, file.stat.st_dev, file.stat.st_ino, generation, offset, head, tail,
            file.live, file.stat.st_mtime_ns, copy=file.compressed or moved,
        )
        self._skipping = False
        self._rotated_size, self._rotated_quiet_polls = -1, 0
        if file.live:
            if checkpoint is None and offset:
                await self._state.save_checkpoint(self.name, self._checkpoint())
            return
        log.info(
            "%s: reading %s from byte %d to its end (%s)", self.name, file.path, offset,
            "a generation of the log not read to its end" if checkpoint else "a generation of the log never read",
        )

    def _checkpoint(self, *, finished: bool = False) -> Checkpoint:
        current = self._current
        assert current is not None
        length = min(current.offset, self._fingerprint)
        if len(current.head) < length:  # a file grown past the head we knew (compressed ones were read whole)
            current.head = read_head(current.handle, self._fingerprint)
            current.handle.seek(current.offset)
        tail = digest(current.tail) if current.offset else b""
        if not current.compressed:  # orders generations and ages their checkpoints
            current.mtime_ns = os.fstat(current.handle.fileno()).st_mtime_ns
        checkpoint = Checkpoint(
            current.generation, digest(current.head[:length]), tail, current.offset, finished, current.device,
            current.inode, current.mtime_ns,
        )
        self._checkpoints[current.generation] = checkpoint
        self._kept.set(len(self._checkpoints))
        return checkpoint

    def _rescan_due(self) -> bool:
        return self._rescan_at is None or time.monotonic() >= self._rescan_at

    async def poll(self) -> bool:
        """Follows rotation, then reads what is new; True when it stopped early with more to read."""
        if self._ingest.full:
            return False  # backpressure: the file keeps the ids until the queue has room
        if self._current is None and self._resume_pending:
            await self._resume()  # a StateError here: the database is still away, run() waits and retries
        if self._current is None:
            # The log appeared after start-up (or after the last scan, which found none: renamed away, not yet
            # created again): scan now. A scan left files to look at again: scan when due (not every poll).
            if not self._loaded or stat_or_none(self._path) is None:
                return False
            if not self._log_absent and not self._rescan_due():
                return False
            await self._scan()
            if self._current is None:
                if self._rescan_at is None:
                    self._rescan_at = time.monotonic() + self._rescan_delay
                return False
        current = self._current
        if not current.live:
            return await self._read_rotated()
        if self._rescan_at is not None and time.monotonic() >= self._rescan_at and not self._skipping:
            await self._scan()  # files a scan left for later (a copy gzip was writing): the log's place is saved
            return self._current is not None
        stat = stat_or_none(self._path)
        seen = None if stat is None else (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        if stat is not None and (stat.st_dev, stat.st_ino) != (current.device, current.inode):
            # Renamed away and a new file created: the old one is read to its end (the writer may append to it
            # until it reopens its log), then the scan finds the new one and any rotated meanwhile.
            self._metrics.file_rotations.labels(self.name, "rename").inc()
            current.live = False
            return await self._read_rotated()
        if seen is not None and seen == self._read_up_to:
            return False  # unchanged since it was read to the end: no read, no fingerprint (idle polls)
        if self._truncated(current):
            # Copied and truncated, perhaps already refilled past our offset: what we had not read yet is in the
            # copy, found by the scan (its checkpoint), then the log is read from its start.
            self._metrics.file_rotations.labels(self.name, "truncate").inc()
            await self._scan(truncated=current.generation)
            return self._current is not None
        busy = await self._read_available(final=False, verify=True)
        if self._current is not None:
            size = os.fstat(self._current.handle.fileno()).st_size
            self._metrics.file_read_bytes.labels(self.name).set(self._current.offset)
            self._metrics.file_size_bytes.labels(self.name).set(size)
            if not busy and not self._ingest.full and seen is not None and seen[0] == size:
                self._read_up_to = seen
        return busy

    async def _read_rotated(self) -> bool:
        """Reads a rotated file on (a copy, or the log renamed away); once at its end and settled, its
        generation is finished and the next file is opened."""
        current = self._current
        assert current is not None
        busy = await self._read_available(final=False)
        if busy or self._ingest.full or not self._settled(current):
            return busy
        if not current.broken:
            await self._read_available(final=True)  # a last line without newline
        if current.broken:  # what was read is saved, unfinished: the rest once it decompresses (a later scan)
            self._rescan_at = time.monotonic() + self._rescan_delay
        elif current.offset:  # (an empty file: no generation to remember)
            await self._state.save_checkpoint(self.name, self._checkpoint(finished=True))
        self._metrics.file_recovered_lines.labels(self.name).inc(current.lines)
        log.info("%s: read %d lines from %s (to byte %d)", self.name, current.lines, current.path, current.offset)
        current.handle.close()
        self._current = None
        if self._targets:
            await self._next_target()
        else:
            await self._scan()  # the log itself now, and whatever was rotated meanwhile
        return self._current is not None

    def _settled(self, current: _Open) -> bool:
        """Whether a rotated file takes no more lines: a copy, or the log renamed away and unchanged for a few
        polls (or for a while already): its writer may append until it reopens its log."""
        if current.copy:
            return True
        stat = os.fstat(current.handle.fileno())
        if stat.st_size != self._rotated_size:
            self._rotated_size, self._rotated_quiet_polls = stat.st_size, 0
            return stat.st_mtime_ns < time.time_ns() - SETTLED_NS
        self._rotated_quiet_polls += 1
        return self._rotated_quiet_polls >= ROTATION_GRACE_POLLS

    def _truncated(self, current: _Open) -> bool:
        """The file no longer holds what we read: shorter than our offset, or other bytes at its head or just
        before the offset (truncated and refilled past it between two polls)."""
        if os.fstat(current.handle.fileno()).st_size < current.offset:
            return True
        length = min(current.offset, self._fingerprint, len(current.head))
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
            chunk = await self._read_chunk(current)
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

    async def _read_chunk(self, current: _Open) -> bytes:
        if not current.compressed:
            current.handle.seek(current.offset)
            return current.handle.read(CHUNK_BYTES)
        try:  # decompressing a chunk takes milliseconds: off the event loop (scrapes, probes, UDP)
            return await asyncio.to_thread(_read_at, current.handle, current.offset)
        except DECOMPRESS_ERRORS as err:
            if not current.broken:
                log.warning("%s: %s ends early after byte %d (%s): being compressed, or damaged; read on later",
                            self.name, current.path, current.offset, err)
            current.broken = True
            return b""

    async def _reject_overlong(self, chunk: bytes) -> None:
        assert self._current is not None
        if not self._skipping:
            self._metrics.ids_rejected.labels(self.name, LINE_TOO_LONG).inc()
        self._skipping = True
        self._advance(chunk)
        await self._state.save_checkpoint(self.name, self._checkpoint())

    def _advance(self, consumed: bytes) -> None:
        """Moves the offset past `consumed`, keeping the bytes before it (the checkpoint's tail digest)."""
        current = self._current
        assert current is not None
        current.offset += len(consumed)
        current.tail = (current.tail[-TAIL_BYTES:] + consumed[-TAIL_BYTES:])[-TAIL_BYTES:]

    async def _consume(self, data: bytes) -> None:
        current = self._current
        assert current is not None
        self._advance(data)
        if not current.live:  # whole lines (or the last one, without newline)
            current.lines += data.count(b"\n") + (not data.endswith(b"\n"))
        if self._skipping:
            self._skipping = False
            cut = data.find(b"\n")  # what precedes it is the tail of an overlong line, already counted
            data = data[cut + 1 :] if cut >= 0 else b""
        parsed = self._parse(data) if data else []
        await self._ingest.submit(self.name, parsed, self._checkpoint(), bounded=False)


def _read_at(handle: BinaryIO, offset: int) -> bytes:
    handle.seek(offset)  # where it is already, for a compressed copy: no rewind
    return handle.read(CHUNK_BYTES)


def _end_of_last_line(handle: BinaryIO, size: int) -> int:
    """Where "start at the end" starts: after the last complete line, so a line being written is read whole."""
    handle.seek(max(size - CHUNK_BYTES, 0))
    tail = handle.read(min(size, CHUNK_BYTES))
    cut = tail.rfind(b"\n")
    return size if cut < 0 else size - len(tail) + cut + 1
