"""Hostile input: property tests for every parser (log lines in each format, datagrams, API responses, config),
label values that try to break the exposition, a 100 MB line, a binary file and a UDP flood."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
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
    DATAGRAM_TOO_LARGE,
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
from tests.support import (
    FakeApi,
    StartExporter,
    append_lines,
    json_line,
    make_config,
    peak_allocations,
    scrape,
    value,
    wait_until,
)

VALID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ids = st.one_of(st.from_regex(VALID, fullmatch=True), st.text(max_size=140))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=8), inner, max_size=3), max_leaves=8)


def dig(document: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        document = document.get(key) if isinstance(document, dict) else None
    return document


def reference(line: bytes, path: tuple[str, ...] = ("generation_id",),
              labels: tuple[tuple[str, tuple[str, ...]], ...] = (("feature", ("feature",)),)) -> Sighting | str:
    """What the json format means, by json.loads (the parser may take a faster path to the same answer)."""
    try:
        document = json.loads(line)
    except (ValueError, RecursionError):
        return NOT_JSON
    if not isinstance(document, dict):
        return NOT_JSON
    value = dig(document, path)
    if value is None:
        return NO_ID
    if not isinstance(value, str) or not VALID.fullmatch(value):
        return INVALID_ID
    found = []
    for name, where in labels:
        label = dig(document, where)
        if isinstance(label, bool):
            found.append((name, "true" if label else "false"))
        elif isinstance(label, str | int | float):
            found.append((name, str(label)))
    return Sighting(value, tuple(found))


REGEX = r"gen=(?P<id>\S+)(?: feature=(?P<f>\S+))?"


def regex_reference(line: bytes) -> Sighting | str:
    """The regex format: the first match in the line, decoded with replacement characters."""
    match = re.search(REGEX, line.decode("utf-8", "replace"))
    if match is None:
        return NO_ID
    if not VALID.fullmatch(match["id"]):
        return INVALID_ID
    return Sighting(match["id"], () if match["f"] is None else (("feature", match["f"]),))


def plain_reference(line: bytes) -> Sighting | str:
    """The plain format: the stripped line is the id."""
    text = line.strip().decode("utf-8", "replace")
    if not text:
        return NO_ID
    return Sighting(text) if VALID.fullmatch(text) else INVALID_ID


@FAST
@given(document=st.dictionaries(st.sampled_from(["generation_id", "feature", "ts", "level", "x"]), json_values
                                | ids, max_size=5),
       separators=st.sampled_from([(",", ":"), (", ", ": "), (" , ", " :  ")]), ascii_only=st.booleans())
def test_json_lines_parse_like_json_loads(document: dict[str, Any], separators: tuple[str, str],
                                          ascii_only: bool) -> None:
    line = json.dumps(document, separators=separators, ensure_ascii=ascii_only).encode()
    assert json_parser("generation_id", {"feature": "feature"})(line) == reference(line)


@FAST
@given(line=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_bytes_in_every_line_format(line: bytes) -> None:
    assert json_parser("generation_id", {"feature": "feature"})(line) == reference(line)
    assert json_parser("a.b", {})(line) == reference(line, ("a", "b"), ())
    assert regex_parser(REGEX, {"feature": "f"})(line) == regex_reference(line)
    assert plain_parser()(line) == plain_reference(line)


@FAST
@given(data=st.binary(max_size=2000), limit=st.integers(64, 4096))
def test_datagrams(data: bytes, limit: int) -> None:
    """One answer per non-blank line, each the plain format's (which strips a CR); one rejection if oversized."""
    if len(data) > limit:
        expected: list[Sighting | str] = [DATAGRAM_TOO_LARGE]
    else:
        expected = [plain_reference(line) for line in data.split(b"\n") if line.strip()]
    assert parse_datagram(data, plain_parser(), limit) == expected


RECORD_FIELDS = ["api", "generationId", "model", "createAt", "generationTime", "latency", "nativeTokens", "streamed",
                 "finishReason", "usage", "ratingResponses", "requestRetryTimes", "data", "success"]


BILLED = {"generationId": "g", "usage": 0.1}

# Hostile shapes of a 200's body, each with its one right outcome (wrong field types and numbers are
# tests/test_api_faults.py's table; the documented variations are tests/test_parsing.py's).
HOSTILE_BODIES: dict[str, tuple[bytes, Outcome]] = {
    "empty": (b"", Outcome.MALFORMED),
    "null": (b"null", Outcome.MALFORMED),
    "a list": (b"[]", Outcome.MALFORMED),
    "a string": (b'"g"', Outcome.MALFORMED),
    "an empty object": (b"{}", Outcome.MALFORMED),
    "an empty envelope": (b'{"data": {}}', Outcome.MALFORMED),
    "an envelope of a list": (b'{"data": []}', Outcome.MALFORMED),
    "nested past the recursion limit": (b"[" * 100_000 + b"]" * 100_000, Outcome.MALFORMED),
    "invalid UTF-8": (b'{"generationId": "\xff"}', Outcome.MALFORMED),
    "a NaN literal": (b'{"generationId": "g", "usage": NaN}', Outcome.MALFORMED),
    "duplicate keys, the last not a string": (b'{"generationId": "g", "generationId": 1}', Outcome.MALFORMED),
    "trailing garbage": (json.dumps(BILLED).encode() + b"}", Outcome.MALFORMED),
    "ratingDetails not a list": (b'{"generationId": "g", "ratingResponses": {"billAmount": 0.1, '
                                 b'"ratingDetails": "x"}}', Outcome.MALFORMED),
    "a fee item not an object": (b'{"generationId": "g", "ratingResponses": {"billAmount": 0.1, '
                                 b'"ratingDetails": [1]}}', Outcome.MALFORMED),
    "an id and nothing else": (b'{"generationId": "g"}', Outcome.NOT_READY),
    "tokens without an id": (b'{"nativeTokens": {"prompt_tokens": 1}}', Outcome.NOT_READY),
    "an empty ratingResponses": (b'{"generationId": "g", "ratingResponses": {}}', Outcome.NOT_READY),
    "an outer id beside a billed envelope": (json.dumps({"generationId": "outer", "data": BILLED}).encode(),
                                             Outcome.NOT_READY),
    "billed, bare": (json.dumps(BILLED).encode(), Outcome.RESOLVED),
    "billed, enveloped": (json.dumps({"success": True, "data": BILLED}).encode(), Outcome.RESOLVED),
    "billed, unknown fields": (json.dumps({**BILLED, "x": [{"y": None}]}).encode(), Outcome.RESOLVED),
}


@pytest.mark.parametrize(("body", "outcome"), HOSTILE_BODIES.values(), ids=HOSTILE_BODIES.keys())
def test_hostile_bodies_have_one_outcome_each(body: bytes, outcome: Outcome) -> None:
    result = classify(200, body, {}, True, 0.0)
    assert result.outcome is outcome, result.detail
    assert (result.record is None) is (outcome is Outcome.MALFORMED)


@FAST
@given(body=st.dictionaries(st.sampled_from(RECORD_FIELDS), json_values, max_size=8))
def test_api_responses(body: dict[str, Any]) -> None:
    """Whatever a 200 carries: billed is resolved, a record without billing is not ready, anything else is
    malformed with a reason; and the {"data": ...} envelope changes nothing."""
    result = classify(200, json.dumps(body).encode(), {}, True, 0.0)
    if result.record is None:
        assert result.outcome is Outcome.MALFORMED and result.detail
    elif result.record.billing is None:
        assert result.outcome is Outcome.NOT_READY
    else:
        assert result.outcome is Outcome.RESOLVED
    if not isinstance(body.get("data"), dict):  # a body that is not itself an envelope
        assert classify(200, json.dumps({"data": body}).encode(), {}, True, 0.0) == result


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


# Generous on purpose (about 1 MB for the flood and 3 MB for the 100 MB line here, the test's own 2 MB of
# garbage included): it catches a buffer without a bound (the whole line; every datagram read), not a few MB.
ALLOCATION_BOUND = 16 * 1024 * 1024


async def test_a_100_mb_line_and_a_binary_file(tmp_path: Path, fake_api: FakeApi,
                                               start_exporter: StartExporter) -> None:
    """The line is dropped as it is read: what is allocated meanwhile stays far below the line (a buffer kept
    until the newline would be 100 MB). /metrics latency meanwhile is bench/'s `scrape` and `storm` figures."""
    log = tmp_path / "app.log"
    exporter = await start_exporter(make_config(tmp_path, fake_api.url))
    port = exporter.metrics_port
    chunk = b"x" * (1024 * 1024)
    with peak_allocations() as peak:
        with log.open("ab") as handle:
            for _ in range(100):
                handle.write(chunk)  # 100 MB, no newline yet

        async def rejected(n: int) -> bool:
            text = await scrape(port)
            return value(text, "zenmux_exporter_ids_rejected_total", reason="line_too_long") == n

        await wait_until(lambda: rejected(1), timeout=30, what="the long line rejected once")
        with log.open("ab") as handle:
            handle.write(b"tail of the long line\n")
            handle.write(os.urandom(2 * 1024 * 1024))  # a binary file's worth of garbage, newlines included
            handle.write(b"\n")
        good = fake_api.create()
        append_lines(log, [json_line(good)])

        async def resolved() -> bool:
            return value(await scrape(port), "zenmux_generations_total") == 1

        await wait_until(resolved, timeout=30, what="the good id after the garbage resolved")
    text = await scrape(port)
    assert value(text, "zenmux_exporter_ids_rejected_total", reason="line_too_long") == 1
    assert value(text, "zenmux_exporter_ids_rejected_total", source="app-log") > 1
    assert peak[0] < ALLOCATION_BOUND, f"{peak[0] / 2**20:.1f} MB allocated at the peak for a 100 MB line"


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
    """/metrics answers throughout a flood, and the buffer bound (max_buffered_ids) holds what is allocated
    meanwhile (tracemalloc). /metrics latency under UDP load is bench/'s `scrape` workload."""
    config = make_config(tmp_path, fake_api.url, resolve={"billing_delay_seconds": 3600, "give_up_after_seconds": 7200},
                         sources=[{"type": "udp", "name": "udp", "listen": "127.0.0.1:0", "format": "plain",
                                   "max_buffered_ids": 2000, "receive_buffer_bytes": 65536}])
    exporter = await start_exporter(config)
    port = exporter.metrics_port
    with peak_allocations() as peak:
        flood = subprocess.Popen([sys.executable, "-c", FLOOD, str(exporter.udp_sources[0].port), "3"],
                                 stdout=subprocess.PIPE, text=True)
        scrapes = 0
        while flood.poll() is None:
            await scrape(port)  # raises unless answered
            scrapes += 1
        sent = int(flood.communicate()[0])
    text = await scrape(port)
    datagrams = value(text, "zenmux_exporter_udp_datagrams_total")
    dropped = value(text, "zenmux_exporter_udp_dropped_datagrams_total")
    received = value(text, "zenmux_exporter_ids_received_total", source="udp")
    assert scrapes > 0
    assert 0 < datagrams <= sent
    assert received + value(text, "zenmux_exporter_ids_duplicate_total") > 0
    print(f"flood: {sent} datagrams sent, {datagrams:.0f} read, {dropped:.0f} dropped by the buffer bound, "
          f"{received:.0f} ids queued; {scrapes} scrapes answered; peak allocations {peak[0] / 2**20:.1f} MB")
    assert peak[0] < ALLOCATION_BOUND, f"{peak[0] / 2**20:.1f} MB allocated at the peak"


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
