"""Hostile input: property tests for every parser (log lines in each format, datagrams, API responses, config),
label values that try to break the exposition, a 100 MB line, a binary file and a UDP flood."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import ConfigError, parse_config
from exporter.contribution import OTHER, LabelLimiter, LedgerShape, contribution
from exporter.ids import (
    INVALID_ID,
    NO_ID,
    NOT_JSON,
    Sighting,
    json_parser,
    parse_datagram,
    plain_parser,
    regex_parser,
)
from exporter.ledger import Ledger
from exporter.records import GenerationRecord, Outcome, classify
from tests.exposition_oracle import LedgerCollector
from tests.support import FakeApi, StartExporter, append_lines, json_line, make_config, scrape, value, wait_until

VALID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ids = st.one_of(st.from_regex(VALID, fullmatch=True), st.text(max_size=140))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=8), inner, max_size=3), max_leaves=8)


def reference(line: bytes) -> Sighting | str:
    """What the json format means, by json.loads (the parser may take a faster path to the same answer)."""
    try:
        document = json.loads(line)
    except (ValueError, RecursionError):
        return NOT_JSON
    if not isinstance(document, dict):
        return NOT_JSON
    value = document.get("generation_id")
    if value is None:
        return NO_ID
    if not isinstance(value, str) or not VALID.fullmatch(value):
        return INVALID_ID
    feature = document.get("feature")
    if isinstance(feature, bool):
        label = "true" if feature else "false"
    elif isinstance(feature, str | int | float):
        label = str(feature)
    else:
        return Sighting(value)
    return Sighting(value, (("feature", label),))


def check(result: Sighting | str) -> None:
    if isinstance(result, Sighting):
        assert VALID.fullmatch(result.id), result.id  # never an invalid id towards the API
    else:
        assert result in (NOT_JSON, NO_ID, INVALID_ID)


@FAST
@given(document=st.dictionaries(st.sampled_from(["generation_id", "feature", "ts", "level", "x"]), json_values
                                | ids, max_size=5),
       separators=st.sampled_from([(",", ":"), (", ", ": "), (" , ", " :  ")]), ascii_only=st.booleans())
def test_json_lines_parse_like_json_loads(document: dict[str, Any], separators: tuple[str, str],
                                          ascii_only: bool) -> None:
    line = json.dumps(document, separators=separators, ensure_ascii=ascii_only).encode()
    parse = json_parser("generation_id", {"feature": "feature"})
    result = parse(line)
    check(result)
    assert result == reference(line)


@FAST
@given(line=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_bytes_in_every_line_format(line: bytes) -> None:
    for parse in (json_parser("generation_id", {"feature": "feature"}), json_parser("a.b", {}),
                  regex_parser(r"gen=(?P<id>\S+)(?: feature=(?P<f>\S+))?", {"feature": "f"}), plain_parser()):
        check(parse(line))


@FAST
@given(data=st.binary(max_size=2000), limit=st.integers(64, 4096))
def test_datagrams(data: bytes, limit: int) -> None:
    parsed = parse_datagram(data, plain_parser(), limit)
    if len(data) > limit:
        assert parsed == ["datagram_too_large"]
    for item in parsed:
        if isinstance(item, Sighting):
            assert VALID.fullmatch(item.id)


RECORD_FIELDS = ["api", "generationId", "model", "createAt", "generationTime", "latency", "nativeTokens", "streamed",
                 "finishReason", "usage", "ratingResponses", "requestRetryTimes", "data", "success"]


@FAST
@given(body=st.dictionaries(st.sampled_from(RECORD_FIELDS), json_values, max_size=8), envelope=st.booleans())
def test_api_responses(body: dict[str, Any], envelope: bool) -> None:
    payload = {"data": body} if envelope else body
    result = classify(200, json.dumps(payload).encode(), {}, True, 0.0)
    assert result.outcome in (Outcome.RESOLVED, Outcome.NOT_READY, Outcome.MALFORMED)


config_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["zenmux", "sources", "type", "path", "listen", "api_key", "metrics", "extra_labels", "labels",
                     "state", "resolve", "format", "pattern", "name", "feature", "x"]), inner, max_size=4),
    max_leaves=12)


@FAST
@given(data=config_values)
def test_config(data: Any) -> None:
    try:
        parse_config(data, "hypothesis", environ={})
    except ConfigError as err:
        assert err.problems


def record(model: str, feature_reason: str) -> GenerationRecord:
    return GenerationRecord("g", model, "chat.completions", 0.5, 1.0, 10, 5, 0, 0, True, feature_reason, 0, None)


@FAST
@given(models=st.lists(st.text(min_size=1, max_size=400), min_size=1, max_size=30),
       features=st.lists(st.text(max_size=300), min_size=1, max_size=30))
def test_label_values_are_escaped_truncated_and_capped(models: list[str], features: list[str]) -> None:
    limiter = LabelLimiter(max_models=5, max_values=4, max_length=64)
    ledger = Ledger(LedgerShape(("feature",)), limiter)
    for i, model in enumerate(models):
        overlay = ledger.overlay()
        feature = features[i % len(features)]
        ledger.add(overlay, contribution(record(model, "stop\n\"quoted\""), {"feature": feature}, ledger.shape,
                                         limiter, {}))
        ledger.apply(overlay)
    registry = CollectorRegistry()
    registry.register(LedgerCollector(ledger))
    text = generate_latest(registry).decode()
    seen_models: set[str] = set()
    seen_features: set[str] = set()
    generations = 0.0
    for family in text_string_to_metric_families(text):  # parses back: every value escaped correctly
        for sample in family.samples:
            if sample.name == "zenmux_generations_total":
                generations += sample.value
                seen_models.add(sample.labels["model"])
                seen_features.add(sample.labels["feature"])
            for label in sample.labels.values():
                assert len(label) <= 64
    assert generations == len(models)
    assert len(seen_models - {OTHER}) <= 5
    assert len(seen_features - {OTHER, ""}) <= 4
    assert seen_models - {OTHER} <= {m[:64] for m in models}


def rss(pid: int | None = None) -> int:
    with open(f"/proc/{pid or 'self'}/statm") as handle:
        return int(handle.read().split()[1]) * 4096


async def scrape_fast(port: int) -> str:
    started = time.monotonic()
    text = await scrape(port)
    assert time.monotonic() - started < 1.0, "/metrics took over a second"
    return text


async def test_a_100_mb_line_and_a_binary_file(tmp_path: Path, fake_api: FakeApi,
                                               start_exporter: StartExporter) -> None:
    log = tmp_path / "app.log"
    exporter = await start_exporter(make_config(tmp_path, fake_api.url))
    port = exporter.metrics_port
    before = rss()
    chunk = b"x" * (1024 * 1024)
    with log.open("ab") as handle:
        for _ in range(100):
            handle.write(chunk)  # 100 MB, no newline yet
    await wait_until(lambda: log.stat().st_size > 0, what="written")

    async def rejected(n: int) -> bool:
        text = await scrape_fast(port)
        return value(text, "zenmux_exporter_ids_rejected_total", reason="line_too_long") == n

    await wait_until(lambda: rejected(1), timeout=30, what="the long line rejected once")
    with log.open("ab") as handle:
        handle.write(b"tail of the long line\n")
        handle.write(os.urandom(2 * 1024 * 1024))  # a binary file's worth of garbage, newlines included
        handle.write(b"\n")
    good = fake_api.create()
    append_lines(log, [json_line(good)])

    async def resolved() -> bool:
        return value(await scrape_fast(port), "zenmux_generations_total") == 1

    await wait_until(resolved, timeout=30, what="the good id after the garbage resolved")
    text = await scrape_fast(port)
    assert value(text, "zenmux_exporter_ids_rejected_total", reason="line_too_long") == 1
    assert value(text, "zenmux_exporter_ids_rejected_total", source="app-log") > 1
    assert rss() - before < 96 * 1024 * 1024, "memory grew with the line"


FLOOD = """
import socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
port, seconds = int(sys.argv[1]), float(sys.argv[2])
sent, end = 0, time.monotonic() + seconds
payload = b"\\n".join(b"flood-%06d-%d" % (i, j) for j in range(20) for i in range(1))
while time.monotonic() < end:
    for _ in range(200):
        try:
            sock.sendto(payload + b"%d" % sent, ("127.0.0.1", port))
        except OSError:
            pass
        sent += 1
print(sent)
"""


async def test_a_udp_flood(tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter) -> None:
    config = make_config(tmp_path, fake_api.url, resolve={"billing_delay_seconds": 3600},
                         sources=[{"type": "udp", "name": "udp", "listen": "127.0.0.1:0", "format": "plain",
                                   "max_buffered_ids": 2000, "receive_buffer_bytes": 65536}])
    exporter = await start_exporter(config)
    port = exporter.metrics_port
    before = rss()
    flood = subprocess.Popen([sys.executable, "-c", FLOOD, str(exporter.udp_sources[0].port), "3"],
                             stdout=subprocess.PIPE, text=True)
    slowest = 0.0
    while flood.poll() is None:
        started = time.monotonic()
        text = await scrape(port)
        slowest = max(slowest, time.monotonic() - started)
    sent = int(flood.communicate()[0])
    assert slowest < 1.0, f"/metrics took {slowest:.2f}s during the flood"
    text = await scrape(port)
    datagrams = value(text, "zenmux_exporter_udp_datagrams_total")
    dropped = value(text, "zenmux_exporter_udp_dropped_datagrams_total")
    received = value(text, "zenmux_exporter_ids_received_total", source="udp")
    assert 0 < datagrams <= sent
    assert received + value(text, "zenmux_exporter_ids_duplicate_total") > 0
    print(f"flood: {sent} datagrams sent, {datagrams:.0f} read, {dropped:.0f} dropped by the buffer bound, "
          f"{received:.0f} ids queued; slowest scrape {slowest * 1000:.0f} ms")
    assert rss() - before < 200 * 1024 * 1024


@pytest.mark.parametrize("bad", ['"quoted"', "new\nline", "ünï©ødé 🚀", "x" * 5000, "back\\slash", ""])
async def test_hostile_extra_label_values_end_to_end(bad: str, tmp_path: Path, fake_api: FakeApi,
                                                      start_exporter: StartExporter) -> None:
    exporter = await start_exporter(make_config(tmp_path, fake_api.url))
    generation_id = fake_api.create()
    append_lines(tmp_path / "app.log", [json.dumps({"generation_id": generation_id, "feature": bad})])

    async def resolved() -> bool:
        return value(await scrape(exporter.metrics_port), "zenmux_generations_total") == 1

    await wait_until(resolved, what="resolved")
    text = await scrape(exporter.metrics_port)
    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert "error" not in (lint.stdout + lint.stderr).lower(), lint.stdout + lint.stderr
    assert value(text, "zenmux_generations_total", feature=bad[:128]) == 1
