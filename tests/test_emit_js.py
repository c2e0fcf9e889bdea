"""zenmux-emit-js, the Node package: its node --test suites, its types, its encoding against zenmux_emit's, and
a real SDK call from Node through UDP and the exporter to /metrics.

The suites run against the simulated ZenMux of the `fake_api` fixture, so each id the Node SDK scenarios emit
is checked here against the simulated API's records. `make test` installs Node (scripts/install-tools.sh) and
the pinned SDKs (`npm ci`, zenmux-emit-js/package-lock.json) first.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from zenmux_emit.emit import encode_json, open_emitter, valid_id

from exporter.simulate.api import totals
from tests.support import PAYG_KEY, FakeApi, StartExporter, make_config, scrape, value, wait_until

ROOT = Path(__file__).resolve().parent.parent
JS = ROOT / "zenmux-emit-js"
SUITES = ("test/emit.test.mjs", "test/capture.test.mjs", "test/sdk.test.mjs")
# The Node SDK scenarios (sdk.test.mjs) that create a generation: all but the two bad-key ones.
SDK_SCENARIOS = 40


def node() -> str:
    found = shutil.which("node")
    if found is None:
        pytest.fail("node is missing: `make test` (or `make tools`) installs it")
    if not (JS / "node_modules" / ".package-lock.json").exists():
        pytest.fail("zenmux-emit-js/node_modules is missing: `make test` (or `make js`) runs `npm ci`")
    return found


async def run_node(*args: str, stdin: bytes = b"", env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Runs node in zenmux-emit-js without blocking the event loop that serves the simulated API."""
    process = await asyncio.create_subprocess_exec(
        node(),
        *args,
        cwd=JS,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_node_suites_pass_and_emit_the_simulated_apis_ids(fake_api: FakeApi, tmp_path: Path) -> None:
    emitted = tmp_path / "emitted.log"
    env = {"ZENMUX_SIM_URL": fake_api.url, "ZENMUX_JS_EMITTED": str(emitted)}
    code, out, err = await run_node("--test", "--test-reporter=tap", *SUITES, env=env)
    assert code == 0, (out + err)[-6000:]
    by_scenario: dict[str, list[tuple[str, str]]] = {}
    for line in emitted.read_text().splitlines():
        record = json.loads(line)
        by_scenario.setdefault(record["scenario"], []).append((record["generation_id"], record["protocol"]))
    assert len(by_scenario) == SDK_SCENARIOS
    for name, sent in by_scenario.items():
        assert len(sent) == 1, name  # one id per call, whatever the SDK read
        generation_id, protocol = sent[0]
        record = fake_api.sim.record(generation_id)
        assert record is not None, name  # a generation the simulated API created
        assert record["api"] == protocol, name


async def test_type_declarations_fit_the_sdks_fetch_options() -> None:
    code, out, err = await run_node(str(JS / "node_modules" / "typescript" / "bin" / "tsc"), "-p", "test/tsconfig.json")
    assert code == 0, out + err


LABEL_CASES: list[tuple[str, list[tuple[str, Any]], str | None]] = [
    ("gen-1", [], None),
    ("gen-1", [("feature", "chat"), ("n", 3), ("ratio", 0.25), ("flag", True), ("off", False)], None),
    ("gen-1", [("generation_id", "evil"), ("obj", [1]), ("none", None), ("map", {"a": 1})], None),
    ("gen-1", [("4", "integer-like name"), ("feature", "after it")], "meta.id"),
    ("resp_0123:abc.DEF-_", [("text", 'quote " backslash \\ newline \n tab \t nul \x00 del \x7f')], None),
    ("gen-1", [("unicode", "naïve 😀 \u2028 €"), ("long", "😀" * 1100), ("ascii", "a" * 2000)], None),
    ("gen-1", [("big", 12345678901234), ("huge", 10**21), ("neg", -7), ("small", 1.5e-7), ("e", 1e-5)], "gid"),
    # Not integral floats (3.0): JS cannot tell them from ints, and writes them as Python writes ints.
    ("gen-1", [("a", 123.456), ("b", 0.0001), ("c", -2.5), ("d", 1.0 / 3), ("e", 1234567.0625), ("f", -4e-300)], None),
]
ID_CASES: list[Any] = [
    "gen-1", "a" * 128, "a" * 129, "", "resp_0123:abc.DEF-_", "has space", "naïve", "line\nbreak", "trailing\n",
    None, 12, "x:y.z-_", "😀",
]
TARGETS = [
    "", "none", "  none  ", "udp://127.0.0.1:9467", "udp://127.0.0.1:9467?format=json&id_field=gid",
    "udp://127.0.0.1:9467?format=jsn", "udp://127.0.0.1", "udp://localhost", "udp://localhost:9467",
    "udp://127.0.0.1:0", "udp://127.0.0.1:70000", "udp://[::1]:9467", "udp://[::1", "file:///tmp/zenmux-x.log",
    "file:///nonexistent-dir-zenmux/x.log", "file://relative/path", "file:///x?max_bytes=z",
    "file:///tmp/zenmux-x.log?max_bytes=100", "file://localhost/tmp/zenmux-x.log", "tcp://127.0.0.1:1",
]


def _kind(target: str) -> list[Any]:
    emitter = open_emitter(target)
    close = getattr(emitter, "close", None)
    if close is not None:
        close()
    return [{"UdpEmitter": "udp", "FileEmitter": "file", "NullEmitter": "null"}[type(emitter).__name__],
            bool(emitter.last_error)]


async def test_node_and_python_agree_on_ids_lines_and_targets() -> None:
    table = {"ids": ID_CASES, "lines": LABEL_CASES, "targets": TARGETS}
    code, out, err = await run_node("test/encode-table.mjs", stdin=json.dumps(table).encode())
    assert code == 0, err[-3000:]
    node_says = json.loads(out)
    assert node_says["valid"] == [valid_id(v) for v in ID_CASES]
    for (generation_id, pairs, id_field), line in zip(LABEL_CASES, node_says["lines"], strict=True):
        expected = encode_json(generation_id, dict(pairs), id_field or "generation_id").decode()
        assert line == expected  # byte for byte: key order, escapes, number text, the 1024-character cut
    assert node_says["targets"] == [_kind(t) for t in TARGETS]


async def test_node_sdk_calls_reach_metrics_with_the_api_totals(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    udp = {"type": "udp", "name": "udp", "listen": "127.0.0.1:0", "format": "json", "labels": {"feature": "feature"}}
    config = make_config(tmp_path, fake_api.url, sources=[udp])
    exporter = await start_exporter(config)
    target = f"udp://127.0.0.1:{exporter.udp_sources[0].port}?format=json"
    code, out, err = await run_node("test/e2e-app.mjs", fake_api.url, PAYG_KEY, target)
    assert code == 0, err
    ids: list[str] = json.loads(out)
    assert len(ids) == 4

    async def all_resolved() -> bool:
        return value(await scrape(exporter.metrics_port), "zenmux_generations_total") == 4

    await wait_until(all_resolved, what="the 4 Node SDK generations on /metrics")
    text = await scrape(exporter.metrics_port)
    truth = totals(r for i in ids if (r := fake_api.sim.record(i)) is not None)
    assert truth["generations"] == 4
    assert value(text, "zenmux_tokens_total", token_type="prompt") == truth["prompt_tokens"]
    assert value(text, "zenmux_tokens_total", token_type="completion") == truth["completion_tokens"]
    assert value(text, "zenmux_cost_usd_total") == pytest.approx(truth["billAmount"], rel=1e-12)
    assert value(text, "zenmux_generations_total", feature="node") == 3  # openai's two and the AI SDK's
    for protocol in ("chat.completions", "responses", "messages", "generateContent"):
        assert value(text, "zenmux_generations_total", protocol=protocol) == 1
