"""The simulated ZenMux API: generation records, billing delay, key kinds, envelopes, rate limits and faults."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import secrets
import string
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from random import Random
from typing import Any, Literal, get_args

from exporter.simulate import catalog
from exporter.simulate.server import ThreadedServer, serve_threaded
from exporter.web import Request, Response

KeyKind = Literal["payg", "subscription", "management"]
NotReadyMode = Literal["404", "partial"]
Envelope = Literal["bare", "data", "success"]
IdStyle = Literal["hex32", "resp", "upper20", "gen"]

GENERATION_PATH = "/api/v1/generation"
MANAGEMENT_PATH = "/api/v1/management/generation"
CREATE_PATH = "/api/v1/generations"
REQUEST_ID_HEADER = "X-ZenMux-RequestId"

DEFAULT_KEYS: Mapping[str, KeyKind] = {
    "sk-ai-v1-demo": "payg",
    "sk-ss-v1-demo": "subscription",
    "sk-mg-v1-demo": "management",
}
KEY_PREFIXES: Mapping[str, KeyKind] = {"sk-ai-v1-": "payg", "sk-ss-v1-": "subscription", "sk-mg-v1-": "management"}

# What an application would see as its id, per protocol (ZenMux passes the provider's id style through).
DEFAULT_ID_STYLE: Mapping[str, IdStyle] = {
    "chat.completions": "hex32",
    "responses": "resp",
    "messages": "gen",
    "generateContent": "upper20",
}

FAULT_KINDS = ("server_error", "rate_limited", "slow", "malformed", "truncated", "reset", "oversized")
# When several faults fire on one request, the one that hides the others wins.
_EXCLUSIVE_FAULT_ORDER = ("reset", "server_error", "rate_limited", "malformed", "oversized", "truncated")

JSON_TYPE = "application/json"
_ALNUM_UPPER = string.ascii_uppercase + string.digits
_ALNUM = string.ascii_letters + string.digits


def key_kind_for(key: str) -> KeyKind | None:
    """The kind a key's prefix announces, or None; for building `SimConfig.keys` from bare key strings."""
    for prefix, kind in KEY_PREFIXES.items():
        if key.startswith(prefix):
            return kind
    return None


@dataclass(frozen=True)
class Faults:
    """Share of lookups (0..1) that suffer each fault; drawn independently, one visible fault per request."""

    server_error: float = 0.0
    rate_limited: float = 0.0
    slow: float = 0.0
    malformed: float = 0.0
    truncated: float = 0.0
    reset: float = 0.0
    oversized: float = 0.0
    slow_seconds: float = 10.0
    oversized_bytes: int = 2 * 1024 * 1024

    def __post_init__(self) -> None:
        for kind in FAULT_KINDS:
            ratio = getattr(self, kind)
            if not isinstance(ratio, int | float) or not 0.0 <= ratio <= 1.0:
                raise ValueError(f"faults.{kind} must be a ratio in [0, 1], got {ratio!r}")
        if not self.slow_seconds >= 0:
            raise ValueError("faults.slow_seconds must be >= 0")
        if self.oversized_bytes < 1:
            raise ValueError("faults.oversized_bytes must be >= 1")


@dataclass(frozen=True)
class SimConfig:
    billing_delay_seconds: float = 3.0
    not_ready_mode: NotReadyMode = "404"
    envelope: Envelope = "bare"
    keys: Mapping[str, KeyKind] = field(default_factory=lambda: dict(DEFAULT_KEYS))
    rate_limit_per_second: float | None = None
    retry_after_seconds: float | None = None
    faults: Faults = field(default_factory=Faults)

    def __post_init__(self) -> None:
        if not self.billing_delay_seconds >= 0:
            raise ValueError("billing_delay_seconds must be >= 0")
        if self.not_ready_mode not in get_args(NotReadyMode):
            raise ValueError(f"not_ready_mode must be one of {get_args(NotReadyMode)}")
        if self.envelope not in get_args(Envelope):
            raise ValueError(f"envelope must be one of {get_args(Envelope)}")
        if self.rate_limit_per_second is not None and not self.rate_limit_per_second > 0:
            raise ValueError("rate_limit_per_second must be > 0 or None")
        if self.retry_after_seconds is not None and not self.retry_after_seconds >= 0:
            raise ValueError("retry_after_seconds must be >= 0 or None")
        for key, kind in self.keys.items():
            if kind not in get_args(KeyKind):
                raise ValueError(f"key {key[:10]}...: kind must be one of {get_args(KeyKind)}")

    def to_json(self) -> dict[str, Any]:
        return {
            "billing_delay_seconds": self.billing_delay_seconds,
            "not_ready_mode": self.not_ready_mode,
            "envelope": self.envelope,
            "rate_limit_per_second": self.rate_limit_per_second,
            "retry_after_seconds": self.retry_after_seconds,
            "faults": {name: getattr(self.faults, name) for name in Faults.__dataclass_fields__},
        }


# Fields POST /_sim/config may change; keys stay fixed so a running client never loses its credentials.
_RUNTIME_FIELDS = frozenset(
    {"billing_delay_seconds", "not_ready_mode", "envelope", "rate_limit_per_second", "retry_after_seconds", "faults"}
)


def config_from_json(base: SimConfig, changes: Mapping[str, Any]) -> SimConfig:
    """base with the runtime-changeable fields in changes applied; `faults` is replaced whole. ValueError if bad."""
    unknown = set(changes) - _RUNTIME_FIELDS
    if unknown:
        raise ValueError(f"unknown config fields: {sorted(unknown)}")
    updates = dict(changes)
    if "faults" in updates:
        raw = updates["faults"]
        if not isinstance(raw, Mapping):
            raise ValueError("faults must be an object")
        bad = set(raw) - set(Faults.__dataclass_fields__)
        if bad:
            raise ValueError(f"unknown fault fields: {sorted(bad)}")
        try:
            updates["faults"] = Faults(**raw)
        except TypeError as exc:
            raise ValueError(str(exc)) from exc
    for name in ("billing_delay_seconds", "rate_limit_per_second", "retry_after_seconds"):
        value = updates.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"{name} must be a number")
    try:
        return replace(base, **updates)
    except TypeError as exc:
        raise ValueError(str(exc)) from exc


# ---------------------------------------------------------------------------------------------------------
# Records


def iso_ms(ts: float) -> str:
    """ISO-8601 UTC with milliseconds and a Z, the way ZenMux writes createAt."""
    ms = int(ts * 1000)
    return datetime.fromtimestamp(ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def _num(value: float) -> float | int:
    # The reference example writes whole rates as integers ("rate": 3).
    return int(value) if float(value).is_integer() else value


def rate_generation(
    model: catalog.Model, prompt_tokens: int, cached_tokens: int, completion_tokens: int, discounted: bool
) -> dict[str, Any]:
    """ratingResponses for one generation; totals are the exact (10-decimal) sums of the per-item amounts."""
    items = [("prompt", prompt_tokens - cached_tokens, model.prompt_usd_per_m)]
    if cached_tokens > 0:
        items.append(("cache_read", cached_tokens, model.cache_read_usd_per_m))
    items.append(("completion", completion_tokens, model.completion_usd_per_m))
    details: list[dict[str, Any]] = []
    bills: list[float] = []
    discounts: list[float] = []
    origins: list[float] = []
    for code, tokens, rate in items:
        origin = round(tokens * rate / 1e6, 10)
        discount = round(origin * catalog.PROMO_DISCOUNT_RATE, 10) if discounted else 0.0
        bill = round(origin - discount, 10)
        origins.append(origin)
        discounts.append(discount)
        bills.append(bill)
        details.append(
            {
                "feeItemCode": code,
                "rate": _num(rate),
                "originAmount": origin,
                "discountAmount": discount,
                "billAmount": bill,
            }
        )
    return {
        "billAmount": round(math.fsum(bills), 10),
        "discountAmount": round(math.fsum(discounts), 10),
        "originAmount": round(math.fsum(origins), 10),
        "priceVersion": catalog.PRICE_VERSION,
        "ratingDetails": details,
    }


def make_record(
    rng: Random, model: catalog.Model, api: str, generation_id: str, created_at: float, streamed: bool
) -> dict[str, Any]:
    """A full (billed) record with realistic, internally consistent numbers."""
    prompt = min(200_000, max(1, int(rng.lognormvariate(6.8, 1.1))))
    cached = int(prompt * rng.uniform(0.3, 0.95)) if prompt >= 256 and rng.random() < 0.35 else 0
    completion = min(32_000, max(1, int(rng.lognormvariate(5.3, 1.0))))
    reasoning = int(completion * rng.uniform(0.2, 0.8)) if model.reasoning and rng.random() < 0.5 else 0
    r = rng.random()
    finish = "length" if r < 0.04 else "tool_calls" if r < 0.14 else "stop"
    latency = int(min(3000.0, 200.0 + rng.lognormvariate(6.0, 0.6)))
    generation_time = completion / rng.uniform(40.0, 160.0) * 1000.0
    if rng.random() < 0.03:
        generation_time *= rng.uniform(3.0, 10.0)  # the slow tail: provider congestion, long tool loops
    retries = 0 if rng.random() < 0.9 else rng.choice((1, 1, 1, 2, 2, 3))
    discounted = model.promo and rng.random() < catalog.PROMO_SHARE
    rating = rate_generation(model, prompt, cached, completion, discounted)
    return {
        "api": api,
        "generationId": generation_id,
        "model": model.id,
        "createAt": iso_ms(created_at),
        "generationTime": int(min(60_000.0, max(500.0, generation_time))),
        "latency": latency,
        "nativeTokens": {
            "completion_tokens": completion,
            "prompt_tokens": prompt,
            "total_tokens": prompt + completion,
            "completion_tokens_details": {"reasoning_tokens": reasoning},
            "prompt_tokens_details": {"cached_tokens": cached},
        },
        "streamed": streamed,
        "finishReason": finish,
        "usage": rating["billAmount"],
        "ratingResponses": rating,
        "requestRetryTimes": retries,
        "finalRetry": True,
    }


def metering_only(record: Mapping[str, Any]) -> dict[str, Any]:
    """What a subscription key (or a not-yet-billed partial record) sees: no usage, no ratingResponses."""
    return {k: v for k, v in record.items() if k not in ("usage", "ratingResponses")}


def inline_usage(record: Mapping[str, Any]) -> dict[str, Any]:
    """The metering the protocol itself returns with the call, in that protocol's own shape."""
    tokens = record["nativeTokens"]
    prompt, completion = tokens["prompt_tokens"], tokens["completion_tokens"]
    cached = tokens["prompt_tokens_details"]["cached_tokens"]
    reasoning = tokens["completion_tokens_details"]["reasoning_tokens"]
    api = record["api"]
    if api == "responses":
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + completion,
        }
    if api == "messages":
        # Anthropic counts cache reads apart from input_tokens.
        return {
            "input_tokens": prompt - cached,
            "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0,
            "output_tokens": completion,
        }
    if api == "generateContent":
        # Gemini reports thoughts apart from candidates.
        return {
            "promptTokenCount": prompt,
            "cachedContentTokenCount": cached,
            "candidatesTokenCount": completion - reasoning,
            "thoughtsTokenCount": reasoning,
            "totalTokenCount": prompt + completion,
        }
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


TOTAL_KEYS = (
    "generations",
    "prompt_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "cached_tokens",
    "total_tokens",
    "retries",
    "billAmount",
    "originAmount",
    "discountAmount",
    "usage",
)


def totals(records: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Sums over records, keyed as TOTAL_KEYS; what the exporter's counters should add up to."""
    counts = dict.fromkeys(TOTAL_KEYS[:7], 0)
    amounts: dict[str, list[float]] = {k: [] for k in TOTAL_KEYS[7:]}
    for rec in records:
        tokens = rec["nativeTokens"]
        counts["generations"] += 1
        counts["prompt_tokens"] += tokens["prompt_tokens"]
        counts["completion_tokens"] += tokens["completion_tokens"]
        counts["total_tokens"] += tokens["total_tokens"]
        counts["reasoning_tokens"] += tokens["completion_tokens_details"]["reasoning_tokens"]
        counts["cached_tokens"] += tokens["prompt_tokens_details"]["cached_tokens"]
        counts["retries"] += rec.get("requestRetryTimes", 0)
        rating = rec.get("ratingResponses")
        if rating is not None:
            for name in ("billAmount", "originAmount", "discountAmount"):
                amounts[name].append(rating[name])
        if "usage" in rec:
            amounts["usage"].append(rec["usage"])
    out: dict[str, float] = {k: float(v) for k, v in counts.items()}
    out.update({k: math.fsum(v) for k, v in amounts.items()})
    return out


# ---------------------------------------------------------------------------------------------------------
# The server


def _error_body(status: int, kind: str, message: str) -> bytes:
    return json.dumps({"error": {"code": str(status), "type": kind, "message": message}}).encode()


_ENVELOPES: Mapping[str, tuple[bytes, bytes]] = {
    "bare": (b"", b""),
    "data": (b'{"data":', b"}"),
    "success": (b'{"success":true,"data":', b"}"),
}
_NOT_FOUND = _error_body(404, "not_found", "generation not found")
_RATE_LIMITED = _error_body(429, "rate_limit", "Rate limit exceeded, please slow down")
_RATE_LIMITED_MANAGEMENT = _error_body(422, "rate_limit", "Management API per-minute request limit exceeded")
_SERVER_ERROR_JSON = _error_body(500, "internal_error", "Internal server error")
_PROXY_PAGES = {
    502: b"<html><head><title>502 Bad Gateway</title></head><body><center>"
    b"<h1>502 Bad Gateway</h1></center></body></html>\n",
    503: b"<html><head><title>503 Service Temporarily Unavailable</title></head><body><center>"
    b"<h1>503 Service Temporarily Unavailable</h1></center></body></html>\n",
}
_PADDING_UNIT = b"ZmVlSXRlbUNvZGU6cHJvbXB0O3JhdGU6My4wO3ZlcnNpb246djE7"  # base64-looking, like a provider blob


class _Stored:
    __slots__ = ("created_at", "full_json", "metering_json", "record")

    def __init__(self, record: dict[str, Any], created_at: float) -> None:
        self.record = record
        self.created_at = created_at
        # Serialised once so a lookup is a dict hit and a bytes concat.
        self.full_json = json.dumps(record, separators=(",", ":")).encode()
        self.metering_json = json.dumps(metering_only(record), separators=(",", ":")).encode()


def _json(status: int, body: bytes) -> Response:
    return Response(status=status, body=body, content_type=JSON_TYPE)


class SimulatedZenMux:
    """An in-memory ZenMux.

    HTTP (`handle`): GET /api/v1/generation and /api/v1/management/generation?id=, POST /api/v1/generations,
    the LLM protocol endpoints of `exporter.simulate.protocols`,
    and the ground-truth endpoints GET /_sim/records[?ready=1], GET /_sim/stats, GET|POST /_sim/config; the
    account endpoints (cost, PAYG balance) and POST|GET /_sim/unseen are `account` (exporter/simulate/account.py).
    Faults and rate limits apply to lookups only, so traffic creation (and thus the totals) stays exact.
    In process: `create`, `record`, `records`, `stats`, `configure`.
    """

    def __init__(
        self,
        config: SimConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        rng: Random | None = None,
    ) -> None:
        self._clock = clock
        self._rng = rng if rng is not None else Random()
        self._records: dict[str, _Stored] = {}
        self._stats: Counter[tuple[str, str]] = Counter()
        self._fault_stats: Counter[str] = Counter()
        self._request_ids = itertools.count(1)
        self._request_prefix = f"sim-{secrets.token_hex(4)}-"
        self._buckets: dict[str, tuple[float, float]] = {}
        self._routes: dict[str, Callable[[Request], Awaitable[Response]]] = {
            GENERATION_PATH: self._lookup_legacy,
            MANAGEMENT_PATH: self._lookup_management,
            CREATE_PATH: self._create_endpoint,
            "/_sim/records": self._sim_records,
            "/_sim/stats": self._sim_stats,
            "/_sim/config": self._sim_config,
        }
        from exporter.simulate.account import AccountEndpoints  # they build on this module
        from exporter.simulate.protocols import Protocols

        self.account = AccountEndpoints(self, clock)
        self._routes.update(self.account.routes)
        self._protocols = Protocols(self)
        self.configure(config if config is not None else SimConfig())

    # -- configuration ----------------------------------------------------------------------------------

    @property
    def config(self) -> SimConfig:
        return self._config

    def configure(self, config: SimConfig) -> None:
        """Swap the whole configuration at once (what POST /_sim/config does); rate-limit buckets restart full."""
        self._config = config
        self._faults = [(kind, getattr(config.faults, kind)) for kind in _EXCLUSIVE_FAULT_ORDER]
        self._faults = [(kind, ratio) for kind, ratio in self._faults if ratio > 0]
        self._any_fault = bool(self._faults) or config.faults.slow > 0
        self._buckets.clear()

    # -- in-process API ---------------------------------------------------------------------------------

    def create(
        self,
        *,
        model: str | None = None,
        api: str | None = None,
        id_style: IdStyle | None = None,
        streamed: bool | None = None,
        created_at: float | None = None,
    ) -> dict[str, Any]:
        """Record a new generation and return its full record (treat it as read-only). ValueError if bad args."""
        rng = self._rng
        if model is None:
            entry = rng.choices(catalog.MODELS, weights=catalog.WEIGHTS)[0]
        elif model in catalog.BY_ID:
            entry = catalog.BY_ID[model]
        else:
            raise ValueError(f"unknown model {model!r}; known: {sorted(catalog.BY_ID)}")
        if api is None:
            # Most teams use a model through its native protocol.
            api = entry.protocols[0] if rng.random() < 0.7 else rng.choice(entry.protocols)
        elif api not in entry.protocols:
            raise ValueError(f"model {entry.id} is not served over {api!r}; use one of {entry.protocols}")
        style = id_style if id_style is not None else DEFAULT_ID_STYLE[api]
        if style not in get_args(IdStyle):
            raise ValueError(f"id_style must be one of {get_args(IdStyle)}")
        if streamed is None:
            streamed = rng.random() < 0.6
        generation_id = self._new_id(style)
        when = self._clock() if created_at is None else created_at
        record = make_record(rng, entry, api, generation_id, when, streamed)
        self._records[generation_id] = _Stored(record, when)
        return record

    def record(self, generation_id: str) -> dict[str, Any] | None:
        """The full record (with billing) for an id, ready or not; None if unknown."""
        stored = self._records.get(generation_id)
        return None if stored is None else stored.record

    def records(self, *, ready_only: bool = False) -> list[dict[str, Any]]:
        """All full records in creation order; ready_only keeps those whose billing delay has passed."""
        if not ready_only:
            return [s.record for s in self._records.values()]
        cutoff = self._clock() - self._config.billing_delay_seconds
        return [s.record for s in self._records.values() if s.created_at <= cutoff]

    def stats(self) -> dict[str, Any]:
        requests: dict[str, dict[str, int]] = {}
        for (path, status), n in sorted(self._stats.items()):
            requests.setdefault(path, {})[status] = n
        return {
            "requests": requests,
            "faults": dict(sorted(self._fault_stats.items())),
            "records": len(self._records),
        }

    def _new_id(self, style: str) -> str:
        rng = self._rng
        while True:
            if style == "hex32":
                gid = f"{rng.getrandbits(128):032x}"
            elif style == "resp":
                gid = f"resp_{rng.getrandbits(192):048x}"
            elif style == "upper20":
                gid = "".join(rng.choices(_ALNUM_UPPER, k=20))
            else:
                gid = "gen_" + "".join(rng.choices(_ALNUM, k=24))
            if gid not in self._records:
                return gid

    # -- HTTP -------------------------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        route = self._routes.get(request.path) or self._protocols.route(request.path)
        if route is None:
            response = _json(404, _error_body(404, "not_found", f"no route for {request.path}"))
        else:
            response = await route(request)
        response.headers[REQUEST_ID_HEADER] = f"{self._request_prefix}{next(self._request_ids)}"
        if not request.path.startswith("/_sim/"):
            status = "reset" if response.abort else str(response.status)
            self._stats[(request.path, status)] += 1
        return response

    def _authenticate(self, request: Request) -> KeyKind | Response:
        scheme, _, key = request.header("authorization").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return _json(401, _error_body(401, "unauthorized", "Missing API key: send Authorization: Bearer <key>"))
        kind = self._config.keys.get(key)
        if kind is None:
            return _json(401, _error_body(401, "unauthorized", "Invalid API key"))
        return kind

    def _rate_limited(self, management: bool) -> Response:
        response = _json(422, _RATE_LIMITED_MANAGEMENT) if management else _json(429, _RATE_LIMITED)
        retry_after = self._config.retry_after_seconds
        if retry_after is not None:
            # HTTP's Retry-After is whole seconds.
            response.headers["Retry-After"] = str(math.ceil(retry_after))
        return response

    def _take_token(self, key: str) -> bool:
        rate = self._config.rate_limit_per_second
        if rate is None:
            return True
        now = self._clock()
        capacity = max(1.0, rate)
        tokens, last = self._buckets.get(key, (capacity, now))
        tokens = min(capacity, tokens + (now - last) * rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        return True

    async def _lookup_legacy(self, request: Request) -> Response:
        return await self._lookup(request, management=False)

    async def _lookup_management(self, request: Request) -> Response:
        return await self._lookup(request, management=True)

    async def _lookup(self, request: Request, *, management: bool) -> Response:
        if request.method != "GET":
            return _json(405, _error_body(405, "method_not_allowed", "use GET"))
        kind = self._authenticate(request)
        if isinstance(kind, Response):
            return kind
        if not self._take_token(request.header("authorization")):
            return self._rate_limited(management)
        generation_id = request.query.get("id", "")
        stored = self._records.get(generation_id)
        if self._any_fault:
            if self._config.faults.slow > 0 and self._rng.random() < self._config.faults.slow:
                self._fault_stats["slow"] += 1
                await asyncio.sleep(self._config.faults.slow_seconds)
            for fault, ratio in self._faults:
                if self._rng.random() < ratio:
                    self._fault_stats[fault] += 1
                    return self._faulty(fault, management, generation_id, stored)
        return self._answer(generation_id, stored, kind)

    def _answer(self, generation_id: str, stored: _Stored | None, kind: KeyKind) -> Response:
        if not generation_id:
            return _json(400, _error_body(400, "invalid_request", "Missing query parameter: id"))
        if stored is None:
            return _json(404, _NOT_FOUND)
        config = self._config
        ready = self._clock() >= stored.created_at + config.billing_delay_seconds
        if not ready and config.not_ready_mode == "404":
            return _json(404, _NOT_FOUND)
        body = stored.full_json if ready and kind != "subscription" else stored.metering_json
        head, tail = _ENVELOPES[config.envelope]
        return _json(200, head + body + tail if head else body)

    def _faulty(self, fault: str, management: bool, generation_id: str, stored: _Stored | None) -> Response:
        rng = self._rng
        if fault == "reset":
            return Response(abort=True)
        if fault == "server_error":
            status = rng.choice((500, 502, 503))
            if status == 500:
                return _json(500, _SERVER_ERROR_JSON)
            return Response(status=status, body=_PROXY_PAGES[status], content_type="text/html")
        if fault == "rate_limited":
            return self._rate_limited(management)
        if fault == "malformed":
            return self._malformed(generation_id, stored)
        base = stored.full_json if stored is not None else _fallback_record(generation_id)
        if fault == "oversized":
            return _json(200, _oversized(base, self._config.faults.oversized_bytes))
        # truncated: the server promises the whole record and hangs up half way.
        return Response(status=200, body=base[: len(base) // 2], content_type=JSON_TYPE, declared_length=len(base))

    def _malformed(self, generation_id: str, stored: _Stored | None) -> Response:
        variant = self._rng.randrange(7)
        if variant == 0:
            return _json(200, b'{"foo":1}')
        if variant == 1:
            return _json(200, b"null")
        if variant == 2:
            page = b"<html><body>Service is warming up</body></html>"
            return Response(status=200, body=page, content_type="text/html")
        base = json.loads(stored.full_json if stored is not None else _fallback_record(generation_id))
        if variant == 3:
            return _json(200, b"[" + json.dumps(base).encode() + b"]")
        if variant == 4:
            base["nativeTokens"] = "n/a"
            base["latency"] = {"ms": base.get("latency")}
            base["streamed"] = [True]
        elif variant == 5:
            base["nativeTokens"]["prompt_tokens"] = -1 - abs(base["nativeTokens"]["prompt_tokens"])
            base["latency"] = -250
            if "usage" in base:
                base["usage"] = -abs(base["usage"]) - 0.001
        else:
            base["latency"] = math.nan
            base["generationTime"] = math.inf
            if "usage" in base:
                base["usage"] = math.nan
        return _json(200, json.dumps(base).encode())  # allow_nan: emits the NaN/Infinity literals on purpose

    # -- create and ground-truth endpoints ------------------------------------------------------------

    async def _create_endpoint(self, request: Request) -> Response:
        if request.method != "POST":
            return _json(405, _error_body(405, "method_not_allowed", "use POST"))
        kind = self._authenticate(request)
        if isinstance(kind, Response):
            return kind
        try:
            params = json.loads(request.body) if request.body.strip() else {}
            if not isinstance(params, dict):
                raise ValueError("body must be a JSON object")
            unknown = set(params) - {"model", "api", "id_style", "streamed"}
            if unknown:
                raise ValueError(f"unknown fields: {sorted(unknown)}")
            streamed = params.get("streamed")
            if streamed is not None and not isinstance(streamed, bool):
                raise ValueError("streamed must be a boolean")
            record = self.create(
                model=params.get("model"),
                api=params.get("api"),
                id_style=params.get("id_style"),
                streamed=streamed,
            )
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            return _json(400, _error_body(400, "invalid_request", str(exc)))
        body = {
            "id": record["generationId"],
            "model": record["model"],
            "api": record["api"],
            "createAt": record["createAt"],
            "streamed": record["streamed"],
            "finishReason": record["finishReason"],
            "usage": inline_usage(record),
        }
        response = _json(200, json.dumps(body, separators=(",", ":")).encode())
        response.headers["x-generation-id"] = record["generationId"]
        return response

    async def _sim_records(self, request: Request) -> Response:
        ready_only = request.query.get("ready", "") in ("1", "true")
        if ready_only:
            cutoff = self._clock() - self._config.billing_delay_seconds
            stored = [s.full_json for s in self._records.values() if s.created_at <= cutoff]
        else:
            stored = [s.full_json for s in self._records.values()]
        return _json(200, b"[" + b",".join(stored) + b"]")

    async def _sim_stats(self, request: Request) -> Response:
        return _json(200, json.dumps(self.stats()).encode())

    async def _sim_config(self, request: Request) -> Response:
        if request.method == "POST":
            try:
                changes = json.loads(request.body)
                if not isinstance(changes, dict):
                    raise ValueError("body must be a JSON object")
                self.configure(config_from_json(self._config, changes))
            except ValueError as exc:
                return _json(400, _error_body(400, "invalid_request", str(exc)))
        elif request.method != "GET":
            return _json(405, _error_body(405, "method_not_allowed", "use GET or POST"))
        return _json(200, json.dumps(self._config.to_json()).encode())


def _fallback_record(generation_id: str) -> bytes:
    # A plausible record for an id the simulator never issued, so faults look the same for any id.
    return json.dumps(
        {
            "api": "chat.completions",
            "generationId": generation_id,
            "model": "openai/gpt-4.1-mini",
            "nativeTokens": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            "latency": 300,
        },
        separators=(",", ":"),
    ).encode()


def _oversized(record_json: bytes, size: int) -> bytes:
    head = record_json[:-1] + b',"providerRawResponse":"'
    pad = max(0, size - len(head) - 2)
    filler = (_PADDING_UNIT * (pad // len(_PADDING_UNIT) + 1))[:pad]
    return head + filler + b'"}'


async def serve(sim: SimulatedZenMux, host: str = "127.0.0.1", port: int = 0) -> ThreadedServer:
    """Serves sim on host:port with the standard library's HTTP server (port 0 picks a free one; read it from
    `.port`): the exporter's client meets a server we did not write."""
    return await serve_threaded(sim.handle, host, port)


__all__ = [
    "CREATE_PATH",
    "DEFAULT_KEYS",
    "GENERATION_PATH",
    "MANAGEMENT_PATH",
    "REQUEST_ID_HEADER",
    "TOTAL_KEYS",
    "Envelope",
    "Faults",
    "IdStyle",
    "KeyKind",
    "NotReadyMode",
    "SimConfig",
    "SimulatedZenMux",
    "config_from_json",
    "inline_usage",
    "iso_ms",
    "key_kind_for",
    "make_record",
    "metering_only",
    "rate_generation",
    "serve",
    "totals",
]
