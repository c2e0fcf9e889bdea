"""Deflate fragments that concatenate into one gzip member, so /metrics compresses only what changed."""

from __future__ import annotations

import struct
import zlib
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Generic, NamedTuple, Protocol, Self, TypeVar

# Level 1: the body is re-sent every scrape but compressed once per change; higher levels buy ~10 % of size
# for several times the CPU on every changed block.
LEVEL = 1
# Uncompressed bytes per block: 128 KiB compresses within ~4 % of one whole-body stream (each block starts
# with an empty window; 64 KiB cost ~7 %, 16 KiB ~26 %) and re-compressing one costs ~0.2 ms. A block is
# split when it grows past twice this.
BLOCK_BYTES = 128 * 1024

_POLY = 0xEDB88320  # CRC-32 (gzip's), bit-reflected: bit 31 is x^0
_ONE = 1 << 31  # the polynomial 1 in that representation
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, no mtime, unknown OS


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial, over GF(2) (zlib's multmodp)."""
    m = _ONE
    p = 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _powers() -> list[int]:
    """x^(2^k) modulo the polynomial for k = 0..31 (zlib's x2n_table)."""
    table = [_ONE >> 1]  # x^1
    for _ in range(31):
        table.append(_multmodp(table[-1], table[-1]))
    return table


_X2N = _powers()


def combine_op(length: int) -> int:
    """x^(8 * length) modulo the polynomial: what appending `length` bytes multiplies an earlier CRC by."""
    p = _ONE
    k = 3  # 8 bits a byte = 2^3
    while length:
        if length & 1:
            p = _multmodp(_X2N[k & 31], p)
        length >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """zlib.crc32(a + b) from zlib.crc32(a), zlib.crc32(b) and len(b), without reading the bytes.

    zlib's crc32_combine, which Python's zlib does not expose: since zlib 1.2.12 it multiplies by
    x^(8 * len(b)) modulo the polynomial instead of squaring 32x32 GF(2) matrices; the same arithmetic,
    and the operator can be kept with a fragment, so combining is one multiplication."""
    return _multmodp(combine_op(length2), crc1) ^ crc2


class Checksum(NamedTuple):
    """The gzip trailer's view of some bytes: CRC-32, length, and the operator for appending them."""

    crc: int
    length: int
    op: int  # combine_op(length), kept so `then` needs no exponentiation

    @classmethod
    def of(cls, data: bytes) -> Checksum:
        return cls(zlib.crc32(data), len(data), combine_op(len(data)))

    def then(self, other: Checksum) -> Checksum:
        """The checksum of these bytes followed by `other`'s."""
        return Checksum(
            _multmodp(other.op, self.crc) ^ other.crc, self.length + other.length, _multmodp(self.op, other.op)
        )


EMPTY = Checksum(0, 0, _ONE)


@dataclass(frozen=True, slots=True)
class Fragment:
    """Raw deflate data of some bytes, compressed with a fresh compressor (no back-references before it)
    and ended byte-aligned by a full flush (not final), or ended as the stream's final block."""

    data: bytes
    checksum: Checksum

    @classmethod
    def of(cls, raw: bytes, *, last: bool = False) -> Self:
        compressor = zlib.compressobj(LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = compressor.compress(raw) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_FULL_FLUSH)
        return cls(data, Checksum.of(raw))

    def inflate(self) -> bytes:
        return zlib.decompressobj(-zlib.MAX_WBITS).decompress(self.data)


def gzip_member(parts: Sequence[bytes], checksum: Checksum) -> bytes:
    """One gzip member from raw deflate parts (fragments, the last one final) and their bytes' checksum."""
    trailer = struct.pack("<II", checksum.crc, checksum.length & 0xFFFFFFFF)
    return b"".join([_GZIP_HEADER, *parts, trailer])


class _Ordered(Protocol):
    def __lt__(self, other: Self, /) -> bool: ...


K = TypeVar("K", bound=_Ordered)


@dataclass(slots=True)
class _Block(Generic[K]):
    keys: list[K]
    sizes: array[int]  # each record's length, in key order
    fragment: Fragment


class Blocks(Generic[K]):
    """Byte records in key order, held only compressed, in blocks of ~BLOCK_BYTES.

    Replacing or inserting records re-compresses just the blocks they fall in (inflate, splice, deflate).
    Memory is the compressed bytes plus ~12 bytes a record (the keys are the caller's objects). Not
    thread-safe: the caller serialises use."""

    def __init__(self) -> None:
        self._blocks: list[_Block[K]] = []
        self._firsts: list[K] = []  # each block's first key, for bisect
        self._checksum: Checksum | None = EMPTY

    def upsert(self, records: list[tuple[K, bytes]]) -> None:
        """Sets each key's record (keys unique), keeping key order."""
        if not records:
            return
        records.sort(key=_first)
        touched: dict[int, list[tuple[K, bytes]]] = {}
        for record in records:
            at = max(bisect_right(self._firsts, record[0]) - 1, 0)
            touched.setdefault(at, []).append(record)
        # Right to left, so splitting a block does not move the blocks still to do.
        for at in sorted(touched, reverse=True):
            if self._blocks:
                keys, sizes, raw = _merge(self._blocks[at], touched[at])
            else:
                keys = [key for key, _ in records]
                sizes = array("I", [len(data) for _, data in records])
                raw = b"".join(data for _, data in records)
            fresh = _blockify(keys, sizes, raw)
            self._blocks[at : at + 1] = fresh
            self._firsts[at : at + 1] = [block.keys[0] for block in fresh]
        self._checksum = None

    @property
    def checksum(self) -> Checksum:
        if self._checksum is None:
            # One multiplication a block (its operator was computed when it was compressed); the total's
            # operator once, from the total length.
            crc = 0
            length = 0
            for block in self._blocks:
                crc = _multmodp(block.fragment.checksum.op, crc) ^ block.fragment.checksum.crc
                length += block.fragment.checksum.length
            self._checksum = Checksum(crc, length, combine_op(length))
        return self._checksum

    def fragments(self) -> list[bytes]:
        return [block.fragment.data for block in self._blocks]

    def inflate(self) -> list[bytes]:
        return [block.fragment.inflate() for block in self._blocks]

    def __len__(self) -> int:
        return sum(len(block.keys) for block in self._blocks)

    def nbytes(self) -> int:
        """Bytes held beyond the keys themselves: compressed data, sizes, list slots."""
        return sum(
            len(block.fragment.data) + block.sizes.itemsize * len(block.sizes) + 8 * len(block.keys) + 200
            for block in self._blocks
        )


def _first(record: tuple[K, bytes]) -> K:
    return record[0]


def _merge(block: _Block[K], changes: list[tuple[K, bytes]]) -> tuple[list[K], array[int], bytes]:
    """The block's keys, sizes and bytes with `changes` (sorted) replacing or inserted among its records.

    Slices between the changed records are copied whole: no Python-level work per unchanged record."""
    raw = block.fragment.inflate()
    offsets = [0, *accumulate(block.sizes)]
    keys: list[K] = []
    sizes: array[int] = array("I")
    pieces: list[bytes] = []
    done = 0  # records of the block already taken
    for key, data in changes:
        i = bisect_left(block.keys, key, done)
        keys += block.keys[done:i]
        sizes += block.sizes[done:i]
        pieces.append(raw[offsets[done] : offsets[i]])
        keys.append(key)
        sizes.append(len(data))
        pieces.append(data)
        done = i + 1 if i < len(block.keys) and not key < block.keys[i] else i  # the same key: replaced
    keys += block.keys[done:]
    sizes += block.sizes[done:]
    pieces.append(raw[offsets[done] :])
    return keys, sizes, b"".join(pieces)


def _blockify(keys: list[K], sizes: array[int], raw: bytes) -> list[_Block[K]]:
    """Compressed blocks of the records, in order: one if they fit in 2 x BLOCK_BYTES, else about equal
    ones of ~BLOCK_BYTES (no small remainder block, which would compress worse)."""
    if len(raw) <= 2 * BLOCK_BYTES:
        return [_Block(keys, sizes, Fragment.of(raw))]
    pieces = round(len(raw) / BLOCK_BYTES)
    ends = list(accumulate(sizes))
    blocks: list[_Block[K]] = []
    start = 0
    for n in range(1, pieces + 1):
        # The first record ending at or past this piece's share; at least one record a block.
        stop = len(keys) if n == pieces else max(bisect_left(ends, len(raw) * n / pieces) + 1, start + 1)
        if stop <= start:
            continue
        begin = ends[start - 1] if start else 0
        blocks.append(_Block(keys[start:stop], sizes[start:stop], Fragment.of(raw[begin : ends[stop - 1]])))
        start = stop
        if start == len(keys):
            break
    return blocks
