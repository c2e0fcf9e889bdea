"""The README's first command: the demo shows resolved cost and tokens by model within 15 seconds."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import samples, scrape, value, wait_until

pytestmark = pytest.mark.slow  # `zenmux-exporter demo` as a process


async def test_demo_shows_cost_by_model_within_15_seconds() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "exporter", "demo", "--listen", "127.0.0.1:0", "--rate", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        port = None
        for line in process.stdout:
            if match := re.search(r"metrics:\s+http://127\.0\.0\.1:(\d+)/metrics", line):
                port = int(match.group(1))
            if match := re.search(r"app log:\s+(\S+)/app\.log", line):
                directory = Path(match.group(1))
                break
        assert port is not None and directory.is_dir()
        text = ""

        async def cost_shown() -> bool:
            nonlocal text
            text = await scrape(port)
            return value(text, "zenmux_cost_usd_total") > 0

        await wait_until(cost_shown, timeout=15, what="cost on the demo's /metrics")
        assert value(text, "zenmux_tokens_total", token_type="prompt") > 0
        assert len({labels["model"] for name, labels, _ in samples(text) if name == "zenmux_cost_usd_total"}) >= 1
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
        assert process.returncode == 0
        # What it says about its pending ids is what it does with them.
        assert f"demo stopped; {directory} deleted with its" in out
        assert not directory.exists()
        assert "for the next start" not in out + err and "stay in" not in out + err
    finally:
        process.kill()



async def test_the_fleet_demo_shows_cost_on_the_exposer_and_stops_every_process(pg_url: str) -> None:
    """docs/fleet.md's quick start: from a running PostgreSQL to cost on the exposer's /metrics."""
    process = subprocess.Popen(
        [sys.executable, "-m", "exporter", "demo", "--fleet", pg_url, "--listen", "127.0.0.1:0", "--rate", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        members: dict[str, tuple[int, int]] = {}  # name -> (metrics port, pid)
        for line in process.stdout:
            if match := re.search(r"^\s+([a-z0-9-]+):\s+http://127\.0\.0\.1:(\d+)/metrics\s+\(pid (\d+)", line):
                members[match.group(1)] = (int(match.group(2)), int(match.group(3)))
            if match := re.search(r"configs, logs:\s+(\S+)", line):
                directory = Path(match.group(1))
                break
        assert sorted(members) == ["exposer", "ingest", "resolver-1", "resolver-2"]
        # The role configs are there to read and reuse, with a billing delay of seconds.
        configs = {name: (directory / f"{name}.yaml").read_text() for name in members}
        assert "roles:\n- resolve" in configs["resolver-1"] and "billing_delay_seconds: 3" in configs["ingest"]
        assert pg_url not in "".join(configs.values())  # the URL comes from the environment
        exposer = members["exposer"][0]
        text = ""

        async def cost_shown() -> bool:
            nonlocal text
            text = await scrape(exposer)
            return value(text, "zenmux_cost_usd_total") > 0

        await wait_until(cost_shown, timeout=60, what="cost on the fleet demo's exposer")
        assert value(text, "zenmux_exporter_expose_leader") == 1
        lookups = [value(await scrape(members[r][0]), "zenmux_exporter_lookups_total", outcome="resolved")
                   for r in ("resolver-1", "resolver-2")]
        assert sum(lookups) > 0
        assert value(await scrape(members["ingest"][0]), "zenmux_generations_total") == 0  # only the exposer
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert re.search(rf"demo stopped; .*; {re.escape(str(directory))} deleted", out), out
        assert not directory.exists()
        for _port, pid in members.values():
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        process.kill()


def test_the_fleet_demo_refuses_a_url_libpq_cannot_use_before_starting_anything() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "demo", "--fleet", "postgresql://u:hunter2@h:notaport/db"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "state.url: port 'notaport' must be a number" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


def test_demo_on_a_busy_port_says_so_and_exits_1() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "exporter", "demo", "--listen", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_fake_api_rejects_a_bad_fault_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    from exporter.__main__ import main

    assert main(["fake-api", "--fault", "bogus=1"]) == 2
    assert main(["fake-api", "--fault", "slow=lots"]) == 2
    assert "use KIND=RATIO" in capsys.readouterr().err
