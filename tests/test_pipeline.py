"""End to end over real sockets and files: ids in by file and UDP, resolved, /metrics equal to the API's records."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from exporter.simulate.api import totals
from tests.support import FakeApi, StartExporter, append_lines, json_line, make_config, scrape, value, wait_until


def send_udp(port: int, payload: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(payload, ("127.0.0.1", port))


async def test_file_and_udp_ids_resolve_to_exact_totals(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    exporter = await start_exporter(make_config(tmp_path, fake_api.url))
    file_ids = [fake_api.create() for _ in range(30)]
    udp_ids = [fake_api.create() for _ in range(30)]
    append_lines(tmp_path / "app.log", [json_line(i, "search") for i in file_ids])
    port = exporter.udp_sources[0].port
    for start in range(0, len(udp_ids), 10):
        send_udp(port, "\n".join(udp_ids[start : start + 10]).encode())

    async def all_resolved() -> bool:
        return value(await scrape(exporter.metrics_port), "zenmux_generations_total") == 60

    await wait_until(all_resolved, what="60 generations on /metrics")
    text = await scrape(exporter.metrics_port)
    truth = totals(r for i in file_ids + udp_ids if (r := fake_api.sim.record(i)) is not None)
    assert value(text, "zenmux_tokens_total", token_type="prompt") == truth["prompt_tokens"]
    assert value(text, "zenmux_tokens_total", token_type="completion") == truth["completion_tokens"]
    assert value(text, "zenmux_tokens_total", token_type="reasoning") == truth["reasoning_tokens"]
    assert value(text, "zenmux_tokens_total", token_type="cached") == truth["cached_tokens"]
    assert value(text, "zenmux_cost_usd_total") == pytest.approx(truth["billAmount"], rel=1e-12)
    assert value(text, "zenmux_cost_origin_usd_total") == pytest.approx(truth["originAmount"], rel=1e-12)
    assert value(text, "zenmux_cost_discount_usd_total") == pytest.approx(truth["discountAmount"], abs=1e-12)
    assert value(text, "zenmux_credits_total") == pytest.approx(truth["usage"], rel=1e-12)
    assert value(text, "zenmux_cost_by_fee_item_usd_total") == pytest.approx(truth["billAmount"], rel=1e-12)
    assert value(text, "zenmux_upstream_retries_total") == truth["retries"]
    assert value(text, "zenmux_generation_cost_usd_count") == 60
    assert value(text, "zenmux_generations_total", feature="search") == 30
    assert value(text, "zenmux_exporter_ids_received_total", source="app-log") == 30
    assert value(text, "zenmux_exporter_ids_received_total", source="udp") == 30
    assert value(text, "zenmux_exporter_pending_ids") == 0
    for model in {fake_api.sim.record(i)["model"] for i in file_ids}:  # type: ignore[index]
        assert value(text, "zenmux_generations_total", model=model) > 0


async def test_an_id_seen_twice_is_counted_once(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    exporter = await start_exporter(make_config(tmp_path, fake_api.url))
    generation_id = fake_api.create()
    append_lines(tmp_path / "app.log", [json_line(generation_id), json_line(generation_id)])

    async def seen_duplicate() -> bool:
        text = await scrape(exporter.metrics_port)
        return value(text, "zenmux_exporter_ids_duplicate_total") == 1 and value(text, "zenmux_generations_total") == 1

    await wait_until(seen_duplicate, what="one generation and one duplicate")
    send_udp(exporter.udp_sources[0].port, generation_id.encode())  # again, after it was resolved

    async def seen_second_duplicate() -> bool:
        return value(await scrape(exporter.metrics_port), "zenmux_exporter_ids_duplicate_total") == 2

    await wait_until(seen_second_duplicate, what="the late duplicate counted")
    assert value(await scrape(exporter.metrics_port), "zenmux_generations_total") == 1


async def test_bad_lines_and_datagrams_are_counted_and_skipped(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    exporter = await start_exporter(make_config(tmp_path, fake_api.url))
    good = fake_api.create()
    append_lines(
        tmp_path / "app.log",
        ["not json at all", '{"other": 1}', '{"generation_id": "bad id!"}', "x" * 70_000, json_line(good)],
    )
    send_udp(exporter.udp_sources[0].port, b"ok_id_but_unknown\n\xff\xfe bad\n")

    async def counted() -> bool:
        text = await scrape(exporter.metrics_port)
        return value(text, "zenmux_generations_total") == 1 and value(text, "zenmux_exporter_ids_rejected_total") == 5

    await wait_until(counted, what="good id resolved and 5 rejections")
    text = await scrape(exporter.metrics_port)
    for reason in ("not_json", "no_id", "invalid_id", "line_too_long"):
        assert value(text, "zenmux_exporter_ids_rejected_total", source="app-log", reason=reason) == 1, reason
    assert value(text, "zenmux_exporter_ids_rejected_total", source="udp", reason="invalid_id") == 1


async def test_metrics_pass_promtool_and_openmetrics_has_exemplars(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    exporter = await start_exporter(make_config(tmp_path, fake_api.url))
    ids = [fake_api.create() for _ in range(5)]
    append_lines(tmp_path / "app.log", [json_line(i) for i in ids])

    async def resolved() -> bool:
        return value(await scrape(exporter.metrics_port), "zenmux_generations_total") == 5

    await wait_until(resolved, what="5 generations")
    text = await scrape(exporter.metrics_port)
    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "_created" not in text
    openmetrics = await scrape(exporter.metrics_port, openmetrics=True)
    # A strict OpenMetrics parser accepts it (unique family names, exemplar sizes, EOF).
    families = {f.name for f in parse_openmetrics(openmetrics)}  # type: ignore[no-untyped-call]
    assert {"zenmux_upstream_retries", "zenmux_generation_upstream_retries"} <= families
    exemplar_lines = [line for line in openmetrics.splitlines() if " # {" in line]
    assert any("generation_id=" in line for line in exemplar_lines)
    assert any(ids[0] in line or any(i in line for i in ids) for line in exemplar_lines)


async def test_probes(tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter) -> None:
    import httpx

    exporter = await start_exporter(make_config(tmp_path, fake_api.url))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{exporter.metrics_port}") as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.get("/nope")).status_code == 404
        stopping = asyncio.create_task(exporter.stop(drain_seconds=0))
        await stopping
