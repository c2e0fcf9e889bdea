"""Rotated copies of a log: the fingerprint of what a position has read, and the one copy that holds it."""

from __future__ import annotations

import bz2
import glob
import gzip
import hashlib
import lzma
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import BinaryIO, cast

from exporter.state import FilePosition

# A position names its file by the hashes of the file's first bytes and of the bytes just before the offset:
# rotated copies that share a header (a banner, a constant prefix) still differ just before the offset.
FINGERPRINT_BYTES = 4096
TAIL_BYTES = 4096
# Rotated siblings examined for a copy holding the unread tail, newest first (a directory of old logs).
MAX_CANDIDATES = 64
# Compressed copies are read through these; other compressed suffixes are not candidates.
OPENERS: dict[str, Callable[..., object]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".lzma": lzma.open}
UNREADABLE_SUFFIXES = (".zst", ".zip")
# What a damaged or half-written compressed copy raises while it is read.
DECOMPRESS_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)
DIGEST = 18  # 2 bytes of length, 16 of SHA-256


def _digest(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + hashlib.sha256(data).digest()[:16]


def fingerprint(head: bytes, tail: bytes) -> bytes:
    """A position's identity of its file: digests of its head and of the bytes just before the offset.

    Positions saved before the tail digest existed hold the head digest only (18 bytes); both are read."""
    return _digest(head) + _digest(tail)


EMPTY_FINGERPRINT = fingerprint(b"", b"")


def read_head(handle: BinaryIO) -> bytes:
    handle.seek(0)
    return handle.read(FINGERPRINT_BYTES)


def read_tail(handle: BinaryIO, head: bytes, offset: int) -> bytes:
    """The TAIL_BYTES before `offset` (fewer if the file is shorter), `head` being already read: the handle
    only moves forward, so a compressed stream is decompressed once."""
    start = max(offset - TAIL_BYTES, 0)
    if start < len(head):
        return head[start:offset] + (handle.read(offset - len(head)) if offset > len(head) else b"")
    handle.seek(start)
    return handle.read(offset - start)


def holds(handle: BinaryIO, position: FilePosition) -> tuple[bytes, bytes] | None:
    """The (head, tail) of a file holding the very bytes the position was read up to, or None.

    The head is compared first: a compressed file with another head is not decompressed any further."""
    saved = position.fingerprint
    head = read_head(handle)
    head_length = int.from_bytes(saved[:2], "big")
    if len(head) < head_length or _digest(head[:head_length]) != saved[:DIGEST]:
        return None
    tail = read_tail(handle, head, position.offset)
    if len(tail) != min(position.offset, TAIL_BYTES):
        return None  # shorter than the offset
    if len(saved) >= 2 * DIGEST:
        tail_length = int.from_bytes(saved[DIGEST : DIGEST + 2], "big")
        if len(tail) < tail_length or _digest(tail[len(tail) - tail_length :]) != saved[DIGEST : 2 * DIGEST]:
            return None
    return head, tail


def candidates(log: Path, pattern: str) -> tuple[list[Path], int]:
    """The rotated siblings of `log` matching `pattern` (relative to its directory; "": its name followed by
    anything), newest first, at most MAX_CANDIDATES; and how many matched in all."""
    pattern = pattern or glob.escape(log.name) + "*"
    found = []
    for name in glob.glob(os.path.join(glob.escape(str(log.parent)), pattern)):
        path = Path(name)
        stat = stat_or_none(path)
        if path != log and stat is not None and S_ISREG(stat.st_mode):
            found.append((stat.st_mtime_ns, name, path))
    found.sort(reverse=True)
    return [path for _, _, path in found[:MAX_CANDIDATES]], len(found)


@dataclass
class Copy:
    """A rotated file that holds a position: open, positioned at the offset."""

    path: Path
    handle: BinaryIO
    stat: os.stat_result
    head: bytes
    tail: bytes


def find_copy(paths: list[Path], saved: FilePosition, live: os.stat_result | None) -> tuple[Copy | None, list[Path]]:
    """The one file among `paths` (the live file `live` aside) that holds the saved position, and every file
    that does; None when none or several different files do.

    A plain file with the saved inode is the renamed file itself. Any other file is recognised by content.
    The same copy under two names (app.log.1 and the app.log.1.gz gzip is writing, or one inode seen before
    and after a rename) is one copy, read from the plain file. Different files are refused rather than guessed
    between: the wrong one would count lines that were never in this log."""
    matched: list[Copy] = []
    for path in paths:
        stat = stat_or_none(path)
        if stat is None or (live is not None and (stat.st_dev, stat.st_ino) == (live.st_dev, live.st_ino)):
            continue
        handle = _open(path)
        if handle is None:
            continue
        try:
            window = holds(handle, saved)
        except DECOMPRESS_ERRORS:  # being written by gzip, or damaged
            window = None
        if window is None:
            handle.close()
            continue
        matched.append(Copy(path, handle, stat, *window))
        if path.suffix not in OPENERS and (stat.st_dev, stat.st_ino) == (saved.device, saved.inode):
            for other in matched[:-1]:
                other.handle.close()
            return matched[-1], [path]
    plain = {(m.stat.st_dev, m.stat.st_ino) for m in matched if m.path.suffix not in OPENERS}
    one = len({_base_name(m.path) for m in matched}) == 1 or (
        len(plain) == 1 and all(m.path.suffix not in OPENERS for m in matched)
    )
    chosen = min(matched, key=lambda m: m.path.suffix in OPENERS) if matched and one else None
    for m in matched:
        if m is not chosen:
            m.handle.close()
    return chosen, [m.path for m in matched]


def _open(path: Path) -> BinaryIO | None:
    """A rotated file, decompressed if need be (None: a format we do not read, or not openable)."""
    if path.suffix in UNREADABLE_SUFFIXES:
        return None
    opener = OPENERS.get(path.suffix)
    try:
        return cast(BinaryIO, opener(path, "rb")) if opener is not None else path.open("rb")
    except OSError:
        return None


def _base_name(path: Path) -> str:
    return path.name[: -len(path.suffix)] if path.suffix in OPENERS else path.name


def stat_or_none(path: Path) -> os.stat_result | None:
    """The path's stat, or None if it is gone (rotation races every look at a directory)."""
    try:
        return path.stat()
    except OSError:
        return None
