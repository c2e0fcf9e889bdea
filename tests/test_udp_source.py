"""The UDP source on a real loopback socket: datagrams read together are parsed as one buffer, with the same
answers as one datagram at a time, and the buffer bound drops whole datagrams exactly where it did."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from exporter.clock import ManualClock
from exporter.config import UdpSourceConfig
from exporter.ids import (
    DATAGRAM_TOO_LARGE,
    LinesParser,
    Sighting,
    datagrams_parser_for,
    parse_datagram,
    parser_for,
)
from exporter.ingest import Ingest
from exporter.sources.udp import UdpSource
from exporter.state import StateStore
from exporter.telemetry import SelfMetrics
from tests.support import wait_until

LIMIT = 200
PLAIN = UdpSourceConfig(name="udp", format="plain", listen="127.0.0.1:0", max_datagram_bytes=LIMIT)
JSON = UdpSourceConfig(name="udp", format="json", listen="127.0.0.1:0", max_datagram_bytes=LIMIT,
                       labels={"feature": "feature"})

ids = st.from_regex(r"[A-Za-z0-9_.:-]{1,20}", fullmatch=True)
plain_datagrams = st.one_of(
    ids.map(str.encode),
    st.lists(ids, min_size=1, max_size=4).map(lambda many: "\n".join(many).encode()),
    st.sampled_from([b"", b"\n", b" a ", b"a\r", b"a\r\nb\n", b"bad id", b"\xff", b"a\n\nb", b"x" * (LIMIT + 1)]),
    st.binary(max_size=LIMIT + 5),
)
json_datagrams = st.one_of(
    st.builds(lambda i, f: json.dumps({"generation_id": i, "feature": f}).encode(), ids, st.sampled_from(["a", "b"])),
    st.builds(lambda i: json.dumps({"generation_id": i}).encode() + b"\n", ids),
    st.sampled_from([b"{}", b'{"generation_id": 7}', b"not json", b'{"generation_id": "a", "feature": 1}']),
    plain_datagrams,
)


def one_by_one(config: UdpSourceConfig, batch: list[bytes]) -> list[Sighting | str]:
    """What the source answered when it parsed each datagram on its own."""
    parse = parser_for(config)
    return [item for datagram in batch for item in parse_datagram(datagram, parse, config.max_datagram_bytes)]


@settings(max_examples=300, deadline=None)
@given(batch=st.lists(plain_datagrams, min_size=1, max_size=12))
def test_plain_datagrams_parsed_together_answer_as_one_by_one(batch: list[bytes]) -> None:
    small = [datagram for datagram in batch if len(datagram) <= LIMIT]
    assert datagrams_parser_for(PLAIN)(b"\n".join(small) + b"\n") == one_by_one(PLAIN, small)


@settings(max_examples=300, deadline=None)
@given(batch=st.lists(json_datagrams, min_size=1, max_size=12))
def test_json_datagrams_parsed_together_answer_as_one_by_one(batch: list[bytes]) -> None:
    small = [datagram for datagram in batch if len(datagram) <= LIMIT]
    assert datagrams_parser_for(JSON)(b"\n".join(small) + b"\n") == one_by_one(JSON, small)


class Harness:
    def __init__(self, tmp_path: Path, config: UdpSourceConfig, parse: LinesParser | None = None) -> None:
        self.state = StateStore(tmp_path / "state.db", max_pending=1000)
        self.registry = CollectorRegistry()
        metrics = SelfMetrics(self.registry)
        self.source = UdpSource(config, parse or datagrams_parser_for(config),
                                Ingest(self.state, metrics, ManualClock(), 0), metrics)
        self.sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, {"source": "udp", **labels}) or 0.0

    async def send_at_once(self, datagrams: list[bytes]) -> None:
        """All the datagrams are in the socket before the event loop looks at it: one readiness event reads them."""
        total = self.metric("zenmux_exporter_udp_datagrams_total") + len(datagrams)
        for datagram in datagrams:
            self.sender.sendto(datagram, ("127.0.0.1", self.source.port))
        await wait_until(lambda: self.metric("zenmux_exporter_udp_datagrams_total") >= total,
                         what="the datagrams to be read")

    async def queued(self) -> list[str]:
        assert await self.source.flush()
        return [row[0] for row in (await self.state.dump()).queue]


@pytest.fixture
async def plain(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path, UdpSourceConfig(name="udp", format="plain", listen="127.0.0.1:0",
                                                max_datagram_bytes=64, max_buffered_ids=5))
    await harness.source.start()
    yield harness
    harness.source.stop_receiving()
    harness.sender.close()
    await harness.state.close()


async def test_a_batch_that_fits_is_queued_whole(plain: Harness) -> None:
    await plain.send_at_once([b"a1", b"a2\na3", b"", b"a4"])
    assert await plain.queued() == ["a1", "a2", "a3", "a4"]
    assert plain.metric("zenmux_exporter_udp_dropped_datagrams_total") == 0


async def test_the_bound_drops_whole_datagrams_from_where_the_buffer_is_full(plain: Harness) -> None:
    # 5 ids fit: a1..a3, then b1+b2 reach the bound, so c1 and the 2-id datagram after it are dropped whole.
    await plain.send_at_once([b"a1", b"a2", b"a3", b"b1\nb2", b"c1", b"c2\nc3"])
    assert plain.metric("zenmux_exporter_udp_dropped_datagrams_total") == 2
    assert await plain.queued() == ["a1", "a2", "a3", "b1", "b2"]
    # The flush emptied the buffer: the next ids are taken again.
    await plain.send_at_once([b"d1"])
    assert await plain.queued() == ["a1", "a2", "a3", "b1", "b2", "d1"]


async def test_a_datagram_past_the_bound_is_dropped_even_when_the_last_fits(plain: Harness) -> None:
    # 4 ids buffered, then a datagram of 3 ids: admitted (the buffer was not full), then over the bound.
    await plain.send_at_once([b"a1\na2\na3\na4", b"b1\nb2\nb3", b"c1"])
    assert plain.metric("zenmux_exporter_udp_dropped_datagrams_total") == 1
    assert await plain.queued() == ["a1", "a2", "a3", "a4", "b1", "b2", "b3"]


async def test_oversized_and_malformed_datagrams_in_a_batch_are_counted_and_skipped(plain: Harness) -> None:
    await plain.send_at_once([b"a1", b"x" * 65, b"bad id", b"a2"])
    assert await plain.queued() == ["a1", "a2"]
    assert plain.metric("zenmux_exporter_ids_rejected_total", reason=DATAGRAM_TOO_LARGE) == 1
    assert plain.metric("zenmux_exporter_ids_rejected_total", reason="invalid_id") == 1
    assert plain.metric("zenmux_exporter_ids_received_total") == 2


async def test_many_datagrams_read_in_several_batches_keep_their_order(tmp_path: Path) -> None:
    harness = Harness(tmp_path, UdpSourceConfig(name="udp", format="plain", listen="127.0.0.1:0"))
    harness.sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    await harness.source.start()
    try:
        expected = [f"id{i}" for i in range(700)]  # more than one readiness event reads (READS_PER_WAKEUP)
        await harness.send_at_once([i.encode() for i in expected])
        assert await harness.queued() == expected
    finally:
        harness.source.stop_receiving()
        harness.sender.close()
        await harness.state.close()


async def test_a_failing_batch_leaves_the_socket_watched(tmp_path: Path) -> None:
    """A batch whose parse raises (a bug, not bad input: that is counted) is lost, logged by the event loop,
    and the datagrams after it are still read: the poll chain is never left broken."""
    parse = datagrams_parser_for(PLAIN)

    def fragile(data: bytes) -> list[Sighting | str]:
        if b"boom" in data:
            raise RuntimeError("a parser bug")
        return parse(data)

    harness = Harness(tmp_path, PLAIN, fragile)
    await harness.source.start()
    try:
        await harness.send_at_once([b"boom"])
        await harness.send_at_once([b"a1"])
        assert await harness.queued() == ["a1"]
    finally:
        harness.source.stop_receiving()
        harness.sender.close()
        await harness.state.close()
