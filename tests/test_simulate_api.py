"""Tests of the simulated ZenMux API over real loopback sockets, with an injected clock and seeded randomness."""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.simulate import Faults, SimConfig, SimulatedZenMux, catalog, serve, totals
from exporter.simulate.api import (
    GENERATION_PATH,
    MANAGEMENT_PATH,
    REQUEST_ID_HEADER,
    config_from_json,
    inline_usage,
    iso_ms,
    key_kind_for,
)

PAYG = "sk-ai-v1-demo"
SUB = "sk-ss-v1-demo"
MGMT = "sk-mg-v1-demo"
PATHS = (GENERATION_PATH, MANAGEMENT_PATH)
VALID_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class FakeClock:
    def __init__(self, start: float = 1_790_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@asynccontextmanager
async def running(
    config: SimConfig | None = None, *, seed: int = 7, client_timeout: float = 5.0
) -> AsyncIterator[tuple[SimulatedZenMux, httpx.AsyncClient, FakeClock]]:
    clock = FakeClock()
    sim = SimulatedZenMux(config, clock=clock, rng=random.Random(seed))
    server = await serve(sim, "127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=client_timeout) as client:
            yield sim, client, clock
    finally:
        await server.close()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def lookup(client: httpx.AsyncClient, gid: str, key: str = PAYG, path: str = GENERATION_PATH) -> httpx.Response:
    return await client.get(path, params={"id": gid}, headers=bearer(key))


def strict_json(body: bytes) -> Any:
    def reject(constant: str) -> Any:
        raise ValueError(f"non-finite number {constant}")

    return json.loads(body, parse_constant=reject)


def is_record(body: bytes) -> bool:
    """The parser's minimal idea of a record: an object with an id, non-negative integer tokens and latency."""
    try:
        rec = strict_json(body)
    except ValueError:
        return False
    if not isinstance(rec, dict) or not isinstance(rec.get("generationId"), str):
        return False
    tokens = rec.get("nativeTokens")
    if not isinstance(tokens, dict):
        return False
    numbers = [tokens.get("prompt_tokens"), tokens.get("completion_tokens"), rec.get("latency")]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
        return False
    usage = rec.get("usage", 0.0)
    return isinstance(usage, int | float) and math.isfinite(usage) and usage >= 0


# ------------------------------------------------------------------------------------------ lookups


async def test_both_paths_serve_the_record_once_billing_is_ready() -> None:
    async with running() as (sim, client, clock):
        rec = sim.create()
        gid = rec["generationId"]
        for path in PATHS:
            early = await lookup(client, gid, path=path)
            assert early.status_code == 404
            assert early.json()["error"]["code"] == "404"
        clock.advance(2.999)
        assert (await lookup(client, gid)).status_code == 404
        clock.advance(0.001)
        for path in PATHS:
            ready = await lookup(client, gid, path=path)
            assert ready.status_code == 200
            assert ready.headers["content-type"] == "application/json"
            assert ready.json() == rec


async def test_key_kinds_and_auth_errors() -> None:
    async with running() as (sim, client, clock):
        gid = sim.create()["generationId"]
        clock.advance(10)
        for key in (PAYG, MGMT):
            for path in PATHS:
                body = (await lookup(client, gid, key, path)).json()
                assert body["usage"] == body["ratingResponses"]["billAmount"]
        # The management lookup path takes the same key kinds as the deprecated one (the reference).
        for path in PATHS:
            sub = await lookup(client, gid, SUB, path)
            assert sub.status_code == 200
            assert "usage" not in sub.json() and "ratingResponses" not in sub.json()
            assert sub.json()["nativeTokens"] == sim.record(gid)["nativeTokens"]  # type: ignore[index]

        for headers in ({}, bearer("sk-ai-v1-nope"), {"Authorization": f"Basic {PAYG}"}, {"Authorization": "Bearer"}):
            for path in PATHS:
                resp = await client.get(path, params={"id": gid}, headers=headers)
                assert resp.status_code == 401
                error = resp.json()["error"]
                assert (error["code"], error["type"]) == ("401", "unauthorized")
                assert isinstance(error["message"], str) and error["message"]


async def test_custom_keys_mapping() -> None:
    config = SimConfig(keys={"sk-ss-v1-team": "subscription", "sk-ai-v1-team": "payg"})
    async with running(config) as (sim, client, clock):
        gid = sim.create()["generationId"]
        clock.advance(10)
        assert (await lookup(client, gid, "sk-ai-v1-team")).status_code == 200
        assert (await lookup(client, gid, PAYG)).status_code == 401
        assert (await lookup(client, gid, "sk-ss-v1-team", MANAGEMENT_PATH)).status_code == 200
    assert key_kind_for("sk-mg-v1-x") == "management"
    assert key_kind_for("sk-ss-v1-x") == "subscription"
    assert key_kind_for("other") is None


async def test_subscription_key_sees_final_metering_and_404_mode_applies_to_it() -> None:
    async with running() as (sim, client, clock):
        gid = sim.create()["generationId"]
        assert (await lookup(client, gid, SUB)).status_code == 404
        clock.advance(3)
        assert "usage" not in (await lookup(client, gid, SUB)).json()


async def test_partial_mode_serves_metering_until_billing_is_ready() -> None:
    async with running(SimConfig(not_ready_mode="partial", billing_delay_seconds=240)) as (sim, client, clock):
        rec = sim.create()
        gid = rec["generationId"]
        for key in (PAYG, SUB):
            early = await lookup(client, gid, key)
            assert early.status_code == 200
            body = early.json()
            assert "usage" not in body and "ratingResponses" not in body
            assert body["nativeTokens"] == rec["nativeTokens"]
        clock.advance(240)
        assert (await lookup(client, gid, PAYG)).json() == rec
        assert "usage" not in (await lookup(client, gid, SUB)).json()


@pytest.mark.parametrize(
    ("envelope", "unwrap"),
    [
        ("bare", lambda body: body),
        ("data", lambda body: body["data"]),
        ("success", lambda body: body["data"] if body.get("success") is True else None),
    ],
)
async def test_envelopes(envelope: Any, unwrap: Callable[[Any], Any]) -> None:
    async with running(SimConfig(envelope=envelope, not_ready_mode="partial")) as (sim, client, clock):
        rec = sim.create()
        gid = rec["generationId"]
        partial = unwrap((await lookup(client, gid)).json())
        assert partial["generationId"] == gid and "usage" not in partial
        clock.advance(3)
        assert unwrap((await lookup(client, gid, path=MANAGEMENT_PATH)).json()) == rec
        # Errors are never wrapped.
        assert "error" in (await lookup(client, "nope")).json()


async def test_unknown_id_missing_id_and_unknown_route() -> None:
    async with running() as (_sim, client, clock):
        clock.advance(100)
        missing = await lookup(client, "dc41ec9a378d43a497ca2daff171ceb0")
        assert missing.status_code == 404
        assert missing.json()["error"]["type"] == "not_found"
        no_id = await client.get(GENERATION_PATH, headers=bearer(PAYG))
        assert no_id.status_code == 400
        assert (await client.get("/api/v2/other", headers=bearer(PAYG))).status_code == 404
        assert (await client.post(GENERATION_PATH, headers=bearer(PAYG))).status_code == 405


async def test_every_response_has_a_unique_request_id() -> None:
    async with running(SimConfig(faults=Faults(server_error=0.5))) as (sim, client, _clock):
        gid = sim.create()["generationId"]
        responses = [await lookup(client, gid) for _ in range(10)]
        responses += [await client.get(MANAGEMENT_PATH, params={"id": gid})]
        responses += [await client.post("/api/v1/generations", headers=bearer(PAYG))]
        responses += [await client.get("/_sim/stats"), await client.get("/nowhere")]
        ids = [r.headers[REQUEST_ID_HEADER] for r in responses]
        assert all(ids) and len(set(ids)) == len(ids)


# ------------------------------------------------------------------------------------------ faults


async def test_fault_server_error() -> None:
    async with running(SimConfig(faults=Faults(server_error=1.0))) as (sim, client, _clock):
        gid = sim.create()["generationId"]
        statuses = {(await lookup(client, gid)).status_code for _ in range(40)}
        assert statuses == {500, 502, 503}
        assert sim.stats()["faults"] == {"server_error": 40}


@pytest.mark.parametrize(("path", "status"), [(GENERATION_PATH, 429), (MANAGEMENT_PATH, 422)])
async def test_fault_rate_limited(path: str, status: int) -> None:
    config = SimConfig(faults=Faults(rate_limited=1.0), retry_after_seconds=2.0)
    async with running(config) as (sim, client, _clock):
        resp = await lookup(client, sim.create()["generationId"], path=path)
        assert resp.status_code == status
        assert resp.json()["error"] == {
            "code": str(status),
            "type": "rate_limit",
            "message": resp.json()["error"]["message"],
        }
        assert resp.headers["retry-after"] == "2"


async def test_fault_slow_outlasts_a_client_timeout() -> None:
    config = SimConfig(faults=Faults(slow=1.0, slow_seconds=30.0))
    async with running(config, client_timeout=0.2) as (sim, client, _clock):
        with pytest.raises(httpx.ReadTimeout):
            await lookup(client, sim.create()["generationId"])


async def test_fault_slow_then_answers() -> None:
    async with running(SimConfig(faults=Faults(slow=1.0, slow_seconds=0.0))) as (sim, client, clock):
        gid = sim.create()["generationId"]
        clock.advance(3)
        assert (await lookup(client, gid)).status_code == 200
        assert sim.stats()["faults"] == {"slow": 1}


async def test_fault_malformed_bodies_are_never_records() -> None:
    async with running(SimConfig(faults=Faults(malformed=1.0))) as (sim, client, clock):
        gid = sim.create()["generationId"]
        clock.advance(3)
        bodies = []
        for target in [gid] * 60 + ["unknown"] * 20:
            resp = await lookup(client, target)
            assert resp.status_code == 200
            assert not is_record(resp.content), resp.content[:200]
            bodies.append(resp.content)
        # Every variant showed up: junk objects, null, HTML, a list, wrong types, negatives, non-finite numbers.
        for marker in (b'{"foo":1}', b"null", b"<html>", b'[{"api"', b'"n/a"', b'"latency": -250', b"NaN"):
            assert any(marker in body for body in bodies), marker


async def test_fault_truncated_body() -> None:
    async with running(SimConfig(faults=Faults(truncated=1.0))) as (sim, client, clock):
        gid = sim.create()["generationId"]
        clock.advance(3)
        with pytest.raises(httpx.RemoteProtocolError):
            await lookup(client, gid)


async def test_fault_reset() -> None:
    async with running(SimConfig(faults=Faults(reset=1.0))) as (sim, client, _clock):
        with pytest.raises(httpx.TransportError):
            await lookup(client, sim.create()["generationId"])
        assert sim.stats()["requests"][GENERATION_PATH] == {"reset": 1}


@pytest.mark.parametrize("size", [300_000, 2 * 1024 * 1024])
async def test_fault_oversized(size: int) -> None:
    async with running(SimConfig(faults=Faults(oversized=1.0, oversized_bytes=size))) as (sim, client, clock):
        gid = sim.create()["generationId"]
        clock.advance(3)
        resp = await lookup(client, gid)
        assert resp.status_code == 200
        assert len(resp.content) == size
        assert strict_json(resp.content)["generationId"] == gid


def test_fault_ratios_are_validated() -> None:
    with pytest.raises(ValueError, match="server_error"):
        Faults(server_error=1.5)
    with pytest.raises(ValueError, match="reset"):
        Faults(reset=-0.1)
    with pytest.raises(ValueError, match="not_ready_mode"):
        SimConfig(not_ready_mode="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="envelope"):
        SimConfig(envelope="xml")  # type: ignore[arg-type]


async def test_partial_fault_ratio_is_roughly_honoured() -> None:
    async with running(SimConfig(faults=Faults(server_error=0.3)), seed=3) as (sim, client, clock):
        gid = sim.create()["generationId"]
        clock.advance(3)
        statuses = [(await lookup(client, gid)).status_code for _ in range(200)]
        errors = sum(s >= 500 for s in statuses)
        assert 30 <= errors <= 90
        assert statuses.count(200) == 200 - errors


# ------------------------------------------------------------------------------------------ rate limit


@pytest.mark.parametrize(("path", "status"), [(GENERATION_PATH, 429), (MANAGEMENT_PATH, 422)])
async def test_token_bucket_rate_limit(path: str, status: int) -> None:
    config = SimConfig(rate_limit_per_second=2.0, retry_after_seconds=1.5, billing_delay_seconds=0)
    async with running(config) as (sim, client, clock):
        gid = sim.create()["generationId"]
        first = [(await lookup(client, gid, path=path)).status_code for _ in range(2)]
        assert first == [200, 200]
        limited = await lookup(client, gid, path=path)
        assert limited.status_code == status
        assert limited.json()["error"]["code"] == str(status)
        assert limited.headers["retry-after"] == "2"
        clock.advance(0.5)
        assert (await lookup(client, gid, path=path)).status_code == 200
        assert (await lookup(client, gid, path=path)).status_code == status
        # Buckets are per key.
        assert (await lookup(client, gid, MGMT, path)).status_code == 200


async def test_rate_limit_without_retry_after() -> None:
    async with running(SimConfig(rate_limit_per_second=1.0)) as (sim, client, _clock):
        gid = sim.create()["generationId"]
        await lookup(client, gid)
        limited = await lookup(client, gid)
        assert limited.status_code == 429
        assert "retry-after" not in limited.headers


# ------------------------------------------------------------------------------------------ runtime config


async def test_runtime_config_starts_and_ends_a_fault_storm() -> None:
    async with running() as (sim, client, clock):
        gid = sim.create()["generationId"]
        clock.advance(3)
        assert (await lookup(client, gid)).status_code == 200
        storm = await client.post("/_sim/config", json={"faults": {"server_error": 1.0}, "rate_limit_per_second": 50})
        assert storm.status_code == 200
        assert storm.json()["faults"]["server_error"] == 1.0
        assert sim.config.rate_limit_per_second == 50
        assert (await lookup(client, gid)).status_code >= 500
        calm = await client.post("/_sim/config", json={"faults": {}, "rate_limit_per_second": None})
        assert calm.json()["faults"]["server_error"] == 0.0
        assert (await lookup(client, gid)).status_code == 200

        switch = await client.post("/_sim/config", json={"not_ready_mode": "partial", "envelope": "data"})
        assert switch.status_code == 200
        fresh = sim.create()["generationId"]
        assert "usage" not in (await lookup(client, fresh)).json()["data"]
        assert (await client.get("/_sim/config")).json()["envelope"] == "data"

        bad: object
        for bad in ({"faults": {"server_error": 2}}, {"keys": {}}, {"faults": {"bogus": 1}}, {"envelope": "x"}, []):
            resp = await client.post("/_sim/config", json=bad)
            assert resp.status_code == 400, bad
            assert resp.json()["error"]["code"] == "400"
        assert (await client.post("/_sim/config", content=b"{nope")).status_code == 400
        assert sim.config.envelope == "data"


def test_config_from_json_keeps_keys_and_replaces_faults_whole() -> None:
    base = SimConfig(keys={"sk-ai-v1-x": "payg"}, faults=Faults(reset=0.5, slow=0.2))
    new = config_from_json(base, {"faults": {"slow": 0.1}})
    assert new.keys == {"sk-ai-v1-x": "payg"}
    assert new.faults == Faults(slow=0.1)
    with pytest.raises(ValueError, match="rate_limit_per_second"):
        config_from_json(base, {"rate_limit_per_second": "fast"})


# ------------------------------------------------------------------------------------------ create + ground truth


@pytest.mark.parametrize(
    ("style", "pattern"),
    [
        ("hex32", r"^[0-9a-f]{32}$"),
        ("resp", r"^resp_[0-9a-f]{48}$"),
        ("upper20", r"^[A-Z0-9]{20}$"),
        ("gen", r"^gen_[A-Za-z0-9]{24}$"),
    ],
)
async def test_create_endpoint_id_styles(style: str, pattern: str) -> None:
    async with running() as (sim, client, _clock):
        body = {"model": "openai/gpt-4.1", "api": "responses", "id_style": style, "streamed": False}
        resp = await client.post("/api/v1/generations", json=body, headers=bearer(SUB))
        assert resp.status_code == 200
        created = resp.json()
        assert re.match(pattern, created["id"]) and VALID_ID.match(created["id"])
        assert resp.headers["x-generation-id"] == created["id"]
        assert (created["model"], created["api"], created["streamed"]) == ("openai/gpt-4.1", "responses", False)
        rec = sim.record(created["id"])
        assert rec is not None
        assert created["usage"]["input_tokens"] == rec["nativeTokens"]["prompt_tokens"]
        assert created["usage"]["output_tokens_details"]["reasoning_tokens"] == 0


async def test_create_endpoint_defaults_and_errors() -> None:
    async with running() as (sim, client, _clock):
        resp = await client.post("/api/v1/generations", headers=bearer(PAYG))
        assert resp.status_code == 200
        rec = sim.record(resp.json()["id"])
        assert rec is not None and rec["model"] in catalog.BY_ID
        for body in (
            {"model": "acme/unknown"},
            {"model": "deepseek/deepseek-chat", "api": "messages"},
            {"id_style": "uuid"},
            {"streamed": "yes"},
            {"colour": "blue"},
            [1],
        ):
            bad = await client.post("/api/v1/generations", json=body, headers=bearer(PAYG))
            assert bad.status_code == 400, body
            assert bad.json()["error"]["type"] == "invalid_request"
        assert (await client.post("/api/v1/generations")).status_code == 401
        assert (await client.get("/api/v1/generations", headers=bearer(PAYG))).status_code == 405
        assert len(sim.records()) == 1


@pytest.mark.parametrize("api", catalog.PROTOCOLS)
def test_inline_usage_matches_the_record(api: str) -> None:
    model = next(m for m in catalog.MODELS if api in m.protocols and m.reasoning)
    sim = SimulatedZenMux(rng=random.Random(11))
    for _ in range(20):
        rec = sim.create(model=model.id, api=api)
        tokens = rec["nativeTokens"]
        usage = inline_usage(rec)
        prompt, completion = tokens["prompt_tokens"], tokens["completion_tokens"]
        cached = tokens["prompt_tokens_details"]["cached_tokens"]
        reasoning = tokens["completion_tokens_details"]["reasoning_tokens"]
        if api == "messages":
            assert usage["input_tokens"] + usage["cache_read_input_tokens"] == prompt
            assert usage["cache_read_input_tokens"] == cached
            assert usage["output_tokens"] == completion
        elif api == "generateContent":
            assert usage["candidatesTokenCount"] + usage["thoughtsTokenCount"] == completion
            assert usage["thoughtsTokenCount"] == reasoning
            assert usage["totalTokenCount"] == prompt + completion
        elif api == "responses":
            assert (usage["input_tokens"], usage["output_tokens"]) == (prompt, completion)
        else:
            assert usage["prompt_tokens_details"]["cached_tokens"] == cached
            assert usage["completion_tokens_details"]["reasoning_tokens"] == reasoning


async def test_ground_truth_endpoints() -> None:
    async with running(SimConfig(faults=Faults(reset=0.0))) as (sim, client, clock):
        old = [sim.create() for _ in range(3)]
        clock.advance(5)
        new = sim.create()
        everything = (await client.get("/_sim/records")).json()
        assert everything == [*old, new]
        assert (await client.get("/_sim/records", params={"ready": "1"})).json() == old
        assert sim.records(ready_only=True) == old

        await lookup(client, old[0]["generationId"])
        await lookup(client, new["generationId"], path=MANAGEMENT_PATH)
        await lookup(client, new["generationId"], key="bad")
        stats = (await client.get("/_sim/stats")).json()
        assert stats["requests"] == {GENERATION_PATH: {"200": 1, "401": 1}, MANAGEMENT_PATH: {"404": 1}}
        assert stats["records"] == 4
        assert stats["faults"] == {}


def test_totals_sum_the_records() -> None:
    sim = SimulatedZenMux(rng=random.Random(5))
    records = [sim.create() for _ in range(50)]
    sums = totals(records)
    assert sums["generations"] == 50
    assert sums["prompt_tokens"] == sum(r["nativeTokens"]["prompt_tokens"] for r in records)
    assert sums["cached_tokens"] == sum(r["nativeTokens"]["prompt_tokens_details"]["cached_tokens"] for r in records)
    assert sums["reasoning_tokens"] == sum(
        r["nativeTokens"]["completion_tokens_details"]["reasoning_tokens"] for r in records
    )
    assert sums["retries"] == sum(r["requestRetryTimes"] for r in records)
    assert sums["usage"] == pytest.approx(sums["billAmount"], rel=1e-12)
    assert sums["originAmount"] == pytest.approx(sums["billAmount"] + sums["discountAmount"], rel=1e-9)
    assert sums["billAmount"] == pytest.approx(sum(r["ratingResponses"]["billAmount"] for r in records))
    assert sums["discountAmount"] > 0  # promotions happen in a 50-record sample
    unbilled = totals([{k: v for k, v in r.items() if k not in ("usage", "ratingResponses")} for r in records])
    assert unbilled["billAmount"] == 0 and unbilled["prompt_tokens"] == sums["prompt_tokens"]


def test_reference_example_arithmetic() -> None:
    from exporter.simulate.api import rate_generation

    rating = rate_generation(catalog.model("anthropic/claude-sonnet-4"), 1200, 0, 350, discounted=False)
    assert rating["billAmount"] == 0.00885
    assert [d["originAmount"] for d in rating["ratingDetails"]] == [0.0036, 0.00525]
    assert [d["rate"] for d in rating["ratingDetails"]] == [3, 15]


def test_iso_ms() -> None:
    assert iso_ms(1_764_065_702.12) == "2025-11-25T10:15:02.120Z"
    assert iso_ms(0.9999) == "1970-01-01T00:00:00.999Z"


# ------------------------------------------------------------------------------------------ invariants


def check_record(rec: dict[str, Any], now: float) -> None:
    model = catalog.model(rec["model"])
    assert rec["api"] in model.protocols
    assert VALID_ID.match(rec["generationId"])
    assert rec["createAt"] == iso_ms(now) and ISO_MS.match(rec["createAt"])
    assert 200 <= rec["latency"] <= 3000
    assert 500 <= rec["generationTime"] <= 60_000
    assert rec["finishReason"] in ("stop", "length", "tool_calls")
    assert 0 <= rec["requestRetryTimes"] <= 3 and rec["finalRetry"] is True
    assert isinstance(rec["streamed"], bool)
    tokens = rec["nativeTokens"]
    prompt, completion = tokens["prompt_tokens"], tokens["completion_tokens"]
    cached = tokens["prompt_tokens_details"]["cached_tokens"]
    reasoning = tokens["completion_tokens_details"]["reasoning_tokens"]
    assert prompt >= 1 and completion >= 1 and tokens["total_tokens"] == prompt + completion
    assert 0 <= cached <= prompt and 0 <= reasoning <= completion
    if not model.reasoning:
        assert reasoning == 0

    rating = rec["ratingResponses"]
    details = rating["ratingDetails"]
    expected_items = ["prompt", *(["cache_read"] if cached else []), "completion"]
    assert [d["feeItemCode"] for d in details] == expected_items
    item_tokens = {"prompt": prompt - cached, "cache_read": cached, "completion": completion}
    rates = {
        "prompt": model.prompt_usd_per_m,
        "cache_read": model.cache_read_usd_per_m,
        "completion": model.completion_usd_per_m,
    }
    discounted = rating["discountAmount"] > 0
    assert not discounted or model.promo
    for d in details:
        code = d["feeItemCode"]
        assert d["rate"] == rates[code]
        assert d["originAmount"] == round(item_tokens[code] * rates[code] / 1e6, 10)
        expected_discount = round(d["originAmount"] * catalog.PROMO_DISCOUNT_RATE, 10) if discounted else 0.0
        assert d["discountAmount"] == expected_discount
        assert d["billAmount"] == round(d["originAmount"] - d["discountAmount"], 10)
        assert d["billAmount"] >= 0
    for name in ("billAmount", "originAmount", "discountAmount"):
        assert rating[name] == round(math.fsum(d[name] for d in details), 10)
    assert rec["usage"] == rating["billAmount"]
    assert rating["originAmount"] == pytest.approx(rating["billAmount"] + rating["discountAmount"], abs=1e-9)
    assert rating["priceVersion"] == catalog.PRICE_VERSION


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**63), now=st.floats(min_value=1.6e9, max_value=2.1e9))
def test_records_are_internally_consistent(seed: int, now: float) -> None:
    sim = SimulatedZenMux(clock=lambda: now, rng=random.Random(seed))
    for _ in range(5):
        check_record(sim.create(), now)
    for m in catalog.MODELS:
        for api in m.protocols:
            check_record(sim.create(model=m.id, api=api), now)


def test_same_seed_same_records() -> None:
    def run(seed: int) -> list[dict[str, Any]]:
        sim = SimulatedZenMux(clock=lambda: 1.8e9, rng=random.Random(seed))
        return [sim.create() for _ in range(20)]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_traffic_mix_is_realistic() -> None:
    sim = SimulatedZenMux(clock=lambda: 1.8e9, rng=random.Random(99))
    records = [sim.create() for _ in range(2000)]
    models = {r["model"] for r in records}
    assert models == set(catalog.BY_ID)
    assert {r["api"] for r in records} == set(catalog.PROTOCOLS)
    finish = [r["finishReason"] for r in records]
    assert finish.count("stop") > 0.8 * len(finish)
    assert {"length", "tool_calls"} <= set(finish)
    retries = [r["requestRetryTimes"] for r in records]
    assert retries.count(0) > 0.8 * len(retries) and max(retries) == 3
    assert max(r["generationTime"] for r in records) > 10 * sorted(r["generationTime"] for r in records)[1000]
    assert len({r["generationId"] for r in records}) == len(records)
