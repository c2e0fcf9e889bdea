"""The real openai/anthropic/google-genai SDKs, current and previous majors, through zenmux_emit's hooks.

Each SDK venv runs tests/sdk_scenarios.py against the simulated ZenMux's protocol endpoints; the ids the
application saw must be exactly the ids the hooks emitted. The previous majors live in .venv-sdk-prev (built
by `make test`, see the Makefile), since they cannot share a venv with the current ones. Last, end to end: SDK
calls -> emitted ids (file and UDP) -> the exporter -> /metrics equal to the simulated API's records.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from google import genai
from google.genai import types
from zenmux_emit import hooks
from zenmux_emit.emit import FileEmitter, UdpEmitter

from exporter.simulate.api import SimulatedZenMux, totals
from exporter.simulate.protocols import ANSWER
from tests.support import PAYG_KEY, FakeApi, StartExporter, make_config, scrape, value, wait_until

ROOT = Path(__file__).resolve().parent.parent
PREVIOUS_PYTHON = Path(os.environ.get("ZENMUX_SDK_PREV_PYTHON", ROOT / ".venv-sdk-prev" / "bin" / "python"))
# Each scenario's protocol, as the simulator records it.
PROTOCOL = {"openai.chat": "chat.completions", "openai.responses": "responses", "anthropic": "messages"}
PROTOCOL["genai"] = "generateContent"


def pins(text: str) -> dict[str, str]:
    return dict(re.findall(r'"?(openai|anthropic|google-genai)==([0-9.]+)', text))


async def run_scenarios(python: Path, api: FakeApi, tmp_path: Path) -> dict[str, Any]:
    emitted = tmp_path / "emitted.log"
    process = await asyncio.create_subprocess_exec(
        str(python),
        str(ROOT / "tests" / "sdk_scenarios.py"),
        api.url,
        PAYG_KEY,
        str(emitted),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT / "zenmux-emit" / "src")},
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()[-3000:]
    report: dict[str, Any] = json.loads(out)
    by_scenario: dict[str, list[str]] = {}
    for line in emitted.read_text().splitlines():
        record = json.loads(line)
        by_scenario.setdefault(record["scenario"], []).append(record["generation_id"])
    report["emitted"] = by_scenario
    return report


def check_report(report: dict[str, Any], sim: SimulatedZenMux) -> None:
    results: dict[str, dict[str, Any]] = report["results"]
    failed = {name: r["detail"] for name, r in results.items() if "error" in r}
    assert not failed, failed
    assert results.pop("openai.bad_key") == {"ids": [], "text": "AuthenticationError 401"}  # unchanged for the app
    assert "openai.bad_key" not in report["emitted"]
    for name, result in results.items():
        assert len(result["ids"]) == 1, name
        assert report["emitted"].get(name) == result["ids"], name  # each id once, the one the app saw
        assert result["text"] == ANSWER, name  # streams still iterate to the same text
        record = sim.record(result["ids"][0])
        assert record is not None, name
        protocol = next(p for prefix, p in PROTOCOL.items() if name.removeprefix("async.").startswith(prefix))
        assert record["api"] == protocol, name
    assert len(results) == 29


async def test_current_majors(fake_api: FakeApi, tmp_path: Path) -> None:
    report = await run_scenarios(Path(sys.executable), fake_api, tmp_path)
    assert report["versions"] == pins((ROOT / "pyproject.toml").read_text())
    check_report(report, fake_api.sim)


async def test_previous_majors(fake_api: FakeApi, tmp_path: Path) -> None:
    if not PREVIOUS_PYTHON.exists():
        pytest.fail(f"{PREVIOUS_PYTHON} is missing: `make test` (or `make .venv-sdk-prev/.installed`) builds it")
    report = await run_scenarios(PREVIOUS_PYTHON, fake_api, tmp_path)
    assert report["versions"] == pins((ROOT / "tests" / "sdk-prev-requirements.txt").read_text())
    check_report(report, fake_api.sim)


async def test_sdk_calls_reach_metrics_with_the_api_totals(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    exporter = await start_exporter(make_config(tmp_path, fake_api.url))
    to_file = FileEmitter(tmp_path / "app.log")
    to_udp = UdpEmitter("127.0.0.1", exporter.udp_sources[0].port)
    labels = {"feature": "sdk"}

    chat = openai.AsyncOpenAI(
        base_url=fake_api.url + "/api/v1",
        api_key=PAYG_KEY,
        http_client=openai.DefaultAsyncHttpxClient(event_hooks=hooks.async_event_hooks(to_file, labels=labels)),
    )
    claude = anthropic.AsyncAnthropic(
        base_url=fake_api.url + "/api/anthropic",
        api_key=PAYG_KEY,
        http_client=anthropic.DefaultAsyncHttpxClient(event_hooks=hooks.async_event_hooks(to_udp)),
    )
    gemini = genai.Client(
        vertexai=True,
        api_key=PAYG_KEY,
        http_options=types.HttpOptions(
            base_url=fake_api.url + "/api/vertex-ai",
            api_version="v1",
            async_client_args={"event_hooks": hooks.async_event_hooks(to_file, labels=labels)},
        ),
    )
    messages: Any = [{"role": "user", "content": "hello"}]
    ids = [(await chat.chat.completions.create(model="openai/gpt-4.1", messages=messages)).id]
    stream = await chat.responses.create(model="openai/o4-mini", input="hello", stream=True)
    ids += [event.response.id async for event in stream if event.type == "response.created"]
    async with claude.messages.stream(model="anthropic/claude-opus-4", max_tokens=64, messages=messages) as events:
        ids.append((await events.get_final_message()).id)
    ids.append(str((await gemini.aio.models.generate_content(model="gemini-2.5-pro", contents="hi")).response_id))
    assert (to_file.sent, to_udp.sent) == (3, 1)

    async def all_resolved() -> bool:
        return value(await scrape(exporter.metrics_port), "zenmux_generations_total") == 4

    await wait_until(all_resolved, what="the 4 SDK generations on /metrics")
    text = await scrape(exporter.metrics_port)
    truth = totals(r for i in ids if (r := fake_api.sim.record(i)) is not None)
    assert truth["generations"] == 4
    assert value(text, "zenmux_tokens_total", token_type="prompt") == truth["prompt_tokens"]
    assert value(text, "zenmux_tokens_total", token_type="completion") == truth["completion_tokens"]
    assert value(text, "zenmux_cost_usd_total") == pytest.approx(truth["billAmount"], rel=1e-12)
    assert value(text, "zenmux_generations_total", feature="sdk") == 3
    for protocol in PROTOCOL.values():
        assert value(text, "zenmux_generations_total", protocol=protocol) == 1
