"""The benchmark's ZenMux API peer: the simulated API's answers served fast enough not to bound the exporter.

    <peer venv>/bin/python -m bench.fakeapi --port P --preload N --ids-out FILE [--workers W] [--stats-dir DIR]

The simulated API (exporter/simulate/) creates N billed generations; the answer to each one's lookup with the
demo key (`GET /api/v1/generation?id=` and `/api/v1/management/generation?id=`) is computed once by the
simulator's own handler and kept. The peer then
serves HTTP/1.1 with aiohttp's low-level server (its HTTP parser is C) in W forked worker processes sharing one
listening socket: a lookup of a
preloaded id gets the kept answer (with a fresh request id header, as the simulator numbers them), anything else
is handed to the simulator's handler, so answers are the simulator's byte for byte. (The simulator's own server
is the standard library's threaded http.server, a peer we did not write, for the tests; it and an h11 server
cost ~0.2-0.45 ms of CPU per request here, as much as the exporter's whole lookup.) Each worker writes its
request count and per-request service times (request parsed to answer built) to DIR/stats-<pid>.json when it
stops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from exporter.simulate.api import GENERATION_PATH, MANAGEMENT_PATH, REQUEST_ID_HEADER, SimConfig, SimulatedZenMux
from exporter.web import Request, Response

DEMO_KEY = "sk-ai-v1-demo"
MAX_SAMPLES = 200_000  # service times kept per worker (the first ones; enough for percentiles)


class _Stop(Exception):
    pass


class Peer:
    """One worker's server: the simulator and the kept answers, behind aiohttp's low-level server."""

    def __init__(self, sim: SimulatedZenMux, answers: dict[tuple[str, str], Response]) -> None:
        self.sim = sim
        self.answers = answers
        self.prefix = f"peer-{os.getpid()}-"
        self.served = 0
        self.handled = 0  # not a kept answer: the simulator's handler ran
        self.samples: list[float] = []
        self.auth = f"Bearer {DEMO_KEY}"
        from aiohttp import web  # type: ignore[import-not-found, unused-ignore]  # only in the peer's venv

        self._response = web.Response

    async def handle(self, request: Any) -> Any:  # aiohttp's BaseRequest and Response
        started = time.perf_counter()
        self.served += 1
        kept = self.answers.get((request.path, request.query.get("id", "")))
        if kept is None or request.method != "GET" or request.headers.get("Authorization") != self.auth:
            self.handled += 1
            headers = {name.lower(): value for name, value in request.headers.items()}
            kept = await self.sim.handle(
                Request(request.method, request.path, dict(request.query), headers, await request.read())
            )
            answer_headers = dict(kept.headers)
        else:
            answer_headers = {**kept.headers, REQUEST_ID_HEADER: f"{self.prefix}{self.served}"}
        response = self._response(
            status=kept.status, body=kept.body, headers={"Content-Type": kept.content_type, **answer_headers}
        )
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(time.perf_counter() - started)
        return response


def _worker(sock: socket.socket, peer: Peer, stats_dir: Path | None) -> None:
    from aiohttp import web  # type: ignore[import-not-found, unused-ignore]

    async def run() -> None:
        loop = asyncio.get_running_loop()
        runner = web.ServerRunner(web.Server(peer.handle, access_log=None), handle_signals=False)
        await runner.setup()
        await web.SockSite(runner, sock, backlog=1024).start()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(run())
    if stats_dir is not None:
        stats = {"served": peer.served, "handled": peer.handled, "samples": peer.samples}
        (stats_dir / f"stats-{os.getpid()}.json").write_text(json.dumps(stats))


def service_times(stats_dir: Path) -> dict[str, float]:
    """The workers' request count and service-time percentiles (µs), from their stats files."""
    served = handled = 0
    samples: list[float] = []
    for path in stats_dir.glob("stats-*.json"):
        data = json.loads(path.read_text())
        served += data["served"]
        handled += data["handled"]
        samples += data["samples"]
    samples.sort()
    if not samples:
        return {"served": served, "handled_by_simulator": handled}

    def pick(q: float) -> float:
        return samples[min(len(samples) - 1, int(q * len(samples)))] * 1e6

    return {"served": served, "handled_by_simulator": handled,
            "service_us_p50": pick(0.5), "service_us_p99": pick(0.99), "service_us_max": pick(1.0)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--preload", type=int, default=0, help="generations created (already billed) at start")
    parser.add_argument("--ids-out", type=Path, help="where the preloaded ids are written, one a line")
    parser.add_argument("--workers", type=int, default=2, help="worker processes sharing the listening socket")
    parser.add_argument("--stats-dir", type=Path, help="where each worker writes its service times when it stops")
    args = parser.parse_args()

    sim = SimulatedZenMux(SimConfig(billing_delay_seconds=0.0))
    created = time.time() - 3600
    ids = [sim.create(created_at=created)["generationId"] for _ in range(args.preload)]
    auth = {"authorization": f"Bearer {DEMO_KEY}"}

    async def precompute() -> dict[tuple[str, str], Response]:
        return {
            (path, gid): await sim.handle(Request("GET", path, {"id": gid}, auth))
            for path in (GENERATION_PATH, MANAGEMENT_PATH)
            for gid in ids
        }

    answers = asyncio.run(precompute())
    if args.ids_out is not None:
        args.ids_out.write_text("".join(i + "\n" for i in ids))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(1024)
    sock.setblocking(False)
    workers: list[int] = []
    for _ in range(max(1, args.workers)):
        pid = os.fork()
        if pid == 0:
            try:
                _worker(sock, Peer(sim, answers), args.stats_dir)
            finally:
                os._exit(0)
        workers.append(pid)
    print(f"ready {args.port}", flush=True)

    def stop(signum: int, frame: object) -> None:
        raise _Stop  # out of waitpid, which would otherwise be retried after the handler

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while workers:
            pid, _ = os.waitpid(-1, 0)
            workers.remove(pid)
    except (_Stop, ChildProcessError):
        pass
    for pid in workers:
        try:
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    sys.exit(0)


if __name__ == "__main__":
    main()
