"""Tests of the traffic generator against the simulated API, with a real log file and a real UDP socket."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from exporter.simulate import SimConfig, SimulatedZenMux, serve
from exporter.simulate.traffic import generate_traffic

PAYG = "sk-ai-v1-demo"


@asynccontextmanager
async def api() -> AsyncIterator[tuple[SimulatedZenMux, str]]:
    sim = SimulatedZenMux(SimConfig(), rng=random.Random(3))
    server = await serve(sim, "127.0.0.1", 0)
    try:
        yield sim, f"http://127.0.0.1:{server.port}/"
    finally:
        await server.close()


class _Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.queue.put_nowait(data)


@asynccontextmanager
async def udp_listener() -> AsyncIterator[tuple[tuple[str, int], asyncio.Queue[bytes]]]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(_Collector, local_addr=("127.0.0.1", 0))
    try:
        host, port = transport.get_extra_info("sockname")[:2]
        yield (host, port), protocol.queue
    finally:
        transport.close()


async def drain(queue: asyncio.Queue[bytes], n: int) -> list[str]:
    return [(await asyncio.wait_for(queue.get(), 5.0)).decode() for _ in range(n)]


def read_lines(path: Path) -> list[dict[str, object]]:
    raw = path.read_bytes()
    assert raw.endswith(b"\n") or not raw
    return [json.loads(line) for line in raw.splitlines()]


def stop_after(n: int, stop: asyncio.Event, then: Callable[[int], None] | None = None) -> httpx.AsyncClient:
    """A client that sets stop once n create responses have come back (no sleeping to end a run)."""
    seen = 0

    async def hook(_response: httpx.Response) -> None:
        nonlocal seen
        seen += 1
        if then is not None:
            then(seen)
        if seen >= n:
            stop.set()

    hooks: dict[str, list[Callable[[httpx.Response], Awaitable[None]]]] = {"response": [hook]}
    return httpx.AsyncClient(timeout=5.0, event_hooks=hooks)


async def test_log_lines(tmp_path: Path) -> None:
    log_path = tmp_path / "app.log"
    async with api() as (sim, url):
        ids = await generate_traffic(
            url, PAYG, rate_per_second=500, stop=asyncio.Event(), log_path=log_path, udp_target=None, count=12
        )
    assert len(ids) == 12 and len(set(ids)) == 12
    lines = read_lines(log_path)
    assert [line["generation_id"] for line in lines] == ids
    for line in lines:
        assert {"ts", "level", "msg", "generation_id", "model", "feature"} <= set(line)
        assert line["feature"] in ("chat", "search", "summarize")
        rec = sim.record(str(line["generation_id"]))
        assert rec is not None and line["model"] == rec["model"]
    sizes = [len(raw) for raw in log_path.read_bytes().splitlines()]
    assert 200 <= sum(sizes) / len(sizes) <= 320


async def test_udp_datagrams() -> None:
    async with api() as (sim, url), udp_listener() as (target, queue):
        ids = await generate_traffic(
            url, PAYG, rate_per_second=500, stop=asyncio.Event(), log_path=None, udp_target=target, count=8
        )
        received = await drain(queue, 8)
    assert sorted(received) == sorted(ids)
    assert all(sim.record(i) is not None for i in ids)


async def test_both_outputs_alternate_and_each_id_goes_to_one(tmp_path: Path) -> None:
    log_path = tmp_path / "app.log"
    async with api() as (sim, url), udp_listener() as (target, queue):
        ids = await generate_traffic(
            url,
            PAYG,
            rate_per_second=500,
            stop=asyncio.Event(),
            log_path=log_path,
            udp_target=target,
            count=10,
            features=("checkout",),
        )
        by_udp = await drain(queue, 5)
        assert queue.empty()
    by_log = [str(line["generation_id"]) for line in read_lines(log_path)]
    assert by_log == ids[0::2]
    assert sorted(by_udp) == sorted(ids[1::2])
    assert set(by_log).isdisjoint(by_udp)
    assert {line["feature"] for line in read_lines(log_path)} == {"checkout"}
    assert len(sim.records()) == 10


async def test_stop_ends_the_run(tmp_path: Path) -> None:
    stop = asyncio.Event()
    async with api() as (_sim, url), stop_after(3, stop) as client:
        ids = await generate_traffic(
            url, PAYG, rate_per_second=500, stop=stop, log_path=tmp_path / "a.log", udp_target=None, client=client
        )
        assert not client.is_closed  # a caller's client stays the caller's
    assert len(ids) == 3
    assert len(read_lines(tmp_path / "a.log")) == 3


async def test_stop_interrupts_pacing(tmp_path: Path) -> None:
    stop = asyncio.Event()
    async with api() as (_sim, url), stop_after(1, stop) as client:
        # The second create would be due in 100 s; setting stop must end the wait now.
        run = generate_traffic(
            url, PAYG, rate_per_second=0.01, stop=stop, log_path=None, udp_target=None, client=client
        )
        ids = await asyncio.wait_for(run, 5.0)
    assert len(ids) == 1


async def test_follows_log_rotation(tmp_path: Path) -> None:
    log_path = tmp_path / "app.log"
    rotated = tmp_path / "app.log.1"

    def rotate(seen: int) -> None:
        if seen == 3:
            log_path.rename(rotated)

    stop = asyncio.Event()
    async with api() as (_sim, url), stop_after(6, stop, rotate) as client:
        ids = await generate_traffic(
            url, PAYG, rate_per_second=500, stop=stop, log_path=log_path, udp_target=None, client=client
        )
    old, new = read_lines(rotated), read_lines(log_path)
    assert [line["generation_id"] for line in old + new] == ids
    assert len(old) == 2 and len(new) == 4


async def test_failed_creates_are_skipped(tmp_path: Path) -> None:
    stop = asyncio.Event()
    async with api() as (sim, url), stop_after(3, stop) as client:
        ids = await generate_traffic(
            url,
            "sk-ai-v1-wrong",
            rate_per_second=500,
            stop=stop,
            log_path=tmp_path / "a.log",
            udp_target=None,
            client=client,
        )
    assert ids == []
    assert (tmp_path / "a.log").read_bytes() == b""
    assert sim.records() == []


async def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="rate_per_second"):
        await generate_traffic(
            "http://x", PAYG, rate_per_second=0, stop=asyncio.Event(), log_path=None, udp_target=None
        )
    with pytest.raises(ValueError, match="features"):
        await generate_traffic(
            "http://x", PAYG, rate_per_second=1, stop=asyncio.Event(), log_path=None, udp_target=None, features=()
        )
