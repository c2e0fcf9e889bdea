"""Shutdown drain: on SIGTERM sources stop, pending ids are resolved within the drain window, nothing is lost."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import (
    FakeApi,
    StartExporter,
    append_lines,
    config_data,
    json_line,
    make_config,
    scrape,
    value,
    wait_until,
)


def run_in_a_process(tmp_path: Path, data: dict[str, Any]) -> subprocess.Popen[str]:
    """`zenmux-exporter run` as its own process, returned once it serves /metrics (stderr left to read)."""
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(data))
    process = subprocess.Popen(
        [sys.executable, "-m", "exporter", "run", "--config", str(config_path)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    for line in process.stderr:
        if "serving /metrics" in line:
            break
    return process


def queued(tmp_path: Path) -> int:
    with sqlite3.connect(tmp_path / "state.db") as db:
        return int(db.execute("SELECT count(*) FROM queue").fetchone()[0])


async def test_stop_drains_every_pending_id(tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter) -> None:
    config = make_config(tmp_path, fake_api.url, resolve={"billing_delay_seconds": 0.5}, shutdown={"drain_seconds": 20})
    exporter = await start_exporter(config)
    ids = [fake_api.create() for _ in range(20)]
    append_lines(tmp_path / "app.log", [json_line(i) for i in ids])

    async def queued() -> bool:
        return value(await scrape(exporter.metrics_port), "zenmux_exporter_ids_received_total") == 20

    await wait_until(queued, what="20 ids queued")
    report = await exporter.stop()  # the ids are not due yet: the drain waits for them
    assert report.left_pending == 0
    assert report.resolved_during_drain == 20
    assert exporter.ledger.value("zenmux_generations") == 20


@pytest.mark.slow
async def test_sigterm_to_the_process_drains_then_exits(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    data = config_data(tmp_path, fake_api.url, resolve={"billing_delay_seconds": 1.0}, shutdown={"drain_seconds": 20})
    ids = [fake_api.create() for _ in range(15)]
    process = run_in_a_process(tmp_path, data)
    try:
        assert process.stderr is not None
        append_lines(tmp_path / "app.log", [json_line(i) for i in ids])
        await wait_until(lambda: queued(tmp_path) == 15, what="15 ids durably queued")
        process.send_signal(signal.SIGTERM)
        # Waited for off the loop: the simulated API answering the drain's lookups runs on this loop.
        _, rest = await asyncio.to_thread(process.communicate, timeout=30)
        stderr = rest
        assert process.returncode == 0, stderr
    finally:
        process.kill()
    assert "15 ids resolved while draining, 0 left pending" in stderr
    # The next process on the same state continues the counters: everything was counted once, before exit.
    exporter = await start_exporter(make_config(tmp_path, fake_api.url))
    text = await scrape(exporter.metrics_port)
    assert value(text, "zenmux_generations_total") == 15
    assert value(text, "zenmux_exporter_pending_ids") == 0


async def test_datagrams_waiting_in_the_socket_at_stop_are_kept(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    config = make_config(tmp_path, fake_api.url, resolve={"billing_delay_seconds": 3600, "give_up_after_seconds": 7200})
    exporter = await start_exporter(config)
    ids = [f"late-{i}" for i in range(300)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for generation_id in ids:  # no await in between: the event loop has not read any of them yet
            sock.sendto(generation_id.encode(), ("127.0.0.1", exporter.udp_sources[0].port))
    await exporter.stop(drain_seconds=0)
    with sqlite3.connect(tmp_path / "state.db") as db:
        queued = {row[0] for row in db.execute("SELECT id FROM queue")}
    assert set(ids) <= queued


async def test_a_second_signal_cuts_the_drain_short_and_keeps_the_rest(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    data = config_data(tmp_path, fake_api.url, resolve={"billing_delay_seconds": 3600, "give_up_after_seconds": 7200},
                       shutdown={"drain_seconds": 300})
    process = run_in_a_process(tmp_path, data)
    try:
        assert process.stderr is not None
        append_lines(tmp_path / "app.log", [json_line(f"waiting-{i}") for i in range(5)])
        await wait_until(lambda: queued(tmp_path) == 5, what="5 ids durably queued")
        process.send_signal(signal.SIGTERM)
        for line in process.stderr:
            if "stopping: draining" in line:
                break
        process.send_signal(signal.SIGTERM)  # the operator does not want to wait five minutes
        _, rest = await asyncio.to_thread(process.communicate, timeout=30)
        assert process.returncode == 0, rest
    finally:
        process.kill()
    assert "0 ids resolved while draining, 5 left pending" in rest
