"""The ZenMux account API client: cost and PAYG balance requests, their decimal strings parsed exactly."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

import httpx

from exporter.clock import Clock
from exporter.records import MalformedResponse, Outcome, parse_retry_after
from exporter.transport import BodyEncodingError, BodyTooLarge, read_bounded

T = TypeVar("T")

COST_PATH = "/api/v1/management/cost"
BALANCE_PATH = "/api/v1/management/payg/balance"
DEFAULT_RETRY_AFTER_SECONDS = 60.0  # the documented Retry-After of the cost endpoint; 422 carries none
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
MAX_EXPONENT, MIN_EXPONENT = 15, -30  # amounts and counts within 1e15, precision down to 1e-30

# --- parsing (pure) ---------------------------------------------------------------------------------------


def parse_decimal(value: Any, where: str) -> Decimal | None:
    """An amount or count ZenMux writes as a decimal string, exactly; None for null (no statistic)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise MalformedResponse(f"{where} has type {type(value).__name__}, not a decimal string")
    try:
        # A JSON number stands for its shortest repr (0.1 is "0.1"), not the binary float's expansion.
        number = Decimal(value.strip() if isinstance(value, str) else repr(value))
    except InvalidOperation:
        raise MalformedResponse(f"{where} is not a decimal number") from None
    if not number.is_finite():
        raise MalformedResponse(f"{where} is not finite")
    # "1e999999999" is a finite Decimal, but summing it overflows the context: no amount ZenMux bills is that
    # large or that small, so such an exponent is a malformed body (counted), never a crash.
    if number and not MIN_EXPONENT <= number.adjusted() <= MAX_EXPONENT:
        raise MalformedResponse(f"{where} is out of range")
    return number


@dataclass(frozen=True, slots=True)
class ModelCost:
    """ZenMux's figures for one model and day; None where ZenMux has no statistic."""

    cost_usd: Decimal | None
    requests: Decimal | None


def _data(payload: Any) -> Mapping[str, Any]:
    if not isinstance(payload, dict):
        raise MalformedResponse(f"body is a JSON {type(payload).__name__}, not an object")
    if payload.get("success") is False:
        raise MalformedResponse("success is false")
    data = payload.get("data")
    if not isinstance(data, dict):
        raise MalformedResponse("data is not an object")
    return data


def add_known(total: Decimal | None, part: Decimal | None) -> Decimal | None:
    """A sum that stays unknown (None) once any part is."""
    return None if total is None or part is None else total + part


def parse_cost_by_model(payload: Any) -> dict[str, ModelCost]:
    """The day's cost and requests per model from a `type=cost` answer, summing costByModel's hourly rows.

    An empty analysis or a null summary is a day without spend (an empty dict); a null amount makes that
    model's figure unknown for the day.
    """
    analysis = _data(payload).get("analysis")
    if analysis is None:
        return {}
    if not isinstance(analysis, dict):
        raise MalformedResponse("data.analysis is not an object")
    rows = analysis.get("costByModel") or []
    if not isinstance(rows, list):
        raise MalformedResponse("data.analysis.costByModel is not a list")
    out: dict[str, ModelCost] = {}
    for i, row in enumerate(rows):
        where = f"costByModel[{i}]"
        if not isinstance(row, dict):
            raise MalformedResponse(f"{where} is not an object")
        model = row.get("modelSlug")
        if not isinstance(model, str) or not model:
            raise MalformedResponse(f"{where}.modelSlug is not a string")
        bill = parse_decimal(row.get("billAmount"), f"{where}.billAmount")
        requests = parse_decimal(row.get("requestCounts"), f"{where}.requestCounts")
        seen = out.get(model, ModelCost(Decimal(0), Decimal(0)))
        out[model] = ModelCost(add_known(seen.cost_usd, bill), add_known(seen.requests, requests))
    return out


@dataclass(frozen=True, slots=True)
class Balance:
    total_usd: Decimal
    top_up_usd: Decimal
    bonus_usd: Decimal


def parse_balance(payload: Any) -> Balance:
    data = _data(payload)
    values = {}
    for name in ("total_credits", "top_up_credits", "bonus_credits"):
        value = parse_decimal(data.get(name), f"data.{name}")
        if value is None:
            raise MalformedResponse(f"data.{name} is missing")
        values[name] = value
    return Balance(values["total_credits"], values["top_up_credits"], values["bonus_credits"])


# --- HTTP ---------------------------------------------------------------------------------------------------


class PollError(Exception):
    """An account request that gave nothing usable; `outcome` is its label, `retry_after` how long to wait."""

    def __init__(self, outcome: Outcome, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.retry_after = retry_after


class AccountClient:
    """GETs on the account endpoints with the management key; raises PollError, never leaks the key."""

    def __init__(
        self,
        base_url: str,
        management_key: str,
        *,
        timeout_seconds: float,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock,
    ) -> None:
        self._clock = clock
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            transport=transport,
            timeout=timeout_seconds,
            # Only codings read_bounded undoes layer by layer within the size limit (no brotli, no zstd).
            headers={
                "Authorization": f"Bearer {management_key}",
                "User-Agent": "zenmux-exporter",
                "Accept-Encoding": "gzip, deflate",
            },
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def cost(self, day: str) -> dict[str, ModelCost]:
        params = {"type": "cost", "query_dimension": "BIZ_DT", "query_time": day}
        return await self._get(COST_PATH, params, parse_cost_by_model)

    async def balance(self) -> Balance:
        return await self._get(BALANCE_PATH, {}, parse_balance)

    async def _get(self, path: str, params: Mapping[str, str], parse: Callable[[Any], T]) -> T:
        try:
            async with self._http.stream("GET", path, params=params) as response:
                body = await read_bounded(response, MAX_RESPONSE_BYTES)  # decoded bytes bounded too (gzip bombs)
        except BodyTooLarge:
            raise PollError(Outcome.TOO_LARGE, f"{path}: body over {MAX_RESPONSE_BYTES} bytes") from None
        except BodyEncodingError as err:
            raise PollError(Outcome.MALFORMED, f"{path}: {err}") from None
        except httpx.TimeoutException:
            raise PollError(Outcome.TIMEOUT, f"{path}: timed out") from None
        except httpx.HTTPError as err:
            raise PollError(Outcome.CONNECTION_ERROR, f"{path}: {type(err).__name__}") from None
        status = response.status_code
        if status in (429, 422):
            wait = parse_retry_after(response.headers.get("retry-after"), self._clock.time())
            raise PollError(Outcome.RATE_LIMITED, f"{path}: {status}", wait or DEFAULT_RETRY_AFTER_SECONDS)
        if status in (401, 403):
            raise PollError(Outcome.UNAUTHORIZED, f"{path}: {status} (is reconcile's key a management key?)")
        if status >= 500:
            raise PollError(Outcome.SERVER_ERROR, f"{path}: {status}")
        if status != 200:
            raise PollError(Outcome.CLIENT_ERROR, f"{path}: {status}")
        try:
            return parse(json.loads(body))
        except MalformedResponse as err:
            raise PollError(Outcome.MALFORMED, f"{path}: {err}") from None
        except (ValueError, RecursionError):
            raise PollError(Outcome.MALFORMED, f"{path}: body is not JSON") from None
