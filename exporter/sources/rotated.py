"""Generations of a log on disk: content fingerprints, and the scan that says which files a source reads, from
where, so that each generation is read once whatever its name or compression is now."""

from __future__ import annotations

import bz2
import dataclasses
import glob
import gzip
import hashlib
import lzma
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import BinaryIO, cast

from exporter.store import Checkpoint, FileHistory

# A checkpoint holds the digest of the bytes just before its offset too: two generations that share their first
# bytes (a fixed header longer than the fingerprint) still differ there.
TAIL_BYTES = 4096
# Every file's head is read this far at least: checkpoints written by earlier versions digest up to 4096 bytes.
HEAD_BYTES = 4096
# Rotated siblings examined, newest first (a directory of old logs).
MAX_CANDIDATES = 64
# Scans taken in a row while rotations change the directory under them (see scan()).
SCAN_ATTEMPTS = 3
# Compressed copies are read through these; other compressed suffixes are not candidates.
OPENERS: dict[str, Callable[..., object]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".lzma": lzma.open}
UNREADABLE_SUFFIXES = (".zst", ".zip")
# What a damaged or half-written compressed copy raises while it is read.
DECOMPRESS_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)
DIGEST = 18  # 2 bytes of length, 16 of SHA-256


def digest(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + hashlib.sha256(data).digest()[:16]


def ends_with(data: bytes, saved: bytes) -> bool:
    """Whether `data` ends with the bytes the tail digest `saved` digests (b"": none kept, by a position saved
    before tails existed)."""
    if not saved:
        return True
    length = int.from_bytes(saved[:2], "big")
    return len(data) >= length and digest(data[len(data) - length :]) == saved[:DIGEST]


def read_head(handle: BinaryIO, size: int) -> bytes:
    handle.seek(0)
    return handle.read(size)


def read_tail(handle: BinaryIO, head: bytes, offset: int) -> bytes:
    """The TAIL_BYTES before `offset` (fewer if the file is shorter), `head` being already read; the handle is
    left at `offset` (or the file's end). A compressed stream only moves forward here: decompressed once."""
    start = max(offset - TAIL_BYTES, 0)
    if start < len(head):
        if offset <= len(head):
            handle.seek(offset)
            return head[start:offset]
        handle.seek(len(head))
        return head[start:] + handle.read(offset - len(head))
    handle.seek(start)
    return handle.read(offset - start)


def candidates(log: Path, pattern: str) -> tuple[list[Path], int]:
    """The rotated siblings of `log` matching `pattern` (relative to its directory; "": its name followed by
    anything), newest first, at most MAX_CANDIDATES; and how many matched in all."""
    pattern = pattern or glob.escape(log.name) + "*"
    found = []
    for name in glob.glob(os.path.join(glob.escape(str(log.parent)), pattern)):
        path = Path(name)
        stat = stat_or_none(path)
        if path != log and stat is not None and S_ISREG(stat.st_mode) and path.suffix not in UNREADABLE_SUFFIXES:
            found.append((stat.st_mtime_ns, name, path))
    found.sort(reverse=True)
    return [path for _, _, path in found[:MAX_CANDIDATES]], len(found)


@dataclass
class Found:
    """A file the scan looked at: open (decompressed if need be), its first bytes read."""

    path: Path
    handle: BinaryIO
    stat: os.stat_result
    head: bytes
    live: bool
    _digests: dict[int, bytes] = field(default_factory=dict)

    def starts_with(self, saved: bytes) -> bool:
        """Whether the file begins with the bytes the head digest `saved` digests (one digest per length)."""
        length = int.from_bytes(saved[:2], "big")
        if len(self.head) < length:
            return False
        if length not in self._digests:
            self._digests[length] = digest(self.head[:length])
        return self._digests[length] == saved[:DIGEST]

    @property
    def compressed(self) -> bool:
        return self.path.suffix in OPENERS

    @property
    def place(self) -> tuple[int, int]:
        return self.stat.st_dev, self.stat.st_ino


@dataclass
class Target:
    """A file to read from `checkpoint.offset` (None: a generation never seen, from its start); `tail` holds the
    bytes before that offset and the handle stands there."""

    file: Found
    checkpoint: Checkpoint | None
    tail: bytes = b""


@dataclass
class Scan:
    """What a scan found: the files to read (rotated ones oldest first, the live file last), the generations
    some file on disk holds, the horizon, and what it left alone and why."""

    targets: list[Target] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    horizon_ns: int = -1
    # Files to look at again once the targets are read: twins of a file being read, copies being compressed.
    deferred: list[Path] = field(default_factory=list)
    # Rotated files of no known generation, last written at or before the horizon: history, not read.
    history: list[Path] = field(default_factory=list)
    # Files that begin as a known generation does but hold other bytes at its offset: read as new generations.
    conflicts: list[tuple[Path, int]] = field(default_factory=list)
    # Known copies found under a new name or compressed: their checkpoints' place hints, to save.
    moved: list[Checkpoint] = field(default_factory=list)
    # The directory changed under every one of SCAN_ATTEMPTS scans: a generation may be hidden (not gone).
    unsettled: bool = False
    # Files shorter than what was read of the generation whose first bytes they share, and no other file of it:
    # a copy taken before the source read on, or a generation with a fixed header (the source asks its ids).
    partials: list[Target] = field(default_factory=list)
    more_candidates: int = 0

    def order(self) -> None:
        """Rotated files oldest first, the log itself last."""
        self.targets.sort(key=lambda t: (t.file.live, t.file.stat.st_mtime_ns, str(t.file.path)))

    def close(self) -> None:
        """Closes the files it left open (a scan not taken)."""
        for target in (*self.targets, *self.partials):
            target.file.handle.close()


def scan(
    live: Path,
    pattern: str,
    history: FileHistory,
    fingerprint_bytes: int,
    *,
    start_at_end: bool,
) -> Scan:
    """Which files of the log the source must read, and from where (_scan_once), taken while the directory
    holds still. Blocking (it may decompress): run it off the event loop.

    A rotation between the listing of the directory and the opening of the log hides the generation being
    read: renamed away (or copied, then truncated) after the listing, it is in no file the scan opened, and what
    it held past its checkpoint waited for the next rotation's scan (or was lost, were the rotated file
    compressed by then). So the directory is listed again once every file is open, and the scan taken again
    if a file came, went or changed its inode meanwhile. After SCAN_ATTEMPTS such scans the last one is taken,
    marked `unsettled`: its files are read, but a generation it does not see is not taken for gone, and the
    source looks again soon."""
    before = _identities(live, pattern)
    attempts = 1
    while True:
        result = _scan_once(live, pattern, history, fingerprint_bytes, start_at_end=start_at_end)
        after = _identities(live, pattern)  # (taken before the next attempt lists: its "before")
        if after == before or attempts == SCAN_ATTEMPTS:
            result.unsettled = after != before
            return result
        result.close()
        before, attempts = after, attempts + 1


def _identities(live: Path, pattern: str) -> set[tuple[str, int, int]]:
    """(name, device, inode) of the log and of every rotated file that may be a candidate: what a rotation
    changes (appending to a file does not)."""
    paths = [live, *candidates(live, pattern)[0]]
    return {(str(path), stat.st_dev, stat.st_ino) for path in paths if (stat := stat_or_none(path)) is not None}


def _scan_once(
    live: Path,
    pattern: str,
    history: FileHistory,
    fingerprint_bytes: int,
    *,
    start_at_end: bool,
) -> Scan:
    """Which files of the log `live` (and of its rotated siblings matching `pattern`) the source must read, and
    from where, as the directory is seen once.

    A file belongs to the checkpoint whose head digest its first bytes match and whose tail digest the bytes
    before that checkpoint's offset match (the longest such checkpoint). A generation read to its end is not
    read again under any name; several files of one generation (app.log.1 and the app.log.1.gz gzip is
    writing; a copy and the log not yet truncated) are read once: the one the checkpoint was read in, else a
    plain one, the others looked at again after it (they then match its checkpoint). Rotated files of no known
    generation are read from their start, oldest first, unless they are history (horizon)."""
    result = Scan()
    paths, found = candidates(live, pattern)
    result.more_candidates = max(found - len(paths), 0)
    files = _open_all([*reversed(paths), live], live, max(HEAD_BYTES, fingerprint_bytes), result)
    usable = sorted((c for c in history.checkpoints if c.offset > 0), key=lambda c: -c.offset)
    by_generation: dict[int, list[tuple[Found, bytes | None]]] = {}
    partials: list[Target] = []
    unknown: list[Found] = []
    for file in files:
        matched, tail, how = _match(file, usable, result)
        if how == "later":
            file.handle.close()
            result.deferred.append(file.path)
        elif matched is None:
            unknown.append(file)
        elif how == "partial":
            partials.append(Target(file, matched))
            result.seen.add(matched.generation)
        else:
            by_generation.setdefault(matched.generation, []).append((file, tail))
            result.seen.add(matched.generation)
    result.partials = partials
    result.horizon_ns = _horizon(history, files, by_generation, start_at_end)
    checkpoints = {c.generation: c for c in usable}
    for generation, members in by_generation.items():
        _assign_known(checkpoints[generation], members, result)
    _assign_unknown(unknown, fingerprint_bytes, result)
    result.order()
    return result


def _open_all(paths: list[Path], live: Path, head_bytes: int, result: Scan) -> list[Found]:
    files: list[Found] = []
    places: set[tuple[int, int]] = set()
    for path in paths:
        stat = stat_or_none(path)
        if stat is None or not S_ISREG(stat.st_mode) or (stat.st_dev, stat.st_ino) in places:
            continue  # gone meanwhile, or the live file (or a hard link) seen under another name
        handle = _open(path)
        if handle is None:
            continue
        try:
            head = read_head(handle, head_bytes)
        except DECOMPRESS_ERRORS:  # being written by gzip, or damaged
            handle.close()
            result.deferred.append(path)
            continue
        places.add((stat.st_dev, stat.st_ino))
        files.append(Found(path, handle, stat, head, path == live))
    return files


def _match(file: Found, usable: list[Checkpoint], result: Scan) -> tuple[Checkpoint | None, bytes | None, str]:
    """The checkpoint `file` holds and the bytes before its offset (None: nothing to read in it, a known
    compressed copy in its known place), and how: "whole", "partial" (the file ends before that offset),
    "new" (no checkpoint: a generation never seen) or "later" (a compressed file that ends early: being
    written by gzip, or damaged)."""
    partial: Checkpoint | None = None
    conflicts: list[int] = []
    for checkpoint in usable:
        if not file.starts_with(checkpoint.head):
            continue
        if checkpoint.finished and file.compressed and file.place == (checkpoint.device, checkpoint.inode):
            return checkpoint, None, "whole"  # read to its end, here, before: not decompressed again
        try:
            tail = read_tail(file.handle, file.head, checkpoint.offset)
        except DECOMPRESS_ERRORS:
            return None, None, "later"
        if len(tail) < min(checkpoint.offset, TAIL_BYTES):
            # Shorter than what was read of that generation, beginning as it does (unless another generation
            # that begins alike fits it better). Never the log itself: shorter than what was read of it, it was
            # truncated and holds a new generation.
            if not file.live and partial is None:
                partial = checkpoint
            continue
        if ends_with(tail, checkpoint.tail):
            if file.compressed and file.place != (checkpoint.device, checkpoint.inode):
                result.moved.append(_moved(checkpoint, file))
            return checkpoint, tail, "whole"
        conflicts.append(checkpoint.generation)
    if partial is not None:
        if file.compressed and not _complete(file.handle):
            return None, None, "later"
        return partial, None, "partial"
    result.conflicts.extend((file.path, generation) for generation in conflicts)
    return None, None, "new"


def _complete(handle: BinaryIO) -> bool:
    """Whether a compressed file decompresses to its end (gzip is not still writing it)."""
    try:
        while handle.read(1024 * 1024):
            pass
    except DECOMPRESS_ERRORS:
        return False
    return True


def last_bytes(handle: BinaryIO, size: int) -> tuple[int, bytes]:
    """The file's length and its last `size` bytes (a compressed file is decompressed to its end: blocking)."""
    handle.seek(0)
    kept = b""
    length = 0
    while chunk := handle.read(1024 * 1024):
        length += len(chunk)
        kept = (kept + chunk)[-size:]
    return length, kept


def _moved(checkpoint: Checkpoint, file: Found) -> Checkpoint:
    return dataclasses.replace(
        checkpoint, device=file.stat.st_dev, inode=file.stat.st_ino,
        mtime_ns=max(checkpoint.mtime_ns, file.stat.st_mtime_ns),
    )


def _horizon(
    history: FileHistory,
    files: list[Found],
    by_generation: dict[int, list[tuple[Found, bytes | None]]],
    start_at_end: bool,
) -> int:
    """The history kept, or the one a first scan sets: after an upgrade from one position per source, what was
    rotated before the file of that position was read by the older exporter; at a first start with start_at:
    end, every rotated file there is; else none."""
    if history.horizon_ns is not None:
        return history.horizon_ns
    rotated = [f.stat.st_mtime_ns for f in files if not f.live]
    legacy = {c.generation for c in history.checkpoints if c.mtime_ns == 0}
    if legacy:
        held = [f.stat.st_mtime_ns for g in legacy for f, _ in by_generation.get(g, []) if not f.live]
        if held:
            return min(held) - 1
        return max(rotated, default=-1)  # that file is gone: what was rotated before it cannot be told apart
    return max(rotated, default=-1) if start_at_end else -1


def _assign_known(checkpoint: Checkpoint, members: list[tuple[Found, bytes | None]], result: Scan) -> None:
    """One file of a known generation is read on (if anything is left in it); its twins wait for a later scan."""
    # The log itself first (what it holds past the offset is in no copy yet), then where it was read last.
    members.sort(key=lambda m: (not m[0].live, m[0].place != (checkpoint.device, checkpoint.inode), m[0].compressed))
    chosen, tail = members[0]
    readable = tail is not None and (
        chosen.live or not checkpoint.finished or (not chosen.compressed and chosen.stat.st_size > checkpoint.offset)
    )
    if readable:
        assert tail is not None
        result.targets.append(Target(chosen, checkpoint, tail))
    else:
        chosen.handle.close()
    for file, other_tail in members[1:]:
        file.handle.close()
        if readable and other_tail is not None:
            result.deferred.append(file.path)


def _assign_unknown(unknown: list[Found], fingerprint_bytes: int, result: Scan) -> None:
    """Generations never seen are read from their start, but history is not, and files that begin alike are
    read one at a time: the rest are looked at again once the first is read (then it is a known generation)."""
    groups: dict[bytes, list[Found]] = {}
    for file in unknown:
        if not file.live and not file.head:
            # Empty (logrotate rotates an empty log unless told `notifempty`): nothing to read, no generation to
            # remember. Taken as one, it was read again after every scan, ahead of the log, for ever. A plain one
            # may be the log renamed away, still appended to until its writer reopens the log: looked at later.
            file.handle.close()
            if not file.compressed:
                result.deferred.append(file.path)
            continue
        if not file.live and file.stat.st_mtime_ns <= result.horizon_ns:
            file.handle.close()
            result.history.append(file.path)
            continue
        groups.setdefault(digest(file.head[:fingerprint_bytes]), []).append(file)
    for group in groups.values():
        group.sort(key=lambda f: (f.live, f.compressed, f.stat.st_mtime_ns))
        chosen = group[0]
        chosen.handle.seek(0)
        result.targets.append(Target(chosen, None))
        for file in group[1:]:
            file.handle.close()
            result.deferred.append(file.path)


def _open(path: Path) -> BinaryIO | None:
    """A log file, decompressed if need be (None: a format we do not read, or not openable)."""
    if path.suffix in UNREADABLE_SUFFIXES:
        return None
    opener = OPENERS.get(path.suffix)
    try:
        return cast(BinaryIO, opener(path, "rb")) if opener is not None else path.open("rb")
    except OSError:
        return None


def stat_or_none(path: Path) -> os.stat_result | None:
    """The path's stat, or None if it is gone (rotation races every look at a directory)."""
    try:
        return path.stat()
    except OSError:
        return None

