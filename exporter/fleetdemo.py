"""The fleet quick start (`demo --fleet URL`): simulated API and traffic, an ingest process, two resolvers and an
exposer as separate `run` processes on one PostgreSQL, with the role configs written out to read and reuse."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from exporter.config import Config, ConfigError, parse_config, redacted_url, split_host_port
from exporter.store import StateError

API_KEY = "sk-ai-v1-demo"
MANAGEMENT_KEY = "sk-mg-v1-demo"
URL_VARIABLE = "ZENMUX_STATE_URL"
# The simulated API bills a generation after SIM_BILLING_DELAY_SECONDS; the fleet waits a little longer before
# its first lookup. Against the real API the configs would keep the default 240 (ZenMux bills in 3-5 minutes).
SIM_BILLING_DELAY_SECONDS = 2.0
BILLING_DELAY_SECONDS = 3
# (name, roles), in the order they start: the exposer first, so it leads by the time cost appears.
MEMBERS = (("exposer", ["expose"]), ("resolver-1", ["resolve"]), ("resolver-2", ["resolve"]), ("ingest", ["ingest"]))
READY_TIMEOUT_SECONDS = 60.0
# At Ctrl-C the ingest process stops first; the resolvers get this long to finish what it queued.
DRAIN_SECONDS = 15.0
POLL_SECONDS = 0.25
STOP_SECONDS = 20.0  # a member's own drain is 5 s


def member_config(name: str, roles: list[str], api_url: str, directory: Path, listen: str) -> dict[str, Any]:
    """One process's config: what docs/fleet.md's quick start shows, with seconds of billing delay."""
    data: dict[str, Any] = {
        "roles": roles,
        # Every member the same: ingest sets due times, resolvers retry and give up.
        "resolve": {"billing_delay_seconds": BILLING_DELAY_SECONDS, "retry_initial_seconds": 1, "retry_max_seconds": 4},
        # The URL (it may hold a password) from the environment, as the Kubernetes overlay does.
        "state": {"url": "${" + URL_VARIABLE + "}", "instance": f"demo-{name}", "lease_seconds": 20},
        "metrics": {"listen": listen, "extra_labels": ["feature"]},
        "shutdown": {"drain_seconds": 5},
    }
    if "resolve" in roles:
        data["zenmux"] = {"base_url": api_url, "api_key": API_KEY, "concurrency": 8}
    if "ingest" in roles:
        data["sources"] = [{"type": "file", "name": "app-log", "path": str(directory / "app.log"), "format": "json",
                            "start_at": "beginning", "labels": {"feature": "feature"}}]
    if "expose" in roles:  # the leading exposer compares the fleet's ledger with the account's books
        data["zenmux"] = {"base_url": api_url}
        data["reconcile"] = {"management_api_key": MANAGEMENT_KEY, "poll_interval_seconds": 10}
    return data


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Member:
    name: str
    config: Path
    port: int
    log: Path
    process: asyncio.subprocess.Process | None = None

    @property
    def metrics(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    async def start(self, environ: dict[str, str]) -> None:
        with self.log.open("ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "exporter", "run", "--config", str(self.config),
                stdout=out, stderr=out, env=environ,
                start_new_session=True,  # Ctrl-C reaches the demo, which stops the fleet in order
            )

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_SECONDS)
        except TimeoutError:
            process.kill()
            await process.wait()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


async def _ready(member: Member, client: httpx.AsyncClient) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return (await client.get(f"http://127.0.0.1:{member.port}/readyz")).status_code == 200
    return False


async def _wait_ready(members: list[Member]) -> Member | None:
    """Waits until every member's /readyz answers 200; the first member that exited instead, or None."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT_SECONDS
    async with httpx.AsyncClient(timeout=2.0) as client:
        waiting = list(members)
        while waiting and loop.time() < deadline:
            for member in list(waiting):
                assert member.process is not None
                if member.process.returncode is not None:
                    return member
                if await _ready(member, client):
                    waiting.remove(member)
            if waiting:
                await asyncio.sleep(POLL_SECONDS)
        return waiting[0] if waiting else None


async def _pending(config: Config) -> int | None:
    """The fleet's pending ids, counted in the database (None if it cannot say)."""
    from exporter.app import open_store

    try:
        store = await open_store(config)
    except StateError:
        return None
    try:
        return store.pending
    finally:
        await store.close()


async def run_fleet_demo(url: str, listen: str, rate: float) -> int:
    """Runs the fleet until SIGINT/SIGTERM; 1 if the database cannot be used or a member does not start."""
    from exporter.app import open_store
    from exporter.simulate.api import SimConfig, SimulatedZenMux, serve
    from exporter.simulate.traffic import generate_traffic

    host, port = split_host_port(listen)
    shown = redacted_url(url)
    directory = Path(tempfile.mkdtemp(prefix="zenmux-fleet-demo-"))
    api = await serve(SimulatedZenMux(SimConfig(billing_delay_seconds=SIM_BILLING_DELAY_SECONDS)), "127.0.0.1", 0)
    api_url = f"http://127.0.0.1:{api.port}"
    environ = {**os.environ, URL_VARIABLE: url}
    members: list[Member] = []
    try:
        for name, roles in MEMBERS:
            member_port = (port or free_port()) if name == "exposer" else free_port()
            member_host = host if name == "exposer" else "127.0.0.1"  # --listen is the exposer's
            data = member_config(name, roles, api_url, directory, f"{member_host}:{member_port}")
            parsed = parse_config(data, name, environ, check_system=False)  # a bad URL stops here, not as an outage
            path = directory / f"{name}.yaml"
            path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
            members.append(Member(name, path, member_port, directory / f"{name}.log"))
            if name == "exposer":
                exposer_config = parsed
        try:  # creates the schema once, before four processes race to
            await (await open_store(exposer_config)).close()
        except StateError as err:
            print(f"cannot use the database {shown}: {err}", file=sys.stderr)
            return 1
        for member in members:
            await member.start(environ)
        failed = await _wait_ready(members)
        if failed is not None:
            print(f"{failed.name} did not start ({failed.log}):\n{failed.tail()}", file=sys.stderr)
            return 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        traffic = asyncio.create_task(
            generate_traffic(api_url, API_KEY, rate_per_second=rate, stop=stop, log_path=directory / "app.log",
                             udp_target=None)
        )
        exposer = members[0]
        lines = [f"\nzenmux-exporter fleet demo on {shown}", ""]
        lines += [f"  {m.name + ':':12}{m.metrics}  (pid {m.process.pid if m.process else '?'}, "
                  f"config {m.config.name})" for m in members]
        lines += [
            f"  simulated API: {api_url}  (ground truth: {api_url}/_sim/records)",
            f"  app log:       {directory / 'app.log'}",
            f"  configs, logs: {directory}  (deleted when the demo stops)",
            "",
            f"The simulated API bills after ~{SIM_BILLING_DELAY_SECONDS:g} s and the configs wait "
            f"{BILLING_DELAY_SECONDS} s (billing_delay_seconds; keep 240 against the real API):",
            "cost by model appears on the exposer's /metrics within seconds.",
            f"Try: curl -s {exposer.metrics.replace('127.0.0.1', host if host != '0.0.0.0' else '127.0.0.1')} "
            "| grep zenmux_cost_usd_total",
            "     kill -9 a resolver's pid: the other one carries on (its claims return after lease_seconds).",
            "Ctrl-C stops the fleet: traffic and ingest first, then the resolvers finish the queue.",
            "",
        ]
        print("\n".join(lines), flush=True)
        await stop.wait()
        await traffic
        await members[-1].stop()  # ingest: what it read is in the queue
        loop_time = loop.time
        deadline = loop_time() + DRAIN_SECONDS
        pending = await _pending(exposer_config)
        while pending and loop_time() < deadline:
            await asyncio.sleep(POLL_SECONDS * 2)
            pending = await _pending(exposer_config)
        if pending == 0:
            left = "every id resolved"
        else:  # a later demo's simulated API will not know them
            left = (f"{'an unknown number of' if pending is None else pending} ids left pending in {shown}, "
                    "given up by a later demo after resolve.give_up_after_seconds")
        print(f"demo stopped; {left}; {directory} deleted", flush=True)
        return 0
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    finally:
        await asyncio.gather(*(m.stop() for m in members))
        await api.close()
        shutil.rmtree(directory, ignore_errors=True)
