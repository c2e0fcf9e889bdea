"""The API key never leaks: a full session (auth failures, then resolving) at debug level with spans on the
console, /metrics in both formats, check-config and a crash traceback are grepped for the key."""

from __future__ import annotations

import json
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from exporter.config import UdpSourceConfig, parse_config
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

pytestmark = pytest.mark.slow  # whole sessions of the exporter as processes

WRONG_KEY = "sk-ai-v1-" + secrets.token_hex(20)  # unknown to the API: every lookup answers 401


def session_config(tmp_path: Path, api_url: str, name: str, key: dict[str, str], log_format: str) -> dict[str, Any]:
    return {
        "zenmux": {"base_url": api_url, **key, "timeout_seconds": 2},
        "resolve": {"billing_delay_seconds": 0.1, "retry_initial_seconds": 0.05, "retry_max_seconds": 0.2},
        "sources": [
            {"type": "file", "name": "app-log", "path": str(tmp_path / "app.log"), "format": "plain",
             "start_at": "beginning", "poll_interval_seconds": 0.02},
            {"type": "udp", "name": "udp", "listen": f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}"},
        ],
        "state": {"path": str(tmp_path / f"{name}.db")},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "tracing": {"exporter": "console"},  # every span, with its attributes, on stderr
        "log": {"level": "debug", "format": log_format},
        "shutdown": {"drain_seconds": 1},
    }


async def test_the_api_key_appears_in_no_output(tmp_path: Path) -> None:
    outputs: dict[str, str] = {}
    with api_process("--billing-delay", "0.1", log=tmp_path / "api.log") as api:
        with httpx.Client(headers={"Authorization": f"Bearer {PAYG_KEY}"}) as client:
            ids = [client.post(f"{api.url}/api/v1/generations", json={}).json()["id"] for _ in range(10)]
        (tmp_path / "app.log").write_text("".join(i + "\n" for i in ids))
        key_file = tmp_path / "api-key"
        key_file.write_text(PAYG_KEY + "\n")
        key_file.chmod(0o600)
        phases = [
            ("auth_failing", {"api_key": WRONG_KEY}, "text"),
            ("resolving", {"api_key_file": str(key_file)}, "json"),
            ("inline_key", {"api_key": PAYG_KEY}, "text"),
        ]
        async with httpx.AsyncClient() as http:
            for name, key, log_format in phases:
                data = session_config(tmp_path, api.url, name, key, log_format)
                config = write_config(tmp_path / f"{name}.yaml", data)
                port = int(data["metrics"]["listen"].rsplit(":", 1)[1])
                log = tmp_path / f"{name}.out"
                process = spawn_exporter(config, log)
                try:
                    await wait_ready(process, port, http)

                    async def settled(port: int = port, name: str = name) -> bool:
                        text = await metrics_text(port, http)
                        if text is None:
                            return False
                        if name == "auth_failing":
                            return value(text, "zenmux_exporter_api_auth_failing") == 1
                        return value(text, "zenmux_generations_total") == len(ids)

                    await wait_until(settled, what=f"{name}: auth failure seen or ids resolved")
                    outputs[f"{name} /metrics"] = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
                    outputs[f"{name} openmetrics"] = (await http.get(
                        f"http://127.0.0.1:{port}/metrics",
                        headers={"Accept": "application/openmetrics-text; version=1.0.0"})).text
                    process.send_signal(signal.SIGTERM)
                    assert process.wait(30) == 0
                finally:
                    if process.poll() is None:
                        process.kill()
                        process.wait()
                outputs[f"{name} stderr (logs and spans)"] = log.read_text()
                checked = subprocess.run([sys.executable, "-m", "exporter", "check-config", "--config", str(config)],
                                         capture_output=True, text=True)
                assert checked.returncode == 0, checked.stderr
                outputs[f"{name} check-config"] = checked.stdout + checked.stderr
    assert "401" in outputs["auth_failing stderr (logs and spans)"]
    assert '"zenmux.outcome": "unauthorized"' in outputs["auth_failing stderr (logs and spans)"]
    assert '"zenmux.outcome": "resolved"' in outputs["resolving stderr (logs and spans)"]
    assert "<redacted>" in outputs["inline_key check-config"]
    # A crash with the key in the exception's message: the traceback goes through the redacting log too.
    crash = subprocess.run(
        [sys.executable, "-c",
         "import sys, exporter.app\n"
         "async def boom(self):\n"
         "    raise RuntimeError('upstream said: bad key ' + self._api_key)\n"
         "exporter.app.Exporter.start = boom\n"
         "from exporter.__main__ import main\n"
         f"sys.exit(main(['run', '--config', {str(tmp_path / 'inline_key.yaml')!r}]))\n"],
        capture_output=True, text=True, timeout=30,
    )
    assert crash.returncode != 0
    assert "RuntimeError: upstream said: bad key <redacted>" in crash.stderr, crash.stderr
    outputs["crash traceback"] = crash.stdout + crash.stderr
    for where, text in outputs.items():
        for secret in (PAYG_KEY, WRONG_KEY, WRONG_KEY[9:]):
            assert secret not in text, f"the API key leaked into {where}"


def test_udp_listens_on_loopback_by_default() -> None:
    assert UdpSourceConfig().listen.startswith("127.0.0.1:")
    config = parse_config({"zenmux": {"api_key": "k"}, "sources": [{"type": "udp"}]}, "test", environ={})
    (source,) = config.sources
    assert isinstance(source, UdpSourceConfig) and source.listen.startswith("127.0.0.1:")


def test_json_logs_redact_too(capsys: Any) -> None:
    import logging

    from exporter.config import LogConfig
    from exporter.telemetry import configure_logging

    hook = sys.excepthook
    configure_logging(LogConfig(level="debug", format="json"), ["sk-ai-v1-topsecret"])
    try:
        logging.getLogger("exporter.test").debug("request with %s", "Bearer sk-ai-v1-topsecret")
        try:
            raise ValueError("sk-ai-v1-topsecret")
        except ValueError:
            logging.getLogger("exporter.test").exception("failed")
    finally:
        logging.getLogger().handlers.clear()
        sys.excepthook = hook
    err = capsys.readouterr().err
    assert "topsecret" not in err
    assert [json.loads(line)["msg"].splitlines()[0] for line in err.splitlines() if line.startswith("{")] == [
        "request with Bearer <redacted>", "failed"]
