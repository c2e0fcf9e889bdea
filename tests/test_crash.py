"""Crash loop: the exporter as a real process, SIGKILLed again and again on one state file, while a writer
appends ids to a log rotated both ways and sends more over UDP, against the simulated API in another process
(with faults). At the end /metrics equals the API's ground truth for exactly the ids that were received.

Default: >= 12 kills in well under a minute. `pytest --soak` enlarges the loop (60 kills, ~4x the ids).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from exporter.simulate.api import totals
from tests.support import PAYG_KEY, samples, value, wait_until

# These helpers live in tests/support.py; their names stay importable from here for tests written against them.
from tests.support import PYTHON as PYTHON
from tests.support import ApiProcess as ApiProcess
from tests.support import api_process as api_process
from tests.support import free_port as free_port
from tests.support import metrics_text as metrics_text
from tests.support import spawn_exporter as spawn_exporter
from tests.support import wait_ready as wait_ready
from tests.support import write_config as write_config

pytestmark = pytest.mark.slow  # a minute of kill -9 against real processes

# A UDP id sent this long before a kill, or later, may be lost with the process (socket and 50 ms buffer).
UDP_EDGE_SECONDS = 1.0


def read_state(path: Path) -> tuple[dict[str, int], tuple[int, int] | None]:
    """(id -> status, (inode, offset) of the file source) read from the exporter's database, read-only."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        ids = {row[0]: int(row[1]) for row in db.execute("SELECT id, status FROM generations")}
        row = db.execute("SELECT inode, offset FROM positions WHERE source = 'app-log'").fetchone()
        return ids, None if row is None else (int(row[0]), int(row[1]))
    finally:
        db.close()


def read_position(path: Path) -> tuple[int, int] | None:
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            row = db.execute("SELECT inode, offset FROM positions WHERE source = 'app-log'").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return None
    return None if row is None else (int(row[0]), int(row[1]))


def read_saved(state: Path) -> tuple[int, int, bytes] | None:
    """(inode, offset, fingerprint) the exporter has saved for the log in its SQLite state, None before."""
    try:
        db = sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=1)
        try:
            row = db.execute("SELECT inode, offset, fingerprint FROM positions WHERE source = 'app-log'").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return None
    return None if row is None else (int(row[0]), int(row[1]), bytes(row[2]))


def exporter_in_current_file(saved: tuple[int, int, bytes] | None, log: Path, *, at_start: bool) -> bool:
    """Whether the exporter's saved position is in the log as it is now: same inode and the same first bytes
    (not a generation since copied and truncated). `at_start`: whether byte 0 counts (it says nothing of
    which generation it was read in)."""
    if saved is None or saved[0] != log.stat().st_ino:
        return False
    if saved[1] == 0:
        return at_start
    fingerprint = saved[2]
    length = int.from_bytes(fingerprint[:2], "big")
    with log.open("rb") as handle:
        head = handle.read(length)
    return len(head) == length and hashlib.sha256(head).digest()[:16] == fingerprint[2:18]


def gzip_file(path: Path) -> Path:
    """logrotate's `compress`, as gzip does it: write path.gz, then remove path."""
    target = path.with_name(path.name + ".gz")
    with path.open("rb") as plain, gzip.open(target, "wb") as packed:
        shutil.copyfileobj(plain, packed)
    path.unlink()
    return target


def recovered_lines(log: Path) -> int:
    """Lines the exporter's lives read from rotated copies (their log lines)."""
    total = 0
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if ": read " in line and " lines from " in line:
            total += int(line.split(": read ", 1)[1].split()[0])
    return total


def listening_times(log: Path) -> list[float]:
    """When each life's UDP socket was bound (its log line follows the bind), as epoch seconds."""
    times = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if "listening for ids on udp" in line:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            times.append(stamp.timestamp())
    return times


@dataclass
class Run:
    """What happened: the phases of the exporter process and what the writer sent through which channel."""

    windows: list[tuple[float, float]] = field(default_factory=list)  # (ready, killed) per life
    dead_windows: list[tuple[float, float]] = field(default_factory=list)  # (reaped, respawned)
    file_ids: set[str] = field(default_factory=set)
    udp_sent: list[tuple[str, float]] = field(default_factory=list)
    duplicates_sent: int = 0
    rotations: dict[str, int] = field(
        default_factory=lambda: {
            "rename": 0, "copytruncate": 0, "compressed": 0, "while_down": 0, "forced_while_down": 0
        }
    )
    kills: dict[str, int] = field(default_factory=lambda: {"random": 0, "lookups_inflight": 0, "burst_ingest": 0})
    rotated: int = 0


class Writer:
    """The application: creates generations at the API, logs their ids (rotating the log), sends some by UDP."""

    def __init__(self, run: Run, logs: Path, state: Path, api_url: str, udp_port: int, rng: random.Random) -> None:
        self.run = run
        self.log = logs / "app.log"
        self.logs = logs
        self.state = state
        self.api_url = api_url
        self.udp_port = udp_port
        self.rng = rng
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.all_ids: list[str] = []
        # Held while a copytruncate copies and truncates: nothing is appended in between (such lines are lost
        # by copytruncate itself, exporter or not: logrotate's own race, see README).
        self.rotating = asyncio.Lock()
        self.uncompressed: list[Path] = []  # rotated files `delaycompress` compresses at the next rotation
        self.exporter_down = True

    def saved(self) -> tuple[int, int, bytes] | None:
        """(inode, offset, fingerprint) the exporter has saved for the log, None before its first save."""
        return read_saved(self.state)

    async def create(self, client: httpx.AsyncClient, n: int) -> list[str]:
        async def one() -> str:
            response = await client.post(f"{self.api_url}/api/v1/generations", json={})
            response.raise_for_status()
            return str(response.json()["id"])

        return list(await asyncio.gather(*(one() for _ in range(n))))

    def append(self, ids: list[str]) -> None:
        with self.log.open("a", encoding="utf-8") as handle:
            for generation_id in ids:
                feature = self.rng.choice(("chat", "search", "agent"))
                handle.write(json.dumps({"level": "info", "generation_id": generation_id, "feature": feature}) + "\n")
        self.run.file_ids.update(ids)

    def send_udp(self, ids: list[str]) -> None:
        now = time.time()
        for start in range(0, len(ids), 5):
            chunk = ids[start : start + 5]
            with contextlib.suppress(OSError):  # ECONNREFUSED from an earlier datagram while nobody listened
                self.sock.sendto("\n".join(chunk).encode(), ("127.0.0.1", self.udp_port))
            self.run.udp_sent.extend((i, now) for i in chunk)

    async def maybe_rotate(self) -> None:
        """Rotates as logrotate does, at any moment, the exporter alive or not: rename, or copytruncate (the
        exporter reads the unread tail from the copy), each with no compression, `compress` (the rotated file
        becomes .gz at once) or `delaycompress` (the previous one does). Only once the exporter has read into
        the current file: two rotations in one downtime would hide a whole file from it, and so would a
        copytruncate of a file it has read nothing of (README)."""
        copy = self.rng.random() < 0.5
        if not exporter_in_current_file(self.saved(), self.log, at_start=not copy):
            return
        target = self.next_rotated()
        if copy:
            await self.copytruncate(target)
        else:
            os.rename(self.log, target)
            self.log.touch()
            self.run.rotations["rename"] += 1
        compress = self.rng.choice(("none", "compress", "delaycompress"))
        if compress == "compress":
            self.compress(target)
            return
        if compress == "delaycompress":
            while self.uncompressed:
                self.compress(self.uncompressed.pop())
        self.uncompressed.append(target)

    def next_rotated(self) -> Path:
        self.run.rotated += 1
        if self.exporter_down:
            self.run.rotations["while_down"] += 1
        return self.logs / f"app.log.{self.run.rotated}"

    async def copytruncate(self, target: Path) -> None:
        async with self.rotating:
            shutil.copyfile(self.log, target)
            with self.log.open("r+b") as handle:
                handle.truncate(0)
        self.run.rotations["copytruncate"] += 1

    def compress(self, path: Path) -> None:
        gzip_file(path)
        self.run.rotations["compressed"] += 1

    async def rotate_while_down(self, client: httpx.AsyncClient) -> bool:
        """The exporter is dead: lines it has not read are logged, then the log is copied, truncated and the
        copy compressed. Their ids must be read from the .gz at the next start."""
        await self.burst(client, self.rng.randint(5, 25))
        if not exporter_in_current_file(self.saved(), self.log, at_start=False):
            return False
        target = self.next_rotated()
        await self.copytruncate(target)
        self.compress(target)
        self.run.rotations["forced_while_down"] += 1
        return True

    async def burst(self, client: httpx.AsyncClient, n: int) -> None:
        ids = await self.create(client, n)
        self.all_ids.extend(ids)
        async with self.rotating:
            self.append(ids)

    async def loop(self, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {PAYG_KEY}"}, timeout=10) as client:
            while not stop.is_set():
                ids = await self.create(client, self.rng.randint(5, 25))
                self.all_ids.extend(ids)
                if self.rng.random() < 0.1 and len(self.all_ids) > 50:
                    ids.append(self.rng.choice(self.all_ids[:-30]))  # a duplicate sighting, maybe across channels
                    self.run.duplicates_sent += 1
                if self.rng.random() < 0.7:
                    self.append(ids)
                else:
                    self.send_udp(ids)
                if self.rng.random() < 0.06:
                    await self.maybe_rotate()
                await asyncio.sleep(self.rng.uniform(0.01, 0.08))  # pacing, like an application's traffic

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def soak(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--soak", default=False))


@contextlib.asynccontextmanager
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


async def test_exactly_once_through_kill_9_rotation_and_api_faults(tmp_path: Path, soak: bool) -> None:
    kills_wanted = 60 if soak else 12
    seed = int(os.environ.get("CRASH_SEED", random.randrange(1 << 30)))
    # Printed before anything runs, so a failure's captured output names the seed that reproduces it.
    print(f"crash-loop seed: {seed} (rerun with CRASH_SEED={seed})", flush=True)
    rng = random.Random(seed)
    logs, state_dir = tmp_path / "logs", tmp_path / "state"
    logs.mkdir()
    state_dir.mkdir()
    state = state_dir / "state.db"
    (logs / "app.log").touch()
    metrics_port, udp_port = free_port(), free_port(socket.SOCK_DGRAM)
    exporter_log = tmp_path / "exporter.log"
    faults = ["server_error=0.04", "reset=0.02", "truncated=0.02", "malformed=0.02",
              "oversized=0.01", "slow=0.01"]
    with api_process("--billing-delay", "0.4", *(a for f in faults for a in ("--fault", f)),
                     log=tmp_path / "api.log") as api:
        config = write_config(
            tmp_path / "config.yaml",
            {
                "zenmux": {
                    "base_url": api.url,
                    "api_key": PAYG_KEY,
                    "timeout_seconds": 0.5,
                    "connect_timeout_seconds": 0.5,
                    "concurrency": 16,
                    "max_requests_per_second": 2000,
                    "max_response_bytes": 256 * 1024,
                },
                "resolve": {
                    "billing_delay_seconds": 0.2,
                    "retry_initial_seconds": 0.05,
                    "retry_max_seconds": 0.3,
                    "give_up_after_seconds": 3600,
                },
                "sources": [
                    {"type": "file", "name": "app-log", "path": str(logs / "app.log"), "format": "json",
                     "start_at": "beginning", "poll_interval_seconds": 0.02, "labels": {"feature": "feature"}},
                    {"type": "udp", "name": "udp", "listen": f"127.0.0.1:{udp_port}", "format": "plain"},
                ],
                "state": {"path": str(state)},
                "metrics": {"listen": f"127.0.0.1:{metrics_port}", "extra_labels": ["feature"]},
                "shutdown": {"drain_seconds": 0},
                "log": {"level": "info"},
            },
        )
        run = Run()
        writer = Writer(run, logs, state, api.url, udp_port, rng)
        stop_writing = asyncio.Event()
        writing = asyncio.create_task(writer.loop(stop_writing))
        started = time.time()
        run.dead_windows.append((started, float("inf")))
        async with http() as client, httpx.AsyncClient(
            headers={"Authorization": f"Bearer {PAYG_KEY}"}, timeout=10
        ) as api_client:
            process: subprocess.Popen[bytes] | None = None
            try:
                for life in range(kills_wanted):
                    respawn = time.time()
                    if run.dead_windows:
                        run.dead_windows[-1] = (run.dead_windows[-1][0], respawn)
                    writer.exporter_down = False
                    process = spawn_exporter(config, exporter_log)
                    await wait_ready(process, metrics_port, client)
                    ready = time.time()
                    how = rng.choice(("random", "random", "lookups_inflight", "burst_ingest"))
                    await asyncio.sleep(rng.uniform(0.2, 1.5))  # a random moment: this is what is under test
                    if how == "lookups_inflight":
                        async def lookups_inflight() -> bool:
                            text = await metrics_text(metrics_port, client)
                            return text is not None and value(text, "zenmux_exporter_inflight_lookups") > 0

                        with contextlib.suppress(AssertionError):
                            await wait_until(lookups_inflight, timeout=3)
                    elif how == "burst_ingest":
                        await writer.burst(api_client, 300)  # a big chunk: its enqueue is being written now
                        await asyncio.sleep(rng.uniform(0, 0.05))
                    assert process.poll() is None, f"exporter died by itself: see {exporter_log}"
                    process.send_signal(signal.SIGKILL)
                    killed = time.time()
                    process.wait()
                    writer.exporter_down = True
                    run.kills[how] += 1
                    run.windows.append((ready, killed))
                    run.dead_windows.append((time.time(), float("inf")))
                    # Every third death (and the last ones until it happened): lines written and the log
                    # copied, truncated and compressed before the exporter comes back.
                    if life % 3 == 1 or (life >= kills_wanted - 3 and not run.rotations["forced_while_down"]):
                        await writer.rotate_while_down(api_client)
                    await asyncio.sleep(rng.uniform(0, 0.3))  # dead for a while: datagrams now go nowhere
                stop_writing.set()
                await writing
                # The last life: runs until everything durably received is resolved.
                run.dead_windows[-1] = (run.dead_windows[-1][0], time.time())
                writer.exporter_down = False
                process = spawn_exporter(config, exporter_log)
                await wait_ready(process, metrics_port, client)

                async def caught_up() -> bool:
                    position = read_position(state)
                    stat = (logs / "app.log").stat()
                    if position != (stat.st_ino, stat.st_size):  # read to the end (lost ids are reported below)
                        return False
                    text = await metrics_text(metrics_port, client)
                    return text is not None and value(text, "zenmux_exporter_pending_ids") == 0

                await wait_until(caught_up, timeout=120 if soak else 60, what="every received id resolved")
                text = await metrics_text(metrics_port, client)
                assert text is not None
                ids, _ = read_state(state)
                process.send_signal(signal.SIGTERM)
                assert process.wait(30) == 0
            finally:
                stop_writing.set()
                if process is not None and process.poll() is None:
                    process.kill()
                    process.wait()
                writer.close()
            records = {r["generationId"]: r for r in (await api_client.get(f"{api.url}/_sim/records")).json()}
            sim_stats = (await api_client.get(f"{api.url}/_sim/stats")).json()

    # Every id the exporter holds is resolved, exactly once; the file lost nothing.
    assert set(ids.values()) == {1}, "ids neither pending nor abandoned at the end"
    missing_file_ids = run.file_ids - ids.keys()
    assert not missing_file_ids, f"{len(missing_file_ids)} logged ids were never read"
    # UDP, accounted id by id: sent while no process listened -> lost (all of them); sent to a listening
    # exporter more than UDP_EDGE_SECONDS before its kill -> counted (all of them); sent in that last stretch
    # (the socket buffer and the 50 ms flush buffer die with the process) -> either, reported.
    listening = listening_times(exporter_log)
    assert len(listening) == len(run.windows) + 1
    kills_at = [killed for _, killed in run.windows] + [float("inf")]
    margin = 0.005  # the log's millisecond timestamps
    not_listening = [(reaped, heard - margin) for (reaped, _), heard in zip(run.dead_windows, listening, strict=True)]
    firm = [(heard + margin, killed - UDP_EDGE_SECONDS) for heard, killed in zip(listening, kills_at, strict=True)]
    sightings: dict[str, list[float]] = {}
    for generation_id, sent in run.udp_sent:
        sightings.setdefault(generation_id, []).append(sent)

    def within(t: float, windows: list[tuple[float, float]]) -> bool:
        return any(start <= t <= end for start, end in windows)

    udp_only = {i: ts for i, ts in sightings.items() if i not in run.file_ids}
    sent_dead = {i for i, ts in udp_only.items() if all(within(t, not_listening) for t in ts)}
    sent_alive = {i for i, ts in udp_only.items() if any(within(t, firm) for t in ts)}
    counted_dead = sent_dead & ids.keys()
    assert not counted_dead, f"{len(counted_dead)} datagrams sent while no exporter listened were counted"
    lost_alive = sent_alive - ids.keys()
    assert not lost_alive, f"{len(lost_alive)} ids sent by UDP to a running exporter were lost"
    udp_edge_lost = set(udp_only) - ids.keys() - sent_dead
    edge_ages = [  # how long before its kill each such id was sent (sightings while nobody listened aside)
        min(k - t for k in kills_at if k >= t)
        for i in udp_edge_lost
        for t in udp_only[i]
        if not within(t, not_listening)
    ]
    received = ids.keys()
    assert received <= records.keys()
    truth = totals(records[i] for i in received)
    assert value(text, "zenmux_generations_total") == truth["generations"] == len(received)
    for kind in ("prompt", "completion", "reasoning", "cached"):
        assert value(text, "zenmux_tokens_total", token_type=kind) == truth[f"{kind}_tokens"], kind
    assert value(text, "zenmux_cost_usd_total") == pytest.approx(truth["billAmount"], rel=1e-9)
    assert value(text, "zenmux_cost_origin_usd_total") == pytest.approx(truth["originAmount"], rel=1e-9)
    assert value(text, "zenmux_cost_discount_usd_total") == pytest.approx(truth["discountAmount"], rel=1e-9, abs=1e-9)
    assert value(text, "zenmux_credits_total") == pytest.approx(truth["usage"], rel=1e-9)
    assert value(text, "zenmux_cost_by_fee_item_usd_total") == pytest.approx(truth["billAmount"], rel=1e-9)
    assert value(text, "zenmux_upstream_retries_total") == truth["retries"]
    outcomes = {lbl["outcome"]: v for n, lbl, v in samples(text) if n == "zenmux_exporter_lookups_total"}
    report = {
        "seed": seed,
        "kills": sum(run.kills.values()),
        "kills_by_moment": run.kills,
        "rotations": run.rotations,
        "ids_created": len(writer.all_ids),
        "ids_logged": len(run.file_ids),
        "ids_sent_udp": len(sightings),
        "udp_lost_while_dead": len(sent_dead),
        "udp_lost_in_last_moments_before_a_kill": len(udp_edge_lost),
        "udp_lost_max_seconds_before_kill": round(max(edge_ages, default=0.0), 3),
        "duplicate_sightings": run.duplicates_sent,
        "ids_resolved": len(received),
        "file_ids_lost": len(missing_file_ids),
        "lines_read_from_rotated_copies": recovered_lines(exporter_log),
        "api_faults_injected": sim_stats["faults"],
        "last_life_lookup_outcomes": outcomes,
        "seconds": round(time.time() - started, 1),
    }
    print("crash-loop report:", json.dumps(report))
    (tmp_path / "report.json").write_text(json.dumps(report, indent=2))
    assert sum(run.kills.values()) == kills_wanted >= 10
    # The copytruncates while the exporter was down happened, and their unread tails came from the .gz copies
    # (counted once: the totals above equal the API's truth for exactly the ids received).
    assert run.rotations["forced_while_down"] >= 1
    assert report["lines_read_from_rotated_copies"] > 0
