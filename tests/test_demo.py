"""The README's first command: the demo shows resolved cost and tokens by model within 15 seconds."""

from __future__ import annotations

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
