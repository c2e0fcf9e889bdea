"""Shared machinery of the benchmark: processes, /proc accounting, configs, metrics polling, results."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.against import Build, this_build

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROFILE_ENV = "ZENMUX_BENCH_PROFILE"  # set by `--profile DIR`: every exporter started is sampled by py-spy
API_KEY = "sk-ai-v1-demo"


def process_cpu_seconds(pid: int, children: bool = False) -> float:
    """utime + stime from /proc (plus cutime + cstime, the reaped children's, with `children`)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(child) for child in (task / "children").read_text().split()]
    return out


@dataclass
class Row:
    """One line of the results table. `figure` is the median of `samples`."""

    workload: str
    figure: float
    unit: str
    target: str = ""
    reference: float | None = None
    ratio: float | None = None
    ok: bool | None = None
    samples: list[float] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


class Proc:
    """A child process with its CPU time and memory read from /proc."""

    def __init__(
        self, argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.log_path = log
        self._log = log.open("ab")
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd
        )
        self.pid = self.popen.pid
        self.profiler: subprocess.Popen[bytes] | None = None

    def profile(self, output: Path) -> None:
        """Samples this process with py-spy (without stopping it) until it exits; collapsed stacks to `output`."""
        py_spy = Path(sys.executable).parent / "py-spy"
        self.profiler = subprocess.Popen(
            [str(py_spy), "record", "--pid", str(self.pid), "--rate", "200", "--nonblocking", "--format", "raw",
             "--output", str(output)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def cpu_split(self) -> tuple[float, float]:
        """(user, system) CPU seconds."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS

    def tree_cpu_seconds(self) -> float:
        """This process's CPU plus its live children's (and the reaped children's it waited for)."""
        return process_cpu_seconds(self.pid, children=True) + sum(
            process_cpu_seconds(child) for child in children(self.pid)
        )

    def memory_mb(self) -> dict[str, float]:
        """VmRSS (now) and VmHWM (peak) in MiB."""
        out: dict[str, float] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
        return out

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 20.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self.profiler is not None:
            try:
                self.profiler.wait(30)
            except subprocess.TimeoutExpired:
                self.profiler.kill()
        self._log.close()
        return int(self.popen.returncode)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> float:
    """Polls until `condition` holds; returns the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", re.MULTILINE)


class Metrics:
    """Reads an exporter's /metrics (text format) and sums samples by name and label substrings."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._http = httpx.Client(timeout=30.0)

    def text(self, openmetrics: bool = False) -> str:
        headers = {"Accept": "application/openmetrics-text; version=1.0.0"} if openmetrics else {}
        response = self._http.get(self.url + "/metrics", headers=headers)
        response.raise_for_status()
        return response.text

    def gzip_bytes(self, openmetrics: bool = False) -> bytes:
        """/metrics as a scraper that asked for gzip receives it: read to the last byte, not decoded (a
        real scraper's inflating and parsing are its own cost, not the exporter's)."""
        headers = {"Accept-Encoding": "gzip"}
        if openmetrics:
            headers["Accept"] = "application/openmetrics-text; version=1.0.0"
        with self._http.stream("GET", self.url + "/metrics", headers=headers) as response:
            response.raise_for_status()
            return b"".join(response.iter_raw())

    def ready(self) -> bool:
        try:
            return self._http.get(self.url + "/readyz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def sum(self, name: str, *label_parts: str, text: str | None = None) -> float:
        body = self.text() if text is None else text
        total = 0.0
        for match in SAMPLE.finditer(body):
            if match.group(1) != name:
                continue
            labels = match.group(2) or ""
            if all(part in labels for part in label_parts):
                total += float(match.group(3))
        return total

    def close(self) -> None:
        self._http.close()


def exporter_config(
    directory: Path,
    *,
    api_url: str,
    metrics_port: int,
    sources: list[dict[str, Any]],
    billing_delay: float = 240.0,
    concurrency: int = 16,
    max_rps: float = 20.0,
    tracing: str = "none",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Writes a production-shaped YAML config (state in `directory`) and returns its path."""
    data: dict[str, Any] = {
        "zenmux": {
            "base_url": api_url,
            "api_key": API_KEY,
            "concurrency": concurrency,
            "max_requests_per_second": max_rps,
        },
        # The give-up horizon past the delay, as the config requires (a backlog waits out an hour's delay).
        "resolve": {"billing_delay_seconds": billing_delay, "retry_initial_seconds": 1, "retry_max_seconds": 5,
                    "give_up_after_seconds": max(3600.0, 2 * billing_delay)},
        "sources": sources,
        "state": {"path": str(directory / "state.db"), "max_pending": 50_000_000},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}", "extra_labels": ["feature"]},
        "tracing": {"exporter": tracing},
        "shutdown": {"drain_seconds": 0},
        "log": {"level": "warning"},
    }
    for section, values in (extra or {}).items():
        data.setdefault(section, {}).update(values)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def start_exporter(
    config: Path, log: Path, env: dict[str, str] | None = None, timeout: float = 60.0, build: Build | None = None
) -> Proc:
    """Runs `zenmux-exporter run` of `build` (this checkout by default) as production does and waits for
    /readyz."""
    build = build or this_build()
    proc = Proc(
        [build.python, "-m", "exporter", "run", "--config", str(config)], log, {**build.env(), **(env or {})},
        cwd=build.root,
    )
    port = int(yaml.safe_load(config.read_text())["metrics"]["listen"].rsplit(":", 1)[1])
    metrics = Metrics(port)
    try:
        wait_for(lambda: metrics.ready() or not proc.alive(), timeout, "the exporter to be ready")
    finally:
        metrics.close()
    if not proc.alive():
        raise RuntimeError(f"exporter exited at start:\n{proc.tail()}")
    profiles = os.environ.get(PROFILE_ENV)
    if profiles:  # --profile: from ready to exit, so start-up is not in it
        proc.profile(Path(profiles) / f"{build.name}-{log.parent.name}-{proc.pid}.txt")
    return proc


def file_source(path: Path, name: str = "bench-log") -> dict[str, Any]:
    return {
        "type": "file",
        "name": name,
        "path": str(path),
        "format": "json",
        "start_at": "beginning",
        "labels": {"feature": "feature"},
    }


def udp_source(port: int, name: str = "bench-udp") -> dict[str, Any]:
    return {"type": "udp", "name": name, "listen": f"127.0.0.1:{port}", "format": "plain"}
