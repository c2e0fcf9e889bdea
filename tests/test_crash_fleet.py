"""Crash loop, fleet variant: on one PostgreSQL state, 2 ingest processes tailing logs rotated both ways (plus
UDP), 3 resolvers and 2 exposers, all real processes, SIGKILLed at random (a resolver also while it holds
claims, an exposer also while it leads), resolvers frozen (SIGSTOP) inside a transaction when one is caught
and past their lease, PostgreSQL restarted with `-m immediate`, against the simulated API with faults. At the
end the leading exposer's totals equal the API's ground truth for exactly the ids the fleet received, each
counted once, and no logged id is missing.

UDP ids sent around a kill of their ingest process may be lost (tests/test_crash.py accounts for that window
id by id on one process); here every UDP id received is checked to be counted once.

Default: 12 faults (2 freezes and a database restart among them) in about a minute. `pytest --soak` enlarges
the loop (40 faults, a third of them freezes and database restarts).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import json
import os
import random
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from exporter.simulate.api import totals
from tests.crash_support import Run, Writer
from tests.pg import Cluster
from tests.support import (
    PAYG_KEY,
    api_process,
    free_port,
    metrics_text,
    spawn_exporter,
    value,
    wait_ready,
    wait_until,
    write_config,
)


class FleetWriter(Writer):
    """The crash test's application, whose exporter keeps its file position in the fleet's database."""

    def __init__(self, run: Run, logs: Path, url: str, instance: str, api_url: str, udp_port: int,
                 rng: random.Random) -> None:
        super().__init__(run, logs, logs / "unused.db", api_url, udp_port, rng)
        self.url = url
        self.instance = instance

    def saved(self) -> tuple[int, int, bytes] | None:
        try:
            with psycopg.connect(self.url, connect_timeout=2) as db:
                row = db.execute(
                    "SELECT inode, \"offset\", head FROM checkpoints WHERE instance = %s AND source = 'app-log' "
                    "AND NOT finished ORDER BY generation DESC LIMIT 1",
                    (self.instance,),
                ).fetchone()
        except psycopg.Error:
            return None
        return None if row is None else (int(row[0]), int(row[1]), bytes(row[2]))


@dataclass
class Member:
    """One process of the fleet: its role, config, ports and the process while it lives."""

    name: str
    role: str
    config: Path
    log: Path
    metrics_port: int
    process: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        self.process = spawn_exporter(self.config, self.log)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


def member_config(tmp_path: Path, name: str, role: str, api_url: str, url: str, metrics_port: int,
                  logs: Path | None = None, udp_port: int = 0) -> Path:
    data: dict[str, Any] = {
        "zenmux": {"base_url": api_url, "timeout_seconds": 0.5, "connect_timeout_seconds": 0.5, "concurrency": 8,
                   "max_requests_per_second": 2000, "max_response_bytes": 256 * 1024},
        "resolve": {"billing_delay_seconds": 0.2, "retry_initial_seconds": 0.05, "retry_max_seconds": 0.3,
                    "give_up_after_seconds": 3600},
        "roles": [role],
        "state": {"url": url, "instance": name, "lease_seconds": 3},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}", "extra_labels": ["feature"]},
        "shutdown": {"drain_seconds": 0},
        "log": {"level": "info"},
    }
    if role == "resolve":
        data["zenmux"]["api_key"] = PAYG_KEY
    if role == "ingest":
        assert logs is not None
        data["sources"] = [
            {"type": "file", "name": "app-log", "path": str(logs / "app.log"), "format": "json",
             "start_at": "beginning", "poll_interval_seconds": 0.02, "labels": {"feature": "feature"}},
            {"type": "udp", "name": "udp", "listen": f"127.0.0.1:{udp_port}", "format": "plain"},
        ]
    return write_config(tmp_path / f"{name}.yaml", data)


def in_transaction(url: str, instance: str) -> bool:
    """Whether the resolver's session is inside a transaction right now (a claim, a settle)."""
    with psycopg.connect(url) as db:
        row = db.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND xact_start IS NOT NULL",
            (f"zenmux-exporter {instance}",),
        ).fetchone()
    return row is not None and row[0] > 0


async def leader_of(exposers: list[Member], client: httpx.AsyncClient) -> Member | None:
    for exposer in exposers:
        text = await metrics_text(exposer.metrics_port, client)
        if text is not None and value(text, "zenmux_exporter_expose_leader") == 1:
            return exposer
    return None


def claims_held(url: str, instance: str) -> bool:
    """Whether the resolver holds claims on ids right now (claimed, lease running, not yet settled)."""
    with psycopg.connect(url) as db:
        row = db.execute(
            "SELECT count(*) FROM queue WHERE claimed_by = %s AND lease_until > extract(epoch FROM now())",
            (instance,),
        ).fetchone()
    return row is not None and row[0] > 0


def read_fleet(url: str) -> tuple[dict[str, int], dict[str, tuple[int, int]], int]:
    """(id -> status, instance -> (inode, offset) of its app-log, ids left in the queue)."""
    with psycopg.connect(url) as db:
        ids = {row[0]: int(row[1]) for row in db.execute("SELECT id, status FROM generations")}
        positions = {
            row[0]: (int(row[1]), int(row[2]))
            for row in db.execute(
                "SELECT DISTINCT ON (instance) instance, inode, \"offset\" FROM checkpoints "
                "WHERE source = 'app-log' AND NOT finished ORDER BY instance, generation DESC"
            )
        }
        queued = db.execute("SELECT count(*) FROM queue").fetchone()
    return ids, positions, 0 if queued is None else int(queued[0])


def holders(logs: Path, ids: set[str]) -> dict[str, list[str]]:
    """Which files of a log directory (plain or gzip) hold each of `ids`."""
    found: dict[str, list[str]] = {}
    for path in sorted(logs.iterdir()):
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except (OSError, EOFError) as err:
            found.setdefault("<unreadable>", []).append(f"{path.name}: {err}")
            continue
        for generation_id in ids:
            if generation_id in text:
                found.setdefault(generation_id, []).append(path.name)
    return found


def diagnosis(url: str, writers: list[FleetWriter], members: list[Member], file_ids: set[str]) -> str:
    """What the fleet was waiting for, when it waited too long: each log's files and checkpoints, the logged
    ids never read and the files holding them, the queue's rows (claims, leases, due times), who was alive."""
    out: list[str] = []
    with psycopg.connect(url, connect_timeout=5) as db:
        now = db.execute("SELECT extract(epoch FROM now())").fetchone()
        clock = 0.0 if now is None else float(now[0])
        ids = {row[0]: int(row[1]) for row in db.execute("SELECT id, status FROM generations")}
        for writer in writers:
            out.append(f"{writer.instance}: files (name inode size mtime):")
            for path in sorted(writer.logs.iterdir()):
                stat = path.stat()
                out.append(f"  {path.name} {stat.st_ino} {stat.st_size} {stat.st_mtime:.3f}")
            out.append(f"{writer.instance}: checkpoints (generation inode offset finished mtime):")
            for row in db.execute(
                "SELECT generation, inode, \"offset\", finished, mtime_ns FROM checkpoints WHERE instance = %s "
                "ORDER BY generation", (writer.instance,),
            ):
                out.append(f"  {row[0]} {row[1]} {row[2]} {row[3]} {int(row[4]) / 1e9:.3f}")
            unread = (file_ids & set(writer.all_ids)) - ids.keys()
            where = holders(writer.logs, unread)
            out.append(f"{writer.instance}: {len(unread)} logged ids never read, held by: "
                       + "; ".join(f"{i} in {where.get(i)}" for i in sorted(unread)[:20]))
        queued = db.execute(
            "SELECT id, source, due, attempts, claimed_by, lease_until FROM queue ORDER BY due LIMIT 20"
        ).fetchall()
        total = db.execute("SELECT count(*) FROM queue").fetchone()
        out.append(f"queue: {0 if total is None else total[0]} rows (id source due-now attempts claimed_by "
                   "lease_until-now):")
        out.extend(f"  {r[0]} {r[1]} {r[2] - clock:.3f} {r[3]} {r[4]} {r[5] - clock:.3f}" for r in queued)
        statuses = db.execute("SELECT status, count(*) FROM generations GROUP BY status").fetchall()
        out.append(f"generations by status: {dict(statuses)}")
    out.append("members: " + ", ".join(
        f"{m.name}={'alive' if m.process is not None and m.process.poll() is None else 'dead'}" for m in members))
    return "\n".join(out)


async def test_a_fleet_counts_exactly_once_through_kill_9_of_any_member(
    tmp_path: Path, pg_url: str, postgres: Cluster, soak: bool
) -> None:
    kills_wanted = 40 if soak else 12
    # Which of the faults are not kills: resolvers frozen (the first past its lease), the database restarted.
    freezes = set(range(1, kills_wanted, 4)) if soak else {1, 6}
    restarts = set(range(3, kills_wanted, 10)) if soak else {4}
    seed = int(os.environ.get("CRASH_SEED", random.randrange(1 << 30)))
    print(f"fleet crash-loop seed: {seed} (rerun with CRASH_SEED={seed})", flush=True)
    rng = random.Random(seed)
    faults = ["server_error=0.04", "reset=0.02", "truncated=0.02", "malformed=0.02", "slow=0.01"]
    with api_process("--billing-delay", "0.4", *(a for f in faults for a in ("--fault", f)),
                     log=tmp_path / "api.log") as api:
        run = Run()
        members: list[Member] = []
        writers: list[FleetWriter] = []
        for i in range(2):
            logs = tmp_path / f"logs-{i}"
            logs.mkdir()
            (logs / "app.log").touch()
            udp_port = free_port(socket.SOCK_DGRAM)
            name = f"ingest-{i}"
            port = free_port()
            members.append(Member(name, "ingest", member_config(tmp_path, name, "ingest", api.url, pg_url, port,
                                                                logs, udp_port), tmp_path / f"{name}.log", port))
            writers.append(FleetWriter(run, logs, pg_url, name, api.url, udp_port, rng))
        for role, count in (("resolve", 3), ("expose", 2)):
            for i in range(count):
                name, port = f"{role}-{i}", free_port()
                members.append(Member(name, role, member_config(tmp_path, name, role, api.url, pg_url, port),
                                      tmp_path / f"{name}.log", port))
        started = time.time()
        stop_writing = asyncio.Event()
        kills: dict[str, int] = {}
        async with httpx.AsyncClient() as client:
            try:
                for member in members:
                    member.spawn()
                for member in members:
                    assert member.process is not None
                    await wait_ready(member.process, member.metrics_port, client)
                writing = [asyncio.create_task(w.loop(stop_writing)) for w in writers]
                exposers = [m for m in members if m.role == "expose"]
                for fault in range(kills_wanted):
                    await asyncio.sleep(rng.uniform(0.2, 1.2))  # a random moment: this is what is under test
                    if fault in restarts:
                        postgres.stop("immediate")  # every session ends, mid-transaction or not
                        postgres.start()
                        kills["postgres_restart"] = kills.get("postgres_restart", 0) + 1
                        continue
                    if fault in freezes:
                        frozen = rng.choice([m for m in members if m.role == "resolve"])
                        assert frozen.process is not None
                        inside = functools.partial(asyncio.to_thread, in_transaction, pg_url, frozen.name)
                        how = "freeze_in_transaction"
                        try:
                            await wait_until(inside, timeout=3)
                        except AssertionError:
                            how = "freeze"
                        frozen.process.send_signal(signal.SIGSTOP)
                        # The first one stays frozen past its lease (3 s) and the server's idle bound (5 s).
                        await asyncio.sleep(6.0 if fault == min(freezes) else rng.uniform(0.5, 2.0))
                        frozen.process.send_signal(signal.SIGCONT)
                        kills[how] = kills.get(how, 0) + 1
                        continue
                    victim = rng.choice(members)
                    how = victim.role
                    if victim.role == "expose" and rng.random() < 0.5:
                        leader = await leader_of(exposers, client)
                        if leader is not None:
                            victim, how = leader, "expose_leading"
                    if victim.role == "resolve" and rng.random() < 0.5:
                        holding = functools.partial(asyncio.to_thread, claims_held, pg_url, victim.name)
                        with contextlib.suppress(AssertionError):
                            await wait_until(holding, timeout=3)
                            how = "resolve_holding_claims"
                    assert victim.process is not None and victim.process.poll() is None, (
                        f"{victim.name} died by itself: see {victim.log}")
                    victim.kill()
                    kills[how] = kills.get(how, 0) + 1
                    await asyncio.sleep(rng.uniform(0, 0.3))  # dead for a while
                    victim.spawn()
                    await wait_ready(victim.process, victim.metrics_port, client)
                stop_writing.set()
                await asyncio.gather(*writing)
                leading: list[Member] = []

                async def led() -> bool:
                    leader = await leader_of(exposers, client)
                    leading[:] = [] if leader is None else [leader]
                    return leader is not None

                await wait_until(led, timeout=30, what="a leading exposer")
                exposer = leading[0]

                async def caught_up() -> bool:
                    ids, positions, queued = await asyncio.to_thread(read_fleet, pg_url)
                    for writer in writers:
                        stat = writer.log.stat()
                        # (A log just rotated is empty: no generation of it to save yet.)
                        if stat.st_size and positions.get(writer.instance) != (stat.st_ino, stat.st_size):
                            return False
                    if queued or not run.file_ids <= ids.keys():
                        return False
                    text = await metrics_text(exposer.metrics_port, client)
                    return text is not None and value(text, "zenmux_generations_total") == len(ids)

                try:
                    await wait_until(caught_up, timeout=120 if soak else 60, what="every received id resolved")
                except AssertionError as err:
                    text = await metrics_text(exposer.metrics_port, client)
                    shown = None if text is None else value(text, "zenmux_generations_total")
                    found = await asyncio.to_thread(diagnosis, pg_url, writers, members, run.file_ids)
                    raise AssertionError(f"{err} (seed {seed}; the leader {exposer.name} shows "
                                         f"zenmux_generations_total {shown})\n{found}") from None
                text = await metrics_text(exposer.metrics_port, client)
                assert text is not None
                ids, _, _ = await asyncio.to_thread(read_fleet, pg_url)
            finally:
                stop_writing.set()
                for member in members:
                    member.kill()
                for writer in writers:
                    writer.close()
            records = {r["generationId"]: r for r in (await client.get(f"{api.url}/_sim/records")).json()}
            sim_stats = (await client.get(f"{api.url}/_sim/stats")).json()

    assert set(ids.values()) == {1}, "ids neither pending nor abandoned at the end"
    missing = run.file_ids - ids.keys()
    assert not missing, f"{len(missing)} logged ids were never read"
    assert ids.keys() <= records.keys()
    assert value(text, "zenmux_exporter_expose_leader") == 1
    truth = totals(records[i] for i in ids)
    assert value(text, "zenmux_generations_total") == truth["generations"] == len(ids)
    for kind in ("prompt", "completion", "reasoning", "cached"):
        assert value(text, "zenmux_tokens_total", token_type=kind) == truth[f"{kind}_tokens"], kind
    assert value(text, "zenmux_cost_usd_total") == pytest.approx(truth["billAmount"], rel=1e-9)
    assert value(text, "zenmux_credits_total") == pytest.approx(truth["usage"], rel=1e-9)
    assert value(text, "zenmux_upstream_retries_total") == truth["retries"]
    udp_ids = {i for i, _ in run.udp_sent} - run.file_ids
    report = {
        "seed": seed,
        "kills": kills,
        "rotations": run.rotations,
        "ids_logged": len(run.file_ids),
        "ids_sent_udp": len(udp_ids),
        "udp_ids_received": len(udp_ids & ids.keys()),
        "ids_resolved": len(ids),
        "api_faults_injected": sim_stats["faults"],
        "seconds": round(time.time() - started, 1),
    }
    print("fleet crash-loop report:", json.dumps(report))
    assert sum(kills.values()) == kills_wanted
