"""The crash tests' application and bookkeeping: a writer that logs ids, rotates its log as logrotate does
and sends ids by UDP, the run's record, and readers of the exporter's saved file position."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import random
import shutil
import socket
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx

from tests.support import PAYG_KEY

# A UDP id sent this long before a kill, or later, may be lost with the process (socket and 50 ms buffer).
UDP_EDGE_SECONDS = 1.0


def _reading(db: sqlite3.Connection) -> tuple[int, int, bytes] | None:
    """(inode, offset, head digest) of the generation the file source reads now: its newest unfinished one."""
    row = db.execute(
        "SELECT inode, offset, head FROM checkpoints WHERE source = 'app-log' AND NOT finished "
        "ORDER BY generation DESC LIMIT 1"
    ).fetchone()
    return None if row is None else (int(row[0]), int(row[1]), bytes(row[2]))


def read_state(path: Path) -> tuple[dict[str, int], tuple[int, int] | None]:
    """(id -> status, (inode, offset) of the file source) read from the exporter's database, read-only."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        ids = {row[0]: int(row[1]) for row in db.execute("SELECT id, status FROM generations")}
        saved = _reading(db)
        return ids, None if saved is None else saved[:2]
    finally:
        db.close()


def read_saved(state: Path) -> tuple[int, int, bytes] | None:
    """(inode, offset, head digest) the exporter has saved for the log it reads in its SQLite state."""
    try:
        db = sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=1)
        try:
            return _reading(db)
        finally:
            db.close()
    except sqlite3.Error:
        return None


def read_position(state: Path) -> tuple[int, int] | None:
    """(inode, offset) the exporter has saved for the log, None before its first save."""
    saved = read_saved(state)
    return None if saved is None else saved[:2]


def checkpoints(state: Path) -> list[tuple[int, int, int]]:
    """Every checkpoint of the log as (generation, offset, finished): what the exporter has read, by generation."""
    try:
        db = sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=1)
        try:
            rows = db.execute(
                "SELECT generation, offset, finished FROM checkpoints WHERE source = 'app-log' ORDER BY generation"
            ).fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return []
    return [(int(g), int(o), int(f)) for g, o, f in rows]


def gzip_file(path: Path) -> Path:
    """logrotate's `compress`, as gzip(1) does it: write path.gz (with the file's times), then remove path."""
    target = path.with_name(path.name + ".gz")
    stat = path.stat()
    with path.open("rb") as plain, gzip.open(target, "wb") as packed:
        shutil.copyfileobj(plain, packed)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
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
        default_factory=lambda: {"rename": 0, "copytruncate": 0, "compressed": 0, "while_down": 0}
    )
    # Downtimes with several rotations, and how many rotations the most crowded one saw.
    crowded_downtimes: int = 0
    most_rotations_in_one_downtime: int = 0
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
        self.rotations_this_downtime = 0
        # While an exporter life may be killed before it listens, ids go to the log, not UDP (whose loss in such
        # a life could not be told from a loss in a listening one).
        self.udp_paused = False

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
        """Rotates as logrotate does, at any moment, the exporter alive, dead or still starting: rename, or
        copytruncate, each with no compression, `compress` (the rotated file becomes .gz at once) or
        `delaycompress` (the previous one does)."""
        target = self.next_rotated()
        if self.rng.random() < 0.5:
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
            self.rotations_this_downtime += 1
            self.run.most_rotations_in_one_downtime = max(
                self.run.most_rotations_in_one_downtime, self.rotations_this_downtime
            )
            if self.rotations_this_downtime == 2:
                self.run.crowded_downtimes += 1
        return self.logs / f"app.log.{self.run.rotated}"

    def went_down(self) -> None:
        self.exporter_down = True
        self.rotations_this_downtime = 0

    def came_up(self) -> None:
        self.exporter_down = False

    async def copytruncate(self, target: Path) -> None:
        async with self.rotating:
            shutil.copyfile(self.log, target)
            with self.log.open("r+b") as handle:
                handle.truncate(0)
        self.run.rotations["copytruncate"] += 1

    def compress(self, path: Path) -> None:
        gzip_file(path)
        self.run.rotations["compressed"] += 1

    async def rotate_while_down(self, client: httpx.AsyncClient, rotations: int) -> None:
        """The exporter is dead (or started and killed before it read anything): lines are logged, then the
        log rotated, `rotations` times, each way at random. Every generation must be read at the next start."""
        for _ in range(rotations):
            await self.burst(client, self.rng.randint(5, 25))
            async with self.rotating:
                pass  # a copytruncate of the writer's own loop is done
            await self.maybe_rotate()

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
                if self.rng.random() < 0.7 or self.udp_paused:
                    self.append(ids)
                else:
                    self.send_udp(ids)
                if self.rng.random() < 0.06:
                    await self.maybe_rotate()
                await asyncio.sleep(self.rng.uniform(0.01, 0.08))  # pacing, like an application's traffic

    def close(self) -> None:
        self.sock.close()
