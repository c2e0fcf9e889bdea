"""Cached deflate fragments splice into one valid gzip member that inflates to exactly the identity body."""

from __future__ import annotations

import asyncio
import gzip
import random
import shutil
import subprocess
import zlib

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter

from exporter import gzipcache
from exporter.contribution import LabelLimiter, LedgerShape
from exporter.endpoints import Endpoints, _body, render
from exporter.exposition import LedgerExposition
from exporter.gzipcache import Blocks, Checksum, Fragment, crc32_combine, gzip_member
from exporter.ledger import Ledger
from exporter.web import HttpServer
from tests.exposition_oracle import OM_ACCEPT, add, reference

payloads = st.binary(max_size=3000)


@given(payloads, payloads, st.integers(0, 2**32 - 1))
def test_crc32_combine_is_zlibs(a: bytes, b: bytes, start: int) -> None:
    crc_a = zlib.crc32(a, start)
    assert crc32_combine(crc_a, zlib.crc32(b), len(b)) == zlib.crc32(a + b, start)


@given(st.lists(payloads, max_size=6))
def test_checksums_chain_like_the_concatenated_bytes(chunks: list[bytes]) -> None:
    checksum = gzipcache.EMPTY
    for chunk in chunks:
        checksum = checksum.then(Checksum.of(chunk))
    assert checksum == Checksum.of(b"".join(chunks))


@settings(max_examples=50)
@given(st.integers(0, 2**40))
def test_combine_op_of_long_lengths_matches_small_steps(length: int) -> None:
    # x^(8(m+n)) = x^(8m) * x^(8n): the operator of a long length, built from two shorter ones.
    half = length // 2
    product = Checksum(0, 0, gzipcache.combine_op(half)).then(Checksum(0, 0, gzipcache.combine_op(length - half)))
    assert product.op == gzipcache.combine_op(length)


def member(blocks: Blocks[int], tail: bytes = b"") -> bytes:
    last = Fragment.of(tail, last=True)
    return gzip_member([*blocks.fragments(), last.data], blocks.checksum.then(last.checksum))


def single_member(body: bytes) -> bytes:
    """Decodes as httpx does (one gzip member) and insists nothing follows it."""
    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = decoder.decompress(body) + decoder.flush()
    assert decoder.eof and decoder.unused_data == b""
    return out


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 400), st.binary(min_size=1, max_size=90)), max_size=80),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from([40, 200, 5000]),
)
def test_blocks_hold_records_in_key_order_across_upserts(
    batches: list[list[tuple[int, bytes]]], block_bytes: int
) -> None:
    # Small blocks, so records straddle splits, replacements land in every block, and keys go before the first.
    previous = gzipcache.BLOCK_BYTES
    gzipcache.BLOCK_BYTES = block_bytes
    try:
        blocks: Blocks[int] = Blocks()
        model: dict[int, bytes] = {}
        for batch in batches:
            unique = dict(batch)
            blocks.upsert(list(unique.items()))
            model.update(unique)
            expected = b"".join(model[key] for key in sorted(model))
            assert b"".join(blocks.inflate()) == expected
            assert len(blocks) == len(model)
            assert blocks.checksum == Checksum.of(expected)
            body = member(blocks, b"# EOF\n")
            assert single_member(body) == gzip.decompress(body) == expected + b"# EOF\n"
            if len(expected) > 2 * block_bytes:
                assert len(blocks.fragments()) > 1
    finally:
        gzipcache.BLOCK_BYTES = previous


def test_an_empty_member_is_valid() -> None:
    assert single_member(member(Blocks())) == b""


def test_a_change_recompresses_only_its_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gzipcache, "BLOCK_BYTES", 1000)
    blocks: Blocks[int] = Blocks()
    blocks.upsert([(i, b"%d line of text\n" % i) for i in range(1000)])
    before = blocks.fragments()
    blocks.upsert([(500, b"changed\n")])
    after = blocks.fragments()
    assert len(before) == len(after) > 10
    assert sum(a is not b for a, b in zip(before, after, strict=True)) == 1


def exposition_with(seed: int) -> tuple[Ledger, LedgerExposition, CollectorRegistry, random.Random]:
    rng = random.Random(seed)
    ledger = Ledger(LedgerShape(("feature", "a_team", "zone")), LabelLimiter(1000, 1000, 30))
    own = CollectorRegistry()
    Counter("zenmux_exporter_things", "Self-metric.", registry=own).inc()
    return ledger, LedgerExposition(ledger), own, rng


@pytest.mark.parametrize("accept", ["text/plain", OM_ACCEPT])
def test_gzip_scrape_inflates_to_the_identity_body_across_updates(
    accept: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gzipcache, "BLOCK_BYTES", 4096)  # many blocks, splits as series are added
    ledger, exposition, own, rng = exposition_with(5)
    start = 0
    for count in (0, 40, 1, 0, 120, 3):
        add(ledger, rng, start, count)
        start += count
        compressed, content_type = _body(own, accept, exposition, True)
        identity, identity_type = _body(own, accept, exposition, False)
        assert content_type == identity_type
        assert single_member(compressed) == gzip.decompress(compressed) == identity
        # And both are prometheus_client's bytes.
        text, om = reference(ledger)
        if accept == OM_ACCEPT:
            assert identity.endswith(om + b"# EOF\n")
        else:
            assert identity.endswith(text)
    assert start > 150


def test_formats_scraped_alternately_stay_exact() -> None:
    ledger, exposition, own, rng = exposition_with(9)
    start = 0
    for count in (30, 7, 0, 12):
        add(ledger, rng, start, count)
        start += count
        for accept in ("text/plain", OM_ACCEPT) if count % 2 else (OM_ACCEPT, "text/plain"):
            compressed, _ = _body(own, accept, exposition, True)
            assert gzip.decompress(compressed) == render(own, accept, exposition)[0]


def test_cache_bytes_are_the_compressed_size_not_the_text() -> None:
    ledger, exposition, _own, rng = exposition_with(2)
    add(ledger, rng, 0, 300)
    text = exposition.render(openmetrics=False)
    assert 0 < exposition.cache_bytes() < len(text)


async def test_http_clients_decode_the_spliced_member(tmp_path_factory: pytest.TempPathFactory) -> None:
    ledger, exposition, own, rng = exposition_with(4)
    add(ledger, rng, 0, 80)
    endpoints = Endpoints(own, healthy=lambda: None, ready=lambda: None, ledger=exposition)
    server = HttpServer(endpoints.handle, "127.0.0.1", 0)
    await server.start()
    url = f"http://127.0.0.1:{server.port}/metrics"
    try:
        async with httpx.AsyncClient() as client:
            identity = await client.get(url, headers={"Accept-Encoding": "identity"})
            assert "content-encoding" not in identity.headers
            decoded = await client.get(url, headers={"Accept-Encoding": "gzip"})
            assert decoded.headers["content-encoding"] == "gzip"
            assert decoded.content == identity.content
            async with client.stream("GET", url, headers={"Accept-Encoding": "gzip"}) as response:
                raw = b"".join([chunk async for chunk in response.aiter_raw()])
            assert single_member(raw) == identity.content
        curl = shutil.which("curl")
        if curl is not None:  # curl inflates in zlib's gzip mode, which checks the CRC and length trailer
            result = await asyncio.to_thread(
                subprocess.run, [curl, "-sS", "--compressed", url], capture_output=True, check=True
            )
            assert result.stdout == identity.content
        gunzip = shutil.which("gzip")
        if gunzip is not None:  # gzip(1) verifies the CRC and length of the member
            path = tmp_path_factory.mktemp("gz") / "metrics.gz"
            path.write_bytes(raw)
            result = await asyncio.to_thread(subprocess.run, [gunzip, "-t", str(path)], capture_output=True)
            assert result.returncode == 0, result.stderr
    finally:
        await server.close()
