"""One span per lookup attempt, with the attributes an on-call engineer needs; OTLP/HTTP really delivers them."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.trace import StatusCode

from exporter.config import TracingConfig
from exporter.resolver import exemplar_labels
from exporter.simulate.api import Faults
from exporter.telemetry import tracer_provider
from exporter.web import HttpServer, Request, Response
from tests.support import (
    PAYG_KEY,
    FakeApi,
    Spans,
    StartExporter,
    append_lines,
    json_line,
    make_config,
    openmetrics_families,
    scrape,
    value,
    wait_until,
)


async def test_one_span_per_attempt_with_attributes(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    fake_api.sim.configure(dataclasses.replace(fake_api.sim.config, billing_delay_seconds=0.4))
    spans = Spans()
    config = make_config(tmp_path, fake_api.url, resolve={"billing_delay_seconds": 0})
    exporter = await start_exporter(config, tracing=spans.provider())
    generation_id = fake_api.create()
    append_lines(tmp_path / "app.log", [json_line(generation_id)])

    async def resolved() -> bool:
        return value(await scrape(exporter.metrics_port), "zenmux_generations_total") == 1

    await wait_until(resolved, what="the generation resolved")
    finished = [s for s in spans.exporter.get_finished_spans() if s.name == "zenmux.generation.lookup"]
    text = await scrape(exporter.metrics_port)
    assert len(finished) == value(text, "zenmux_exporter_lookups_total") >= 2
    attempts = sorted(finished, key=lambda s: int(str((s.attributes or {}).get("zenmux.attempt", 0))))
    for number, span in enumerate(attempts, start=1):
        attributes = dict(span.attributes or {})
        assert attributes["zenmux.generation.id"] == generation_id
        assert attributes["zenmux.attempt"] == number
        assert str(attributes["zenmux.request_id"]).startswith("sim-")
        assert PAYG_KEY not in repr(attributes)
    first, last = attempts[0], attempts[-1]
    assert first.attributes is not None and first.attributes["zenmux.outcome"] == "not_ready"
    assert first.attributes["http.response.status_code"] == 404
    assert last.attributes is not None and last.attributes["zenmux.outcome"] == "resolved"
    record = fake_api.sim.record(generation_id)
    assert record is not None
    assert last.attributes["gen_ai.request.model"] == record["model"]
    assert last.attributes["zenmux.protocol"] == record["api"]
    # The resolved generation's exemplar points at its trace.
    openmetrics = await scrape(exporter.metrics_port, openmetrics=True)
    assert f'trace_id="{format(last.context.trace_id, "032x")}"' in openmetrics


async def test_lookup_durations_carry_exemplars_of_their_attempts(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    """The health dashboard's "Lookup duration" panel shows exemplars: each bucket's links to an attempt's span."""
    spans = Spans()
    exporter = await start_exporter(make_config(tmp_path, fake_api.url), tracing=spans.provider())
    generation_id = fake_api.create()
    append_lines(tmp_path / "app.log", [json_line(generation_id)])

    async def resolved() -> bool:
        return value(await scrape(exporter.metrics_port), "zenmux_generations_total") == 1

    await wait_until(resolved, what="the generation resolved")
    attempts = {format(s.context.trace_id, "032x"): s for s in spans.exporter.get_finished_spans()
                if s.name == "zenmux.generation.lookup"}
    text = await scrape(exporter.metrics_port, openmetrics=True)
    exemplars = [
        (sample.labels["outcome"], sample.exemplar)
        for family in openmetrics_families(text)
        if family.name == "zenmux_exporter_lookup_duration_seconds"
        for sample in family.samples
        if sample.exemplar is not None
    ]
    assert {outcome for outcome, _ in exemplars} == {"resolved"} | ({"not_ready"} if len(attempts) > 1 else set())
    for outcome, exemplar in exemplars:
        assert exemplar.labels["generation_id"] == generation_id
        span = attempts[exemplar.labels["trace_id"]]
        assert span.attributes is not None and span.attributes["zenmux.outcome"] == outcome


async def test_failed_attempts_are_error_spans(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    fake_api.sim.configure(dataclasses.replace(fake_api.sim.config, faults=Faults(server_error=1.0)))
    spans = Spans()
    exporter = await start_exporter(make_config(tmp_path, fake_api.url), tracing=spans.provider())
    append_lines(tmp_path / "app.log", [json_line(fake_api.create())])

    async def failed() -> bool:
        return value(await scrape(exporter.metrics_port), "zenmux_exporter_lookups_total", outcome="server_error") >= 1

    await wait_until(failed, what="a server error")
    span = spans.exporter.get_finished_spans()[0]
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None and span.attributes["zenmux.outcome"] == "server_error"
    assert int(str(span.attributes["http.response.status_code"])) >= 500


async def test_otlp_http_exporter_delivers_spans(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    received: list[ExportTraceServiceRequest] = []
    arrived = asyncio.Event()

    async def collector(request: Request) -> Response:
        if request.path == "/v1/traces" and request.method == "POST":
            message = ExportTraceServiceRequest()
            message.ParseFromString(request.body)
            received.append(message)
            arrived.set()
        return Response(200, b"", "application/x-protobuf")

    server = HttpServer(collector, "127.0.0.1", 0)
    await server.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://127.0.0.1:{server.port}/v1/traces")
    provider = tracer_provider(TracingConfig(exporter="otlp", service_name="zenmux-exporter-test"))
    exporter = await start_exporter(make_config(tmp_path, fake_api.url), tracing=provider)
    generation_id = fake_api.create()
    append_lines(tmp_path / "app.log", [json_line(generation_id)])

    async def resolved() -> bool:
        return value(await scrape(exporter.metrics_port), "zenmux_generations_total") == 1

    await wait_until(resolved, what="the generation resolved")
    await asyncio.to_thread(provider.force_flush)  # the OTLP exporter posts synchronously
    await asyncio.wait_for(arrived.wait(), 10)
    spans = [
        span
        for message in received
        for resource_spans in message.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    ]
    assert any(span.name == "zenmux.generation.lookup" for span in spans)
    ids = {a.value.string_value for span in spans for a in span.attributes if a.key == "zenmux.generation.id"}
    assert generation_id in ids
    service = {
        a.value.string_value
        for message in received
        for rs in message.resource_spans
        for a in rs.resource.attributes
        if a.key == "service.name"
    }
    assert service == {"zenmux-exporter-test"}
    await server.close()


async def test_a_span_covers_its_whole_lookup(tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter) -> None:
    """The span starts when the request goes out, not when the answer is in (it is made after the answer)."""
    fake_api.sim.configure(dataclasses.replace(fake_api.sim.config, faults=Faults(slow=1.0, slow_seconds=0.3)))
    spans = Spans()
    exporter = await start_exporter(make_config(tmp_path, fake_api.url), tracing=spans.provider())
    append_lines(tmp_path / "app.log", [json_line(fake_api.create())])

    async def looked_up() -> bool:
        return value(await scrape(exporter.metrics_port), "zenmux_exporter_lookups_total") >= 1

    await wait_until(looked_up, what="a lookup")
    span = spans.exporter.get_finished_spans()[0]
    assert span.start_time is not None and span.end_time is not None
    assert span.end_time - span.start_time >= 300_000_000  # the API's 0.3 s delay is inside the span
    assert span.attributes is not None and "zenmux.outcome" in span.attributes


async def test_a_lookup_cancelled_at_shutdown_is_an_error_span(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    """A lookup still running after the shutdown's grace is cancelled: its span records that, and says no outcome."""
    fake_api.sim.configure(dataclasses.replace(fake_api.sim.config, faults=Faults(slow=1.0, slow_seconds=60.0)))
    spans = Spans()
    config = make_config(tmp_path, fake_api.url, zenmux={"timeout_seconds": 120})
    exporter = await start_exporter(config, tracing=spans.provider())
    generation_id = fake_api.create()
    append_lines(tmp_path / "app.log", [json_line(generation_id)])

    async def in_flight() -> bool:
        return value(await scrape(exporter.metrics_port), "zenmux_exporter_inflight_lookups") == 1

    await wait_until(in_flight, what="a lookup in flight")
    await exporter.stop(drain_seconds=0)
    [span] = [s for s in spans.exporter.get_finished_spans() if s.name == "zenmux.generation.lookup"]
    assert span.status.status_code is StatusCode.ERROR
    assert (span.status.description or "").startswith("CancelledError")
    assert [event.name for event in span.events] == ["exception"]
    event_attributes = span.events[0].attributes or {}
    assert str(event_attributes["exception.type"]).endswith("CancelledError")
    assert event_attributes["exception.escaped"] == "True"
    attributes = dict(span.attributes or {})
    assert attributes == {"zenmux.generation.id": generation_id, "zenmux.attempt": 1, "zenmux.source": "app-log"}


def test_exemplar_labels_stay_within_openmetrics_128_characters() -> None:
    trace_id = "ab" * 16
    assert exemplar_labels("gen-1", trace_id) == {"generation_id": "gen-1", "trace_id": trace_id}
    assert exemplar_labels("gen-1", None) == {"generation_id": "gen-1"}
    # 13 + 75 + 8 + 32 = 128: both fit; one more character and the trace id goes first.
    assert exemplar_labels("g" * 75, trace_id) == {"generation_id": "g" * 75, "trace_id": trace_id}
    assert exemplar_labels("g" * 76, trace_id) == {"generation_id": "g" * 76}
    assert exemplar_labels("g" * 115, None) == {"generation_id": "g" * 115}
    assert exemplar_labels("g" * 116, trace_id) == {}
