"""Generation records and lookup results, and the pure parsing of ZenMux's answers into them (tolerant of what
the API may send; no I/O)."""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import orjson


class Outcome(enum.StrEnum):
    """The `outcome` label of zenmux_exporter_lookups_total."""

    RESOLVED = "resolved"
    NOT_READY = "not_ready"
    RATE_LIMITED = "rate_limited"
    SERVER_ERROR = "server_error"
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    MALFORMED = "malformed"
    UNAUTHORIZED = "unauthorized"
    CLIENT_ERROR = "client_error"
    TOO_LARGE = "too_large"


@dataclass(frozen=True, slots=True)
class FeeItem:
    code: str
    bill_usd: float
    origin_usd: float
    discount_usd: float


@dataclass(frozen=True, slots=True)
class Billing:
    bill_usd: float
    origin_usd: float
    discount_usd: float
    credits: float
    fee_items: tuple[FeeItem, ...]


@dataclass(frozen=True, slots=True)
class GenerationRecord:
    generation_id: str
    model: str
    protocol: str
    latency_seconds: float | None
    generation_seconds: float | None
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cached_tokens: int
    streamed: bool | None
    finish_reason: str
    upstream_retries: int
    billing: Billing | None
    # The UTC day (YYYYMMDD) of createAt, the day ZenMux's account cost books the generation on; "" if unknown.
    day: str = ""


class MalformedResponse(ValueError):
    """The body cannot be a generation record; the message says why (never contains secrets)."""


# Bounds past which a value is a corrupt record, not data: one such value would stay in a counter for good
# (counters never go down, the ledger is durable) and drown every later increment's precision.
MAX_COUNT = 1e12
MAX_AMOUNT_USD = 1e6  # per generation; the dearest real ones cost dollars
MAX_MILLISECONDS = 1e9  # 11.6 days


def _number(value: Any, where: str, *, optional: bool = True, maximum: float = MAX_COUNT) -> float | None:
    kind = type(value)
    if (kind is float or kind is int) and 0 <= value <= maximum:  # nearly every value (NaN fails both tests)
        return float(value)
    if value is None:
        if optional:
            return None
        raise MalformedResponse(f"{where} is missing")
    if isinstance(value, bool):
        raise MalformedResponse(f"{where} is a boolean, not a number")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise MalformedResponse(f"{where} is not numeric") from None
    if not isinstance(value, int | float):
        raise MalformedResponse(f"{where} has type {type(value).__name__}, not a number")
    result = float(value)
    if not math.isfinite(result) or result < 0:
        raise MalformedResponse(f"{where} is negative or not finite")
    if result > maximum:
        raise MalformedResponse(f"{where} is implausibly large")
    return result


def _count(value: Any, where: str) -> int:
    number = _number(value, where)
    return 0 if number is None else int(number)


def _amount(value: Any, where: str) -> float:
    return _number(value, where, maximum=MAX_AMOUNT_USD) or 0.0


def _text(value: Any, where: str, default: str = "") -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise MalformedResponse(f"{where} has type {type(value).__name__}, not a string")
    return value


def _fee_item(detail: Any) -> FeeItem:
    """A ratingDetails entry; a MalformedResponse's message continues the entry's place (its caller's)."""
    detail = _mapping(detail, "")
    return FeeItem(
        code=_text(detail.get("feeItemCode"), ".feeItemCode", "unknown") or "unknown",
        bill_usd=_amount(detail.get("billAmount"), ".billAmount"),
        origin_usd=_amount(detail.get("originAmount"), ".originAmount"),
        discount_usd=_amount(detail.get("discountAmount"), ".discountAmount"),
    )


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedResponse(f"{where} has type {type(value).__name__}, not an object")
    return value


def unwrap(payload: Any) -> Mapping[str, Any]:
    """Accepts a bare record, {"data": record} and {"success": true, "data": record}."""
    if not isinstance(payload, dict):
        raise MalformedResponse(f"body is a JSON {type(payload).__name__}, not an object")
    if "data" in payload and isinstance(payload["data"], dict) and "generationId" not in payload:
        data: Mapping[str, Any] = payload["data"]
        return data
    return payload


def _billing(record: Mapping[str, Any]) -> Billing | None:
    rating = record.get("ratingResponses")
    credits = _number(record.get("usage"), "usage", maximum=MAX_AMOUNT_USD)
    if rating is None and credits is None:
        return None
    rating = _mapping(rating, "ratingResponses")
    bill = _number(rating.get("billAmount"), "ratingResponses.billAmount", maximum=MAX_AMOUNT_USD)
    if bill is None:
        if credits is None:
            return None
        bill = credits
    origin = _number(rating.get("originAmount"), "ratingResponses.originAmount", maximum=MAX_AMOUNT_USD)
    discount = _number(rating.get("discountAmount"), "ratingResponses.discountAmount", maximum=MAX_AMOUNT_USD) or 0.0
    details = rating.get("ratingDetails") or []
    if not isinstance(details, list):
        raise MalformedResponse("ratingResponses.ratingDetails is not a list")
    items = []
    for i, detail in enumerate(details):
        # The entry's place is written only into a message (not five strings per entry and record).
        try:
            items.append(_fee_item(detail))
        except MalformedResponse as err:
            raise MalformedResponse(f"ratingResponses.ratingDetails[{i}]{err}") from None
    return Billing(
        bill_usd=bill,
        origin_usd=bill + discount if origin is None else origin,
        discount_usd=discount,
        credits=bill if credits is None else credits,
        fee_items=tuple(items),
    )


def _seconds_from_ms(value: Any, where: str) -> float | None:
    ms = _number(value, where, maximum=MAX_MILLISECONDS)
    return None if ms is None else ms / 1000.0


def _bool(value: Any, where: str) -> bool | None:
    if value is None:
        return None
    if value is True or value is False:
        return bool(value)
    if value in ("true", "false"):
        return bool(value == "true")
    raise MalformedResponse(f"{where} is not a boolean")


def utc_day(value: Any) -> str:
    """YYYYMMDD of an ISO-8601 time in UTC (a time without an offset is UTC); "" if it is not one."""
    if not isinstance(value, str):
        return ""
    if len(value) >= 20 and value.endswith("Z") and value[4] == "-" and value[7] == "-" and value[10] == "T":
        day = value[0:4] + value[5:7] + value[8:10]  # ZenMux's own form: no parsing on the hot path
        if day.isdigit():
            return day
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return ""
    if when.tzinfo is not None:
        when = when.astimezone(UTC)
    return when.strftime("%Y%m%d")


def parse_generation(payload: Any) -> GenerationRecord:
    """A generation record from a decoded JSON body, tolerant of the API's known variations."""
    record = unwrap(payload)
    tokens = _mapping(record.get("nativeTokens"), "nativeTokens")
    generation_id = _text(record.get("generationId", record.get("id")), "generationId")
    if not generation_id and not tokens:
        raise MalformedResponse("no generationId and no nativeTokens: not a generation record")
    completion_details = _mapping(tokens.get("completion_tokens_details"), "nativeTokens.completion_tokens_details")
    prompt_details = _mapping(tokens.get("prompt_tokens_details"), "nativeTokens.prompt_tokens_details")
    return GenerationRecord(
        generation_id=generation_id,
        model=_text(record.get("model"), "model", "unknown") or "unknown",
        protocol=_text(record.get("api"), "api", "unknown") or "unknown",
        latency_seconds=_seconds_from_ms(record.get("latency"), "latency"),
        generation_seconds=_seconds_from_ms(record.get("generationTime"), "generationTime"),
        prompt_tokens=_count(tokens.get("prompt_tokens"), "nativeTokens.prompt_tokens"),
        completion_tokens=_count(tokens.get("completion_tokens"), "nativeTokens.completion_tokens"),
        reasoning_tokens=_count(completion_details.get("reasoning_tokens"), "reasoning_tokens"),
        cached_tokens=_count(prompt_details.get("cached_tokens"), "cached_tokens"),
        streamed=_bool(record.get("streamed"), "streamed"),
        finish_reason=_text(record.get("finishReason"), "finishReason", "unknown") or "unknown",
        upstream_retries=_count(record.get("requestRetryTimes"), "requestRetryTimes"),
        billing=_billing(record),
        day=utc_day(record.get("createAt", record.get("createdAt"))),
    )


def decode_json(body: bytes) -> Any:
    """`json.loads(body)`, by orjson (C, ~4x less CPU) where it accepts the body; what it refuses (NaN, UTF-16,
    a byte-order mark, lone surrogates, nesting past 1024) goes to json.loads, so the result, or the error, is
    json.loads' (but for an integer past 64 bits, which orjson gives as a float: `_number` makes every number
    a float anyway). Raises ValueError or RecursionError as json.loads does."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), capped at an hour."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), 3600.0)


@dataclass(frozen=True, slots=True)
class LookupResult:
    outcome: Outcome
    status: int | None = None
    request_id: str | None = None
    record: GenerationRecord | None = None
    retry_after: float | None = None
    detail: str = ""


def classify(
    status: int, body: bytes, headers: Mapping[str, str], billing_expected: bool, now: float
) -> LookupResult:
    """Turns one HTTP answer into a lookup result (pure; the client only does the I/O)."""
    request_id = headers.get("x-zenmux-requestid")
    retry_after = parse_retry_after(headers.get("retry-after"), now)

    def result(outcome: Outcome, record: GenerationRecord | None = None, detail: str = "") -> LookupResult:
        return LookupResult(outcome, status, request_id, record, retry_after, detail)

    if status == 200:
        try:
            record = parse_generation(decode_json(body))
        except (ValueError, RecursionError) as err:
            message = str(err) if isinstance(err, MalformedResponse) else "body is not valid JSON"
            return result(Outcome.MALFORMED, detail=message)
        if record.billing is None and billing_expected:
            return result(Outcome.NOT_READY, record, "record has no billing fields yet")
        return result(Outcome.RESOLVED, record)
    if status == 404:
        return result(Outcome.NOT_READY, detail="404: not found (yet)")
    if status in (401, 403):
        return result(Outcome.UNAUTHORIZED, detail=f"{status}: {_error_type(body)}")
    if status in (429, 422):
        return result(Outcome.RATE_LIMITED, detail=f"{status}: {_error_type(body)}")
    if status >= 500:
        return result(Outcome.SERVER_ERROR, detail=f"{status}")
    return result(Outcome.CLIENT_ERROR, detail=f"{status}: {_error_type(body)}")


def _error_type(body: bytes) -> str:
    """The documented error body's `type`, for logs; never echoes the body itself."""
    try:
        error = json.loads(body).get("error", {})
        kind = error.get("type", "")
        return str(kind)[:64] if isinstance(kind, str) else ""
    except (ValueError, AttributeError, RecursionError):
        return ""
