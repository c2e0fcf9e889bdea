"""Pure parsers, by table: log lines, datagrams, API responses, Retry-After, and the lookup classification."""

from __future__ import annotations

import json
from typing import Any

import pytest

from exporter.ids import (
    DATAGRAM_TOO_LARGE,
    INVALID_ID,
    NO_ID,
    NOT_JSON,
    Sighting,
    is_valid_id,
    json_parser,
    parse_datagram,
    plain_parser,
    regex_parser,
)
from exporter.records import MalformedResponse, Outcome, classify, decode_json, parse_generation, parse_retry_after

EXAMPLE: dict[str, Any] = {
    "api": "chat.completions",
    "generationId": "dc41ec9a378d43a497ca2daff171ceb0",
    "model": "anthropic/claude-sonnet-4",
    "createAt": "2026-11-25T10:15:02.120Z",
    "generationTime": 4210,
    "latency": 690,
    "nativeTokens": {
        "completion_tokens": 350,
        "prompt_tokens": 1200,
        "total_tokens": 1550,
        "completion_tokens_details": {"reasoning_tokens": 120},
        "prompt_tokens_details": {"cached_tokens": 800},
    },
    "streamed": True,
    "finishReason": "stop",
    "usage": 0.00885,
    "ratingResponses": {
        "billAmount": 0.00885,
        "discountAmount": 0.0,
        "originAmount": 0.00885,
        "priceVersion": "v1",
        "ratingDetails": [
            {"feeItemCode": "prompt", "rate": 3, "originAmount": 0.0036, "discountAmount": 0, "billAmount": 0.0036},
            {
                "feeItemCode": "completion",
                "rate": 15,
                "originAmount": 0.00525,
                "discountAmount": 0,
                "billAmount": 0.00525,
            },
        ],
    },
    "requestRetryTimes": 0,
    "finalRetry": True,
}


@pytest.mark.parametrize(
    ("candidate", "valid"),
    [
        ("dc41ec9a378d43a497ca2daff171ceb0", True),
        ("resp_abc123", True),
        ("2534CCEDTKJR00217635", True),
        ("gen_01:a.b-c", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("", False),
        ("has space", False),
        ("quote\"", False),
        ("ünïcode", False),
        ("new\nline", False),
    ],
)
def test_valid_ids(candidate: str, valid: bool) -> None:
    assert is_valid_id(candidate) is valid


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"generation_id": "abc", "feature": "chat"}', Sighting("abc", (("feature", "chat"),))),
        (b'{"generation_id": "abc"}', Sighting("abc")),
        (b'{"generation_id": "abc", "feature": true}', Sighting("abc", (("feature", "true"),))),
        (b'{"generation_id": "abc", "feature": {"nested": 1}}', Sighting("abc")),
        (b'{"generation_id": "bad id"}', INVALID_ID),
        (b'{"generation_id": 42}', INVALID_ID),
        (b'{"other": "abc"}', NO_ID),
        (b"[1, 2]", NOT_JSON),
        (b"plain text", NOT_JSON),
        (b"\xff\xfe\x00", NOT_JSON),
        (b"[" * 100_000, NOT_JSON),
    ],
)
def test_json_lines(line: bytes, expected: Sighting | str) -> None:
    assert json_parser("generation_id", {"feature": "feature"})(line) == expected


def test_json_dotted_paths() -> None:
    parse = json_parser("response.id", {"team": "meta.team"})
    assert parse(b'{"response": {"id": "r1"}, "meta": {"team": "ml"}}') == Sighting("r1", (("team", "ml"),))
    assert parse(b'{"response": "r1"}') == NO_ID


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"INFO call done gen=abc123 feature=chat", Sighting("abc123", (("feature", "chat"),))),
        (b"INFO call done gen=abc123", Sighting("abc123")),
        (b"INFO nothing here", NO_ID),
    ],
)
def test_regex_lines(line: bytes, expected: Sighting | str) -> None:
    parse = regex_parser(r"gen=(?P<id>\S+)(?: feature=(?P<feature>\w+))?", {"feature": "feature"})
    assert parse(line) == expected


@pytest.mark.parametrize(
    ("line", "expected"),
    [(b"abc", Sighting("abc")), (b"  abc \r", Sighting("abc")), (b"a b", INVALID_ID), (b"   ", NO_ID)],
)
def test_plain_lines(line: bytes, expected: Sighting | str) -> None:
    assert plain_parser()(line) == expected


def test_datagrams_carry_several_ids_and_are_bounded() -> None:
    parse = plain_parser()
    assert parse_datagram(b"a\nb\r\n\nc\n", parse, 100) == [Sighting("a"), Sighting("b"), Sighting("c")]
    assert parse_datagram(b"a" * 101, parse, 100) == [DATAGRAM_TOO_LARGE]
    assert parse_datagram(b"", parse, 100) == []


def test_the_reference_example_parses_exactly() -> None:
    record = parse_generation(EXAMPLE)
    assert (record.prompt_tokens, record.completion_tokens, record.reasoning_tokens, record.cached_tokens) == (
        1200,
        350,
        120,
        800,
    )
    assert record.latency_seconds == 0.69 and record.generation_seconds == 4.21
    assert record.billing is not None
    assert record.billing.bill_usd == 0.00885
    assert [(f.code, f.bill_usd) for f in record.billing.fee_items] == [("prompt", 0.0036), ("completion", 0.00525)]
    assert record.streamed is True and record.finish_reason == "stop" and record.upstream_retries == 0


@pytest.mark.parametrize(
    "payload",
    [
        {"data": EXAMPLE},
        {"success": True, "data": EXAMPLE},
        # The console's raw meta: createdAt, amounts as strings, unknown fields.
        {
            **{k: v for k, v in EXAMPLE.items() if k not in ("createAt", "usage")},
            "createdAt": "2026-11-25T10:15:02.120Z",
            "usage": "0.00885",
            "modelSlug": "claude-sonnet-4",
            "throughput": 83.1,
        },
    ],
)
def test_known_variations_parse_the_same(payload: dict[str, Any]) -> None:
    record = parse_generation(payload)
    assert record.generation_id == EXAMPLE["generationId"]
    assert record.billing is not None and record.billing.credits == pytest.approx(0.00885)


def _with_details(details: list[Any]) -> dict[str, Any]:
    return {**EXAMPLE, "ratingResponses": {**EXAMPLE["ratingResponses"], "ratingDetails": details}}


def test_numbers_at_their_bounds() -> None:
    record = parse_generation({**EXAMPLE, "usage": 1e6, "latency": -0.0, "requestRetryTimes": "2"})
    assert record.billing is not None and record.billing.credits == 1e6
    assert record.latency_seconds == 0.0 and record.upstream_retries == 2


def test_missing_billing_is_none_not_zero() -> None:
    metering = {k: v for k, v in EXAMPLE.items() if k not in ("usage", "ratingResponses")}
    assert parse_generation(metering).billing is None


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ([EXAMPLE], "not an object"),
        ({"foo": 1}, "not a generation record"),
        ({**EXAMPLE, "latency": -5}, "latency is negative"),
        ({**EXAMPLE, "usage": float("nan")}, "usage is negative or not finite"),
        ({**EXAMPLE, "usage": "lots"}, "usage is not numeric"),
        ({**EXAMPLE, "model": 7}, "model has type int"),
        ({**EXAMPLE, "nativeTokens": "many"}, "nativeTokens has type str"),
        ({**EXAMPLE, "nativeTokens": {"prompt_tokens": 1e20}}, "implausibly large"),
        ({**EXAMPLE, "streamed": "maybe"}, "streamed is not a boolean"),
        ({**EXAMPLE, "latency": True}, "latency is a boolean"),
        ({**EXAMPLE, "latency": float("inf")}, "latency is negative or not finite"),
        ({**EXAMPLE, "usage": 1e6 + 1}, "usage is implausibly large"),
        ({**EXAMPLE, "requestRetryTimes": -1}, "requestRetryTimes is negative"),
        (_with_details([{"billAmount": 1}, 7]), r"ratingResponses\.ratingDetails\[1\] has type int, not an object"),
        (_with_details([{"billAmount": -0.5}]), r"ratingResponses\.ratingDetails\[0\]\.billAmount is negative"),
        (_with_details([{"originAmount": "x"}]), r"ratingResponses\.ratingDetails\[0\]\.originAmount is not numeric"),
        (_with_details([{"feeItemCode": 3}]), r"ratingResponses\.ratingDetails\[0\]\.feeItemCode has type int"),
        (_with_details([{"discountAmount": float("nan")}]), r"ratingDetails\[0\]\.discountAmount is negative or not"),
    ],
)
def test_what_cannot_be_a_record_is_malformed(payload: Any, reason: str) -> None:
    with pytest.raises(MalformedResponse, match=reason):
        parse_generation(payload)


@pytest.mark.parametrize(
    ("status", "body", "billing_expected", "outcome"),
    [
        (200, json.dumps(EXAMPLE).encode(), True, Outcome.RESOLVED),
        (200, json.dumps({k: v for k, v in EXAMPLE.items() if k != "ratingResponses" and k != "usage"}).encode(),
         True, Outcome.NOT_READY),
        (200, json.dumps({k: v for k, v in EXAMPLE.items() if k != "ratingResponses" and k != "usage"}).encode(),
         False, Outcome.RESOLVED),
        (200, b"{truncated", True, Outcome.MALFORMED),
        (200, b"<html>", True, Outcome.MALFORMED),
        (404, b"", True, Outcome.NOT_READY),
        (401, b'{"error": {"code": "401", "type": "unauthorized"}}', True, Outcome.UNAUTHORIZED),
        (403, b'{"error": {"code": "403", "type": "access_denied"}}', True, Outcome.UNAUTHORIZED),
        (429, b"", True, Outcome.RATE_LIMITED),
        (422, b"", True, Outcome.RATE_LIMITED),
        (500, b"", True, Outcome.SERVER_ERROR),
        (503, b"<html>", True, Outcome.SERVER_ERROR),
        (400, b"", True, Outcome.CLIENT_ERROR),
    ],
)
def test_classify(status: int, body: bytes, billing_expected: bool, outcome: Outcome) -> None:
    result = classify(status, body, {"x-zenmux-requestid": "r-1"}, billing_expected, now=0.0)
    assert result.outcome is outcome
    assert result.request_id == "r-1"


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("", None),
        ("7", 7.0),
        ("-3", 0.0),
        ("99999", 3600.0),
        ("soon", None),
        ("nan", None),
        ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),
    ],
)
def test_retry_after(header: str | None, seconds: float | None) -> None:
    now = 1445412480.0  # 2015-10-21 07:28:00 UTC
    assert parse_retry_after(header, now) == seconds


@pytest.mark.parametrize(
    "body",
    [
        json.dumps({"success": True, "data": EXAMPLE}).encode(),
        b'{"a": 1, "a": 2}',  # a repeated key: the last
        b'{"n": NaN, "i": Infinity, "m": -Infinity}',
        b'{"big": 123456789012345678901234567890, "neg": -9223372036854775809}',
        b'{"f": 1e400, "g": -0.0, "h": 5e-324, "k": 0.1}',
        '{"utf16": "é"}'.encode("utf-16"),
        b'\xef\xbb\xbf{"bom": 1}',
        b'{"lone": "\\ud800"}',
        b'{"bad utf-8": "\xff"}',
        '{"s": "日本 \\u00e9 \\n"}'.encode(),
        b"[" * 100_000 + b"]" * 100_000,
        b"",
        b"{} trailing",
        b'{"open": ',
        b"  [1, 2.5, true, false, null]  ",
    ],
)
def test_json_decoding_is_json_loads(body: bytes) -> None:
    """orjson where it accepts the body, json.loads otherwise: the value, or the kind of error, json.loads'."""
    try:
        expected: Any = json.loads(body)
    except (ValueError, RecursionError) as err:
        with pytest.raises(type(err)):
            decode_json(body)
        return
    decoded = decode_json(body)
    if b"big" in body:  # past 64 bits orjson gives a float: the record's parser makes every number one anyway
        assert {k: float(v) for k, v in decoded.items()} == {k: float(v) for k, v in expected.items()}
        return
    assert repr(decoded) == repr(expected)  # repr: NaN equals itself, -0.0 is told from 0.0
