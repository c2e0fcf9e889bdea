"""Our OTLP span encoding against the official one (the independent peer): the same bytes, field for field."""

from __future__ import annotations

import asyncio
import gzip
import logging

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as official_encode
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import AnyValue

from exporter.otlp import MAX_KEYS_KEPT, OtlpSpanExporter, encode_spans
from exporter.web import HttpServer, Request, Response


def finished(
    resource: Resource | None = None, limits: SpanLimits | None = None
) -> tuple[trace.Tracer, InMemorySpanExporter, TracerProvider]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=resource or Resource.create({"service.name": "test"}), span_limits=limits)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return provider.get_tracer("exporter.resolver"), memory, provider


def assert_same(spans: list[ReadableSpan]) -> ExportTraceServiceRequest:
    """Our bytes are the official encoder's, and decode to the same message."""
    expected = official_encode(spans)
    ours = encode_spans(spans)
    decoded = ExportTraceServiceRequest()
    decoded.ParseFromString(ours)
    assert decoded == expected
    assert ours == expected.SerializeToString()
    return decoded


def test_the_lookup_span_every_outcome() -> None:
    tracer, memory, _ = finished()
    for attempt, (outcome, status) in enumerate([("resolved", 200), ("not_ready", 404), ("server_error", 503)]):
        with tracer.start_span(
            "zenmux.generation.lookup",
            kind=SpanKind.CLIENT,
            attributes={"zenmux.generation.id": f"gen-{attempt}", "zenmux.attempt": attempt + 1, "zenmux.source": "a"},
            record_exception=True,
        ) as span:
            span.set_attributes({"zenmux.outcome": outcome, "http.response.status_code": status,
                                 "zenmux.request_id": "sim-1", "gen_ai.request.model": "openai/gpt-4o",
                                 "zenmux.protocol": "chat.completions"})
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR, f"{outcome}: HTTP {status}"))
    decoded = assert_same(list(memory.get_finished_spans()))
    spans = decoded.resource_spans[0].scope_spans[0].spans
    assert [s.status.code for s in spans] == [0, 0, 2]
    assert spans[2].status.message == "server_error: HTTP 503"
    assert spans[0].kind == 3  # SPAN_KIND_CLIENT
    assert {a.key: a.value.int_value for a in spans[1].attributes}["http.response.status_code"] == 404


def test_every_attribute_type_and_edge_value() -> None:
    tracer, memory, _ = finished()
    values: dict[str, AnyValue] = {
        "empty": "",
        "ascii": "x",
        "non-ascii é ü 日本 🙂": "é ü 日本 🙂",
        "large": "z" * 200_000,
        "length 127": "a" * 127,
        "length 128": "a" * 128,
        "true": True,
        "false": False,
        "zero": 0,
        "small": 127,
        "varint two bytes": 128,
        "negative": -1,
        "int64 max": 2**63 - 1,
        "int64 min": -(2**63),
        "float": 1.5,
        "float zero": 0.0,
        "float negative": -2.25e300,
        "strings": ("a", "", "é"),
        "ints": (1, -1, 2**40),
        "floats": (0.5, -0.0),
        "bools": (True, False),
        "empty sequence": (),
    }
    with tracer.start_span("attributes", attributes=values):
        pass
    with tracer.start_span(""):  # an empty name
        pass
    with tracer.start_span("no attributes"):
        pass
    decoded = assert_same(list(memory.get_finished_spans()))
    attributes = decoded.resource_spans[0].scope_spans[0].spans[0].attributes
    assert len(attributes) == len(values)
    by_key = {a.key: a.value for a in attributes}
    assert by_key["non-ascii é ü 日本 🙂"].string_value == "é ü 日本 🙂"
    assert by_key["int64 min"].int_value == -(2**63)
    assert by_key["false"].HasField("bool_value")


def test_events_exceptions_links_parents_and_trace_state() -> None:
    tracer, memory, _ = finished()
    remote = SpanContext(
        trace_id=0x1234, span_id=0x5678, is_remote=True, trace_flags=TraceFlags(1),
        trace_state=TraceState([("vendor", "value"), ("other", "x")]),
    )
    parent_context = trace.set_span_in_context(NonRecordingSpan(remote))
    with tracer.start_as_current_span("parent", context=parent_context) as parent:
        links = [Link(parent.get_span_context(), {"link.attr": 1}), Link(remote)]
        child = tracer.start_span("child", kind=SpanKind.SERVER, links=links)
        child.add_event("event", {"event.attr": "é"}, timestamp=1_700_000_000_000_000_001)
        child.add_event("bare")
        child.set_status(Status(StatusCode.OK))
        child.end()
    with pytest.raises(ValueError), tracer.start_span("failing", kind=SpanKind.PRODUCER):
        raise ValueError("went wrong: ü")
    with tracer.start_span("consumer", kind=SpanKind.CONSUMER):
        pass
    decoded = assert_same(list(memory.get_finished_spans()))
    spans = {s.name: s for s in decoded.resource_spans[0].scope_spans[0].spans}
    assert spans["parent"].parent_span_id == (0x5678).to_bytes(8, "big")
    assert spans["parent"].trace_state == "vendor=value,other=x"
    assert spans["parent"].flags == 0x300  # the parent is remote, and that is known
    assert spans["child"].parent_span_id == spans["parent"].span_id
    assert spans["child"].flags == 0x100
    assert len(spans["child"].links) == 2 and len(spans["child"].events) == 2
    assert spans["failing"].events[0].name == "exception"


def test_resources_scopes_and_dropped_counts() -> None:
    limits = SpanLimits(max_span_attributes=2, max_events=1, max_links=1)
    resource = Resource.create({"service.name": "one", "service.version": "1.2"}, schema_url="https://schema/1")
    tracer, memory, provider = finished(resource, limits)
    scoped = provider.get_tracer("other.scope", "3.4", schema_url="https://schema/2", attributes={"scope.attr": 5})
    other_tracer, other_memory, _ = finished(Resource.create({"service.name": "two"}))
    context = SpanContext(trace_id=1, span_id=2, is_remote=False)
    with tracer.start_span("limited", attributes={"a": 1, "b": 2, "c": 3}, links=[Link(context), Link(context)]) as s:
        s.add_event("one")
        s.add_event("two")
    with scoped.start_span("scoped"):
        pass
    with tracer.start_span("back to the first scope"):
        pass
    with other_tracer.start_span("another resource"):
        pass
    spans = [*memory.get_finished_spans(), *other_memory.get_finished_spans()]
    decoded = assert_same(spans)
    assert len(decoded.resource_spans) == 2
    assert [len(s.spans) for s in decoded.resource_spans[0].scope_spans] == [2, 1]
    limited = decoded.resource_spans[0].scope_spans[0].spans[0]
    assert (limited.dropped_attributes_count, limited.dropped_events_count, limited.dropped_links_count) == (1, 1, 1)
    # Spans of interleaved scopes and resources are grouped as the official encoder groups them.
    assert_same([spans[0], spans[3], spans[1], spans[2], spans[3]])
    assert encode_spans([]) == official_encode([]).SerializeToString() == b""


def test_what_utf_8_or_int64_cannot_carry(caplog: pytest.LogCaptureFixture) -> None:
    tracer, memory, _ = finished()
    with tracer.start_span("lone \ud800 surrogate", attributes={"key": "value \udc00", "huge": 2**64, "kept": 1}):
        pass
    with caplog.at_level(logging.ERROR, logger="exporter.otlp"):
        ours = encode_spans(list(memory.get_finished_spans()))
    decoded = ExportTraceServiceRequest()
    decoded.ParseFromString(ours)
    span = decoded.resource_spans[0].scope_spans[0].spans[0]
    assert span.name == "lone \ufffd surrogate"  # replaced, not the whole batch failed
    assert {a.key: a.value.WhichOneof("value") for a in span.attributes} == {"key": "string_value", "kept": "int_value"}
    assert {a.key: a.value.string_value for a in span.attributes}["key"] == "value \ufffd"
    assert "huge" in caplog.text


def test_kept_keys_are_bounded() -> None:
    tracer, memory, _ = finished()
    with tracer.start_span("many keys", attributes={f"key.{n}": n for n in range(100)}):
        pass
    keys: dict[str, bytes] = {}
    spans = list(memory.get_finished_spans())
    for _ in range(MAX_KEYS_KEPT // 100 + 2):
        assert encode_spans(spans, keys) == official_encode(spans).SerializeToString()
        spans = [*spans, spans[0]]
    resource_keys = len(spans[0].resource.attributes)
    assert len(keys) == 100 + resource_keys
    tracer, memory, _ = finished(limits=SpanLimits(max_span_attributes=MAX_KEYS_KEPT + 10))
    with tracer.start_span("more keys", attributes={f"k{n}": n for n in range(MAX_KEYS_KEPT + 10)}):
        pass
    spans = list(memory.get_finished_spans())
    assert encode_spans(spans, keys) == official_encode(spans).SerializeToString()
    assert len(keys) == MAX_KEYS_KEPT


async def test_the_exporter_posts_through_the_official_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """Endpoint, headers, compression and retries come from the OTEL_* variables, as the official exporter's."""
    received: list[Request] = []
    answers = [503, 200]

    async def collector(request: Request) -> Response:
        received.append(request)
        return Response(answers.pop(0), b"", "application/x-protobuf")

    server = HttpServer(collector, "127.0.0.1", 0)
    await server.start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://127.0.0.1:{server.port}/v1/traces")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-tenant=zen%20mux")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip")
        exporter = OtlpSpanExporter()
        assert exporter.encodes  # the installed exporter has the parts this one relies on
        tracer, memory, _ = finished()
        with tracer.start_span("exported", attributes={"zenmux.generation.id": "gen-1"}):
            pass
        spans = list(memory.get_finished_spans())
        assert await asyncio.to_thread(exporter.export, spans) is SpanExportResult.SUCCESS
        assert len(received) == 2  # the 503 was retried
        request = received[-1]
        assert (request.method, request.path) == ("POST", "/v1/traces")
        assert request.header("x-tenant") == "zen mux"
        assert request.header("content-encoding") == "gzip"
        assert request.header("content-type") == "application/x-protobuf"
        assert gzip.decompress(request.body) == official_encode(spans).SerializeToString()
        exporter.shutdown()  # type: ignore[no-untyped-call]
        assert exporter.export(spans) is SpanExportResult.FAILURE
    finally:
        await server.close()
