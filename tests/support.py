"""Helpers shared by the tests: configs, /metrics readers, condition waits, log writers, free ports,
certificates, and the exporter and the simulated API as processes of their own."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from exporter.app import Exporter
from exporter.config import Config, parse_config
from exporter.contribution import Contribution, Increment
from exporter.simulate.api import SimulatedZenMux
from exporter.simulate.server import ThreadedServer
from exporter.store import Checkpoint, Store

PAYG_KEY = "sk-ai-v1-demo"
SUBSCRIPTION_KEY = "sk-ss-v1-demo"
MANAGEMENT_KEY = "sk-mg-v1-demo"


@dataclass
class FakeApi:
    sim: SimulatedZenMux
    server: ThreadedServer
    url: str

    def create(self, **kwargs: Any) -> str:
        record: dict[str, Any] = self.sim.create(**kwargs)
        return str(record["generationId"])


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_data(tmp_path: Path, api_url: str, **overrides: Any) -> dict[str, Any]:
    """A fast test config: sub-second billing delay and backoff, ephemeral ports, files under tmp_path."""
    base: dict[str, Any] = {
        "zenmux": {"base_url": api_url, "api_key": PAYG_KEY, "timeout_seconds": 2, "max_requests_per_second": 1000},
        "resolve": {
            "billing_delay_seconds": 0.2,
            "retry_initial_seconds": 0.05,
            "retry_max_seconds": 0.2,
            "give_up_after_seconds": 30,
        },
        "sources": [
            {
                "type": "file",
                "name": "app-log",
                "path": str(tmp_path / "app.log"),
                "format": "json",
                "start_at": "beginning",
                "poll_interval_seconds": 0.02,
                "labels": {"feature": "feature"},
            },
            {"type": "udp", "name": "udp", "listen": "127.0.0.1:0", "format": "plain"},
        ],
        "state": {"path": str(tmp_path / "state.db")},
        "metrics": {"listen": "127.0.0.1:0", "extra_labels": ["feature"]},
        "shutdown": {"drain_seconds": 0},
    }
    return _merge(base, overrides)


def make_config(tmp_path: Path, api_url: str, **overrides: Any) -> Config:
    return parse_config(config_data(tmp_path, api_url, **overrides), "test")


@dataclass
class Spans:
    exporter: InMemorySpanExporter = field(default_factory=InMemorySpanExporter)

    def provider(self) -> TracerProvider:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        return provider


StartExporter = Callable[..., Awaitable[Exporter]]


async def wait_until(
    condition: Callable[[], bool] | Callable[[], Awaitable[bool]], *, timeout: float = 15.0, what: str = ""
) -> None:
    """Waits for a condition to hold (checked every 20 ms); fails the test with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(0.02)


async def scrape(port: int, *, openmetrics: bool = False) -> str:
    headers = {"Accept": "application/openmetrics-text; version=1.0.0"} if openmetrics else {}
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics", headers=headers)
    response.raise_for_status()
    return response.text


def samples(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            yield s.name, s.labels, s.value


def openmetrics_families(text: str) -> list[Metric]:
    """An OpenMetrics exposition parsed by prometheus_client's own parser (exemplars included)."""
    return list(parse_openmetrics(text))  # type: ignore[no-untyped-call]


def value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    return sum(v for n, lbls, v in samples(text) if n == name and all(lbls.get(k) == w for k, w in labels.items()))


def fail_next_settle(exporter: Exporter) -> None:
    """The next write of lookup results to the state database fails once (as a locked/full disk would)."""
    state = exporter.state
    assert state is not None
    original = state.settle
    failed = False

    def settle(*args: Any, **kwargs: Any) -> Any:
        nonlocal failed
        if not failed:
            failed = True
            raise OSError("injected: disk I/O error")
        return original(*args, **kwargs)

    state.settle = settle  # type: ignore[method-assign]


def append_lines(path: Path, lines: list[str]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))


async def reading(state: Store, source: str) -> Checkpoint | None:
    """The checkpoint of the generation a file source reads now (the newest not finished), None before any."""
    history = await state.file_history(source)
    unfinished = [c for c in history.checkpoints if not c.finished]
    return max(unfinished, key=lambda c: c.generation, default=None)


def json_line(generation_id: str, feature: str = "chat") -> str:
    line = {"ts": "2026-11-25T10:00:00Z", "level": "info", "generation_id": generation_id, "feature": feature}
    return json.dumps(line)


@contextlib.contextmanager
def peak_allocations() -> Iterator[list[int]]:
    """The peak of the Python allocations made meanwhile (tracemalloc), in bytes, in the list yielded: what an
    in-process exporter or client holds, which its RSS shows only blurred by the allocator and other tests."""
    peak: list[int] = []
    tracemalloc.start()
    try:
        yield peak
        peak.append(tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()


# --------------------------------------------------------------------------- ports and certificates


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_cert(directory: Path, name: str = "server", *, ca: tuple[Path, Path] | None = None) -> tuple[Path, Path]:
    """A P-256 certificate for 127.0.0.1/localhost: self-signed, or signed by `ca` (cert, key)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subject = ["-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"]
    common = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-days", "2"]
    if ca is None:
        subprocess.run(["openssl", "req", "-x509", *common, "-out", str(cert), *subject],
                       check=True, capture_output=True)
    else:
        csr = directory / f"{name}.csr"
        subprocess.run(["openssl", "req", "-new", *[a for a in common if a not in ("-days", "2")], "-out", str(csr),
                        *subject], check=True, capture_output=True)
        subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
                        "-CAcreateserial", "-days", "2", "-out", str(cert), "-copy_extensions", "copy"],
                       check=True, capture_output=True)
    return cert, key


# --------------------------------------------------------------------------- processes

PYTHON = sys.executable


@dataclass
class ApiProcess:
    process: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def api_process(*args: str, log: Path | None = None) -> Iterator[ApiProcess]:
    """`zenmux-exporter fake-api` in its own process; yields once it has printed its URL."""
    stderr = log.open("ab") if log is not None else subprocess.DEVNULL
    process = subprocess.Popen(
        [PYTHON, "-m", "exporter", "fake-api", "--listen", "127.0.0.1:0", *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        assert "http://" in line, f"fake-api did not start: {line!r}"
        url = line.split()[4]
        yield ApiProcess(process, url)
    finally:
        api = ApiProcess(process, "")
        api.stop()
        if process.stdout is not None:
            process.stdout.close()
        if log is not None and not isinstance(stderr, int):
            stderr.close()


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def spawn_exporter(config: Path, log: Path, *extra_env: tuple[str, str]) -> subprocess.Popen[bytes]:
    env = dict(os.environ, **dict(extra_env))
    with log.open("ab") as out:
        return subprocess.Popen(
            [PYTHON, "-m", "exporter", "run", "--config", str(config)], stdout=out, stderr=out, env=env
        )


async def metrics_text(port: int, client: httpx.AsyncClient) -> str | None:
    try:
        response = await client.get(f"http://127.0.0.1:{port}/metrics", timeout=2.0)
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else None


async def wait_ready(process: subprocess.Popen[bytes], port: int, client: httpx.AsyncClient) -> None:
    async def ready() -> bool:
        assert process.poll() is None, f"exporter exited with {process.returncode}"
        try:
            return (await client.get(f"http://127.0.0.1:{port}/readyz", timeout=1.0)).status_code == 200
        except httpx.HTTPError:
            return False

    await wait_until(ready, timeout=20, what="the exporter to answer /readyz")

# Requests that smuggle a second request or bend HTTP/1.1 framing: each must get one 4xx and a close.
SMUGGLING = {
    "cl_and_te": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "duplicate_cl": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\n"
                    b"abcdGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "space_before_colon": b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
    "nul_in_name": b"GET / HTTP/1.1\r\nHo\x00st: x\r\n\r\n",
    "bare_cr": b"GET / HTTP/1.1\r\nHost: x\rX-Smuggled: 1\r\n\r\n",
    "missing_host": b"GET / HTTP/1.1\r\n\r\n",
    "bad_version": b"GET / BANANA\r\nHost: x\r\n\r\n",
    "header_too_large": b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20_000 + b"\r\n\r\n",
}


class FakeTime:
    """A monotonic clock that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def one_generation(cost: float) -> Contribution:
    labels = ("m", "chat.completions")
    return Contribution(
        (Increment("zenmux_generations", (*labels, "true", "stop"), 1.0), Increment("zenmux_cost_usd", labels, cost)),
        {},
    )


def fleet_data(tmp_path: Path, api_url: str, pg_url: str, roles: list[str], **overrides: Any) -> dict[str, Any]:
    """The test config of one fleet process: the shared state instead of a file, the given roles."""
    data = config_data(tmp_path, api_url, roles=roles, **overrides)
    data["state"] = {"url": pg_url, "instance": f"{'-'.join(roles)}-{len(str(tmp_path))}", "lease_seconds": 5,
                     **overrides.get("state", {})}
    # A short lease (takeovers within a test) needs lookups bounded below it (config: state.lease_seconds).
    data["zenmux"].setdefault("connect_timeout_seconds", 1)
    if "resolve" not in roles:
        del data["zenmux"]["api_key"]  # only resolvers hold the key
    if "ingest" not in roles:
        data["sources"] = []
    return data


def send_udp(port: int, ids: list[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto("\n".join(ids).encode(), ("127.0.0.1", port))


def damage_finished_table(path: Path) -> None:
    """Overwrites the cells of the finished table's root page: a file that opens and counts its queue, and
    fails PRAGMA quick_check."""
    with sqlite3.connect(path) as db:
        root, page_size = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'finished'").fetchone()[0], \
            db.execute("PRAGMA page_size").fetchone()[0]
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with path.open("r+b") as handle:
        handle.seek((root - 1) * page_size + 8)
        handle.write(b"\xff" * (page_size - 8))
