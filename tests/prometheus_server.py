"""A real Prometheus for the tests (Debian's `prometheus`): `start_prometheus` starts servers scraping the given
targets every second as job `zenmux-live`, evaluating the shipped rules; they are stopped at the end."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.dashboard_contract import RULE_FILES
from tests.support import free_port

JOB = "zenmux-live"


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-4000:]

    async def api(self, client: httpx.AsyncClient, path: str, **params: str) -> Any:
        response = await client.get(f"{self.url}/api/v1/{path}", params=params)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise AssertionError(f"{path} {params}: HTTP {response.status_code}: {body}")
        return body["data"]

    async def ready(self, client: httpx.AsyncClient) -> bool:
        """Whether it answers /-/ready (it takes a moment to start); fails at once if it died."""
        assert self.process.poll() is None, f"prometheus exited: {self.output()}"
        try:
            return (await client.get(f"{self.url}/-/ready")).status_code == 200
        except httpx.TransportError:
            return False

    async def query(self, client: httpx.AsyncClient, expr: str) -> list[dict[str, Any]]:
        """Instant query; scalars come back as one label-less sample."""
        data = await self.api(client, "query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result


StartPrometheus = Callable[..., Prometheus]


@pytest.fixture
def start_prometheus(tmp_path: Path, request: pytest.FixtureRequest) -> StartPrometheus:
    """Starts real Prometheus servers, each scraping its `targets` as job `zenmux-live`; killed at the end."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus missing: run scripts/install-tools.sh (Debian package `prometheus`)"
    started = 0

    def start(*targets: str, metric_relabel_configs: list[dict[str, Any]] | None = None) -> Prometheus:
        nonlocal started
        started += 1
        directory = tmp_path / ("prometheus" if started == 1 else f"prometheus-{started}")
        directory.mkdir()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in RULE_FILES],
            "scrape_configs": [
                {"job_name": JOB, "scrape_interval": "1s", "static_configs": [{"targets": list(targets)}],
                 **({"metric_relabel_configs": metric_relabel_configs} if metric_relabel_configs else {})}
            ],
        }
        config_file = directory / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        port = free_port()
        log = directory / "prometheus.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--enable-feature=exemplar-storage",
                    "--log.level=info",
                ],
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

        def stop() -> None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

        request.addfinalizer(stop)
        return Prometheus(f"http://127.0.0.1:{port}", process, log)

    return start
