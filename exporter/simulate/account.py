"""The simulated account endpoints: cost by model, API key and token type, the PAYG balance, and unseen spend."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from exporter.simulate.api import JSON_TYPE, _error_body, _json
from exporter.web import Request, Response

if TYPE_CHECKING:
    from exporter.simulate.api import SimulatedZenMux

COST_PATH = "/api/v1/management/cost"
BALANCE_PATH = "/api/v1/management/payg/balance"
UNSEEN_PATH = "/_sim/unseen"

# Calls made with the exporter's keys belong to this API key resource; unseen spend to another app's key.
SEEN_KEY_ID = "key_sim_app"
UNSEEN_KEY_ID = "key_sim_uninstrumented"

_PLACES = Decimal("1E-10")  # ZenMux writes amounts with 10 decimals
# query_dimension -> (length of query_time, length of bizTime): a month in days, a day in hours, an hour in minutes
_DIMENSIONS = {"BIZ_MTH": (6, 8), "BIZ_DT": (8, 10), "BIZ_HOUR": (10, 12)}
_TOKEN_TYPES = {"prompt": "prompt", "cache_read": "prompt", "completion": "completion"}


def amount(value: Decimal) -> str:
    """A decimal string the way ZenMux writes one ("12.3456000000")."""
    return f"{value.quantize(_PLACES):f}"


def exact(value: float | int) -> Decimal:
    """The decimal a record's JSON number stands for (its shortest repr), not the binary float's expansion."""
    return Decimal(repr(value))


def biz_time(create_at: str) -> str:
    """YYYYMMDDHHmm of an ISO createAt written by the simulator (UTC, `Z`)."""
    return create_at[0:4] + create_at[5:7] + create_at[8:10] + create_at[11:13] + create_at[14:16]


@dataclass(frozen=True, slots=True)
class _Row:
    biz_time: str  # YYYYMMDDHHmm
    model: str
    api_key_id: str
    bill: Decimal
    prompt: Decimal
    completion: Decimal
    tokens: int


class _PerMinute:
    """At most `limit` requests in any 60 s of the simulator's clock."""

    def __init__(self, limit: int, clock: Callable[[], float]) -> None:
        self.limit = limit
        self._clock = clock
        self._times: deque[float] = deque()

    def take(self) -> bool:
        now = self._clock()
        while self._times and self._times[0] <= now - 60.0:
            self._times.popleft()
        if len(self._times) >= self.limit:
            return False
        self._times.append(now)
        return True


class AccountEndpoints:
    """GET /api/v1/management/cost and /payg/balance over the simulator's billed records, and POST|GET
    /_sim/unseen: spend recorded without its id reaching anyone (an uninstrumented app, a lost id).

    Management keys only (403 otherwise). Limits as documented: cost 429 with Retry-After: 60 past
    `cost_per_minute`; balance 422 past `balance_per_minute`. The balance is the starting credits less the
    billed spend, taken from bonus credits first.
    """

    def __init__(
        self,
        sim: SimulatedZenMux,
        clock: Callable[[], float],
        *,
        cost_per_minute: int = 60,
        balance_per_minute: int = 30,
        top_up_credits: Decimal = Decimal("100"),
        bonus_credits: Decimal = Decimal("400"),
    ) -> None:
        self._sim = sim
        self._clock = clock
        self.cost_limit = _PerMinute(cost_per_minute, clock)
        self.balance_limit = _PerMinute(balance_per_minute, clock)
        self.top_up_credits = top_up_credits
        self.bonus_credits = bonus_credits
        self._unseen: set[str] = set()
        self.routes: Mapping[str, Callable[[Request], Awaitable[Response]]] = {
            COST_PATH: self.cost,
            BALANCE_PATH: self.balance,
            UNSEEN_PATH: self.unseen,
        }

    # -- in process ---------------------------------------------------------------------------------------

    def create_unseen(self, *, model: str | None = None, created_at: float | None = None) -> Decimal:
        """Records a generation whose id nobody is told; returns its billed amount."""
        record = self._sim.create(model=model, created_at=created_at)
        self._unseen.add(record["generationId"])
        return exact(record["ratingResponses"]["billAmount"])

    def unseen_totals(self) -> dict[str, dict[str, tuple[Decimal, int]]]:
        """Unseen spend per UTC day (YYYYMMDD) and model: (billed USD, generations), billed records only."""
        out: dict[str, dict[str, tuple[Decimal, int]]] = {}
        for row in self._rows(unseen_only=True):
            models = out.setdefault(row.biz_time[:8], {})
            bill, count = models.get(row.model, (Decimal(0), 0))
            models[row.model] = (bill + row.bill, count + 1)
        return out

    def _rows(self, *, unseen_only: bool = False) -> Iterable[_Row]:
        for record in self._sim.records(ready_only=True):
            unseen = record["generationId"] in self._unseen
            if unseen_only and not unseen:
                continue
            rating = record["ratingResponses"]
            parts = {"prompt": Decimal(0), "completion": Decimal(0)}
            for item in rating["ratingDetails"]:
                parts[_TOKEN_TYPES.get(item["feeItemCode"], "completion")] += exact(item["billAmount"])
            yield _Row(
                biz_time=biz_time(record["createAt"]),
                model=record["model"],
                api_key_id=UNSEEN_KEY_ID if unseen else SEEN_KEY_ID,
                bill=exact(rating["billAmount"]),
                prompt=parts["prompt"],
                completion=parts["completion"],
                tokens=record["nativeTokens"]["total_tokens"],
            )

    # -- HTTP ---------------------------------------------------------------------------------------------

    def _management_only(self, request: Request) -> Response | None:
        kind = self._sim._authenticate(request)
        if isinstance(kind, Response):
            return kind
        if kind != "management":
            return _json(403, _error_body(403, "access_denied", "This endpoint takes a management key (sk-mg-v1-)"))
        return None

    async def cost(self, request: Request) -> Response:
        if request.method != "GET":
            return _json(405, _error_body(405, "method_not_allowed", "use GET"))
        if (denied := self._management_only(request)) is not None:
            return denied
        if not self.cost_limit.take():
            response = _json(429, _error_body(429, "rate_limit", "Rate limit exceeded: 60 requests per minute"))
            response.headers["Retry-After"] = "60"
            return response
        query = request.query
        dimension = query.get("query_dimension", "")
        when = query.get("query_time", "")
        if query.get("type") != "cost":
            return _bad("type must be cost (provider_cost is not simulated)")
        if dimension not in _DIMENSIONS:
            return _bad("query_dimension must be BIZ_MTH, BIZ_DT or BIZ_HOUR")
        period, granularity = _DIMENSIONS[dimension]
        if len(when) != period or not when.isdigit():
            return _bad(f"query_time must have {period} digits for {dimension}")
        models = _list(query.get("model_slugs"))
        keys = _list(query.get("api_key_ids"))
        bill_types = _list(query.get("bill_types"))
        rows = [
            row
            for row in self._rows()
            if row.biz_time.startswith(when)
            and (models is None or row.model in models)
            and (keys is None or row.api_key_id in keys)
            and (bill_types is None or "metered" in bill_types)  # every simulated call is PAYG
        ]
        body = {"success": True, "data": {"summary": _summary(rows), "analysis": _analysis(rows, granularity)}}
        return _json(200, json.dumps(body, separators=(",", ":")).encode())

    async def balance(self, request: Request) -> Response:
        if request.method != "GET":
            return _json(405, _error_body(405, "method_not_allowed", "use GET"))
        if (denied := self._management_only(request)) is not None:
            return denied
        if not self.balance_limit.take():
            return _json(422, _error_body(422, "rate_limit", "Management API per-minute request limit exceeded"))
        spent = sum((row.bill for row in self._rows()), Decimal(0))
        bonus = max(self.bonus_credits - spent, Decimal(0))
        top_up = max(self.top_up_credits - max(spent - self.bonus_credits, Decimal(0)), Decimal(0))
        data = {
            "currency": "usd",
            "total_credits": float(bonus + top_up),
            "top_up_credits": float(top_up),
            "bonus_credits": float(bonus),
        }
        return _json(200, json.dumps({"success": True, "data": data}).encode())

    async def unseen(self, request: Request) -> Response:
        """POST {"model"?, "count"?, "created_at"?}: records spend no exporter is told about; GET: its totals."""
        if request.method == "POST":
            try:
                params = json.loads(request.body) if request.body.strip() else {}
                if not isinstance(params, dict) or set(params) - {"model", "count", "created_at"}:
                    raise ValueError("body must be an object with model, count and created_at only")
                count = params.get("count", 1)
                created_at = params.get("created_at")
                if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 10_000:
                    raise ValueError("count must be an integer in 1..10000")
                if created_at is not None and (isinstance(created_at, bool) or not isinstance(created_at, int | float)):
                    raise ValueError("created_at must be epoch seconds")
                total = sum(
                    (self.create_unseen(model=params.get("model"), created_at=created_at) for _ in range(count)),
                    Decimal(0),
                )
            except ValueError as exc:
                return _bad(str(exc))
            return _json(200, json.dumps({"generations": count, "billAmount": amount(total)}).encode())
        if request.method != "GET":
            return _json(405, _error_body(405, "method_not_allowed", "use GET or POST"))
        totals = {
            day: {model: {"billAmount": amount(bill), "requestCounts": n} for model, (bill, n) in models.items()}
            for day, models in self.unseen_totals().items()
        }
        return Response(status=200, body=json.dumps(totals).encode(), content_type=JSON_TYPE)


def _bad(message: str) -> Response:
    return _json(400, _error_body(400, "invalid_request", message))


def _list(value: str | None) -> set[str] | None:
    return None if value is None else {part for part in value.split(",") if part}


def _summary(rows: list[_Row]) -> dict[str, Any] | None:
    if not rows:
        return None
    total = sum((r.bill for r in rows), Decimal(0))
    prompt = sum((r.prompt for r in rows), Decimal(0))
    completion = sum((r.completion for r in rows), Decimal(0))
    tokens = sum(r.tokens for r in rows)
    return {
        "totalCost": amount(total),
        "inputCost": amount(prompt),
        "outputCost": amount(completion),
        "otherCost": amount(total - prompt - completion),
        "requestCounts": str(len(rows)),
        "requestAvgCost": amount(total / len(rows)),
        "totalTokens": str(tokens),
        "millionTokenAvgCost": amount(total * 1_000_000 / tokens) if tokens else None,
    }


def _analysis(rows: list[_Row], granularity: int) -> dict[str, list[dict[str, Any]]]:
    """The three breakdowns of the same costs, per bizTime bucket of the dimension's granularity."""
    by_model: dict[tuple[str, str], list[Decimal]] = {}
    by_key: dict[tuple[str, str], list[Decimal]] = {}
    by_type: dict[tuple[str, str], Decimal] = {}
    for r in rows:
        when = r.biz_time[:granularity]
        by_model.setdefault((when, r.model), []).append(r.bill)
        by_key.setdefault((when, r.api_key_id), []).append(r.bill)
        for token_type, part in (("prompt", r.prompt), ("completion", r.completion)):
            by_type[(when, token_type)] = by_type.get((when, token_type), Decimal(0)) + part

    def entry(when: str, bills: list[Decimal], **names: str | None) -> dict[str, Any]:
        fields = {"modelSlug": None, "tokenType": None, "apiKeyId": None, **names}
        total = sum(bills, Decimal(0))
        return {"bizTime": when, **fields, "billAmount": amount(total), "requestCounts": str(len(bills))}

    return {
        "costByModel": [entry(w, bills, modelSlug=m) for (w, m), bills in sorted(by_model.items())],
        "costByApiKey": [entry(w, bills, apiKeyId=k) for (w, k), bills in sorted(by_key.items())],
        "costByTokenType": [
            {**entry(w, [bill], tokenType=t), "requestCounts": None} for (w, t), bill in sorted(by_type.items())
        ],
    }
