"""State faults: a corrupt or truncated database, a read-only state directory, a full disk. A clear error, no
silent loss, the damaged file kept for recovery; a disk that fills up (or turns read-only) and recovers loses
nothing and counts nothing twice."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

import exporter.resolver as resolver_module
from exporter.__main__ import run_exporter
from exporter.app import Exporter
from exporter.clock import ManualClock
from exporter.simulate.api import totals
from exporter.state import StateError, StateStore
from tests.support import (
    FakeApi,
    StartExporter,
    append_lines,
    config_data,
    damage_finished_table,
    fail_next_settle,
    json_line,
    make_config,
    scrape,
    value,
    wait_until,
)


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A size-limited tmpfs at `where` (skips the test where mounting is not allowed)."""
    where.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount(where: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], check=True, capture_output=True)


def fill(directory: Path) -> Path:
    """Writes a file until the disk is full."""
    filler = directory / "filler"
    with contextlib.suppress(OSError), filler.open("wb") as handle:  # closing can raise ENOSPC too
        while True:
            handle.write(b"\0" * 65536)
            handle.flush()
    return filler


def sqlite_db(running: Exporter) -> sqlite3.Connection:
    assert isinstance(running.state, StateStore)
    return running.state._db


def send_udp(port: int, payload: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(payload, ("127.0.0.1", port))


async def resolve_some(tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter, n: int = 5) -> list[str]:
    exporter = await start_exporter(make_config(tmp_path, fake_api.url))
    ids = [fake_api.create() for _ in range(n)]
    append_lines(tmp_path / "app.log", [json_line(i) for i in ids])

    async def resolved() -> bool:
        return value(await scrape(exporter.metrics_port), "zenmux_generations_total") == n

    await wait_until(resolved, what=f"{n} generations")
    await exporter.stop(drain_seconds=0)
    return ids


def run_cli(tmp_path: Path, fake_api: FakeApi) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(config_data(tmp_path, fake_api.url)), encoding="utf-8")
    return subprocess.run([sys.executable, "-m", "exporter", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["garbage", "truncated", "zeroed_header"])
async def test_a_damaged_database_is_refused_kept_and_recoverable(
    damage: str, tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    state = tmp_path / "state.db"
    if damage == "garbage":
        state.write_bytes(b"this is not a database\n" * 500)
    else:
        await resolve_some(tmp_path, fake_api, start_exporter, n=40)
        raw = state.read_bytes()
        assert not (tmp_path / "state.db-wal").exists() or (tmp_path / "state.db-wal").stat().st_size == 0
        state.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"\0" * 100 + raw[100:])
    damaged = state.read_bytes()
    with pytest.raises(StateError) as caught:
        await start_exporter(make_config(tmp_path, fake_api.url))
    message = str(caught.value)
    assert str(state) in message and "Move it aside" in message
    assert state.read_bytes() == damaged, "the damaged file is kept as it was"
    # The command line says the same and exits non-zero without touching the file.
    cli = run_cli(tmp_path, fake_api)
    assert cli.returncode == 1
    assert "not a usable state database" in cli.stderr and "Move it aside" in cli.stderr
    assert state.read_bytes() == damaged
    # The documented recovery: move it aside (kept for forensics), start afresh.
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.rename(f"{state}{suffix}", f"{state}{suffix}.corrupt")
    exporter = await start_exporter(make_config(tmp_path, fake_api.url, sources=[
        {"type": "udp", "name": "udp", "listen": "127.0.0.1:0", "format": "plain"}]))
    assert exporter.state.pending == 0
    assert (tmp_path / "state.db.corrupt").read_bytes() == damaged


async def test_a_read_only_state_directory_is_a_clear_error(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    with tmpfs(tmp_path / "state", "4m") as directory:
        remount(directory, "ro")
        config = make_config(tmp_path, fake_api.url, state={"path": str(directory / "state.db")})
        with pytest.raises(StateError, match="cannot open the state database: Read-only file system"):
            await start_exporter(config)


async def test_a_full_disk_at_start_is_a_clear_error_not_corruption(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    with tmpfs(tmp_path / "state", "1m") as directory:
        fill(directory)
        config = make_config(tmp_path, fake_api.url, state={"path": str(directory / "state.db")})
        with pytest.raises(StateError) as caught:
            await start_exporter(config)
        assert "full" in str(caught.value) and "Move it aside" not in str(caught.value)


async def test_the_state_file_is_owner_only_and_never_a_followed_symlink(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db", max_pending=10)
    await store.close()
    assert (tmp_path / "state.db").stat().st_mode & 0o777 == 0o600
    target = tmp_path / "elsewhere.db"
    target.write_bytes(b"")
    (tmp_path / "link.db").symlink_to(target)
    with pytest.raises(StateError):
        StateStore(tmp_path / "link.db", max_pending=10)
    assert target.read_bytes() == b"", "the symlink's target was not written"


@pytest.mark.parametrize("fault", ["disk_full", "injected"])
async def test_state_write_failures_lose_nothing_and_recover(
    fault: str, tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    with tmpfs(tmp_path / "state", "16m") as directory:
        config = make_config(tmp_path, fake_api.url, state={"path": str(directory / "state.db")})
        exporter = await start_exporter(config)
        port = exporter.metrics_port
        before = [fake_api.create() for _ in range(20)]
        append_lines(tmp_path / "app.log", [json_line(i) for i in before])

        async def resolved(n: int) -> bool:
            return value(await scrape(port), "zenmux_generations_total") == n

        await wait_until(lambda: resolved(20), what="20 generations before the fault")
        filler = fill(directory) if fault == "disk_full" else None
        if fault == "injected":  # every write fails, the way a read-only or failing disk answers
            sqlite_db(exporter).execute("PRAGMA query_only = ON")
        during_file = [fake_api.create() for _ in range(500)]
        during_udp = [fake_api.create() for _ in range(50)]
        append_lines(tmp_path / "app.log", [json_line(i) for i in during_file])
        udp_port = exporter.udp_sources[0].port
        for start in range(0, len(during_udp), 10):
            send_udp(udp_port, "\n".join(during_udp[start : start + 10]).encode())

        async def failing() -> bool:
            return value(await scrape(port), "zenmux_exporter_state_errors_total") > 0

        await wait_until(failing, what="state errors counted")
        text = await scrape(port)  # still serving
        assert value(text, "zenmux_generations_total") >= 20
        # The disk recovers: everything sent meanwhile is read again and resolved, once.
        if filler is not None:
            filler.unlink()
        else:
            sqlite_db(exporter).execute("PRAGMA query_only = OFF")
        everything = before + during_file + during_udp
        await wait_until(lambda: resolved(len(everything)), timeout=60, what="every id resolved after recovery")
        text = await scrape(port)
        truth = totals(r for i in everything if (r := fake_api.sim.record(i)) is not None)
        assert value(text, "zenmux_generations_total") == truth["generations"]
        assert value(text, "zenmux_tokens_total", token_type="prompt") == truth["prompt_tokens"]
        assert value(text, "zenmux_cost_usd_total") == pytest.approx(truth["billAmount"], rel=1e-12)
        assert value(text, "zenmux_exporter_ids_received_total", source="udp") == len(during_udp)
        await exporter.stop(drain_seconds=0)


async def test_after_a_failed_settle_its_ids_go_out_again_when_the_pause_ends(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write of results that fails pauses lookups; its ids, pending again, go out once the pause is over. The
    resolver slept while their results waited to be written (they were not due for it), so the failure must wake
    it: with no wake, an idle resolver slept MAX_WAIT_SECONDS (here an hour) with the ids due. On a clock only the
    test moves, and no wake from the test."""
    monkeypatch.setattr(resolver_module, "MAX_WAIT_SECONDS", 3600.0)
    clock = ManualClock()
    config = make_config(tmp_path, fake_api.url, resolve={"billing_delay_seconds": 0})
    exporter = await start_exporter(config, clock=clock)
    fail_next_settle(exporter)
    append_lines(tmp_path / "app.log", [json_line(fake_api.create())])

    async def metric(name: str) -> float:
        return value(await scrape(exporter.metrics_port), name)

    async def failed() -> bool:
        return await metric("zenmux_exporter_state_errors_total") == 1

    await wait_until(failed, what="the failed settle counted")
    assert await metric("zenmux_exporter_lookups_total") == 1
    clock.advance(resolver_module.STATE_ERROR_PAUSE_SECONDS)

    async def resolved() -> bool:
        return await metric("zenmux_generations_total") == 1

    await wait_until(resolved, what="the id looked up again after the pause")
    assert await metric("zenmux_exporter_lookups_total") == 2


async def test_a_large_file_found_damaged_after_ready_is_reported_and_ends_the_process(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file too large to check before /readyz is checked right after: its damage is then said as at start-up
    (/readyz, /healthz, the error log) and `run` exits 1."""
    await resolve_some(tmp_path, fake_api, start_exporter, n=20)  # the finished table holds them
    state = tmp_path / "state.db"
    damage_finished_table(state)
    monkeypatch.setattr("exporter.state.CHECK_AT_OPEN_BYTES", 0)
    config = make_config(tmp_path, fake_api.url)
    exporter = await start_exporter(config)
    assert exporter.state.problem is None  # ready: the check runs after
    await asyncio.wait_for(exporter.damaged.wait(), 20)
    async with httpx.AsyncClient() as client:
        for path in ("/readyz", "/healthz"):
            response = await client.get(f"http://127.0.0.1:{exporter.metrics_port}{path}")
            assert response.status_code == 503
            assert str(state) in response.text and "not a usable state database" in response.text
    await exporter.stop(drain_seconds=0)
    assert await asyncio.wait_for(run_exporter(config, config.zenmux.api_key), 20) == 1
