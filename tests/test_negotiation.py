"""Content negotiation for /metrics: prometheus_client's choose_encoder over q-ordered media ranges, gzip by q."""

from __future__ import annotations

import gzip

import pytest
from prometheus_client import CollectorRegistry, Counter

from exporter.endpoints import Endpoints, negotiate, wants_gzip
from exporter.web import Request

PROMETHEUS_3 = ("application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
                "application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,"
                "text/plain;version=0.0.4;q=0.3,*/*;q=0.2")
OM = "application/openmetrics-text; version=1.0.0; charset=utf-8"
TEXT_004 = "text/plain; version=0.0.4; charset=utf-8"


@pytest.mark.parametrize(("accept", "openmetrics", "content_type"), [
    ("", False, TEXT_004),
    ("*/*", False, TEXT_004),
    ("text/plain;version=0.0.4", False, TEXT_004),
    ("text/plain", False, TEXT_004),
    ("text/plain;version=1.0.0", False, "text/plain; version=1.0.0; charset=utf-8; escaping=underscores"),
    ("application/openmetrics-text", True, OM),
    (PROMETHEUS_3, True, OM),
    ("application/openmetrics-text;q=0, text/plain;version=0.0.4", False, TEXT_004),
    ("text/plain;version=0.0.4;q=0.9, application/openmetrics-text;version=1.0.0;q=0.5", False, TEXT_004),
    ("text/plain;version=0.0.4;q=0.1, application/openmetrics-text;version=1.0.0", True, OM),
    ("application/openmetrics-text;q=banana, text/plain", False, TEXT_004),
])
def test_negotiate(accept: str, openmetrics: bool, content_type: str) -> None:
    assert negotiate(accept) == (openmetrics, content_type)


@pytest.mark.parametrize(("accept_encoding", "gzip_it"), [
    ("", False), ("gzip", True), ("gzip;q=0", False), ("gzip; q=0.0", False), ("gzip, deflate", True),
    ("deflate, br", False), ("*", True), ("*;q=0", False), ("gzip;q=0, *", False), ("identity", False),
    ("gzip;q=0.5, identity", False), ("gzip, identity;q=0.5", True), ("GZIP;Q=1", True), ("x-gzip", True),
])
def test_wants_gzip(accept_encoding: str, gzip_it: bool) -> None:
    assert wants_gzip(accept_encoding) is gzip_it


async def test_metrics_answers_vary_and_honours_gzip_q_zero() -> None:
    registry = CollectorRegistry()
    Counter("negotiated", "A counter.", registry=registry).inc()
    endpoints = Endpoints(registry, healthy=lambda: None, ready=lambda: None)

    async def get(accept: str, encoding: str) -> tuple[bytes, str, dict[str, str]]:
        response = await endpoints.handle(Request("GET", "/metrics", {}, {"accept": accept,
                                                                          "accept-encoding": encoding}))
        assert response.status == 200
        return response.body, response.content_type, response.headers

    body, content_type, headers = await get("text/plain;version=0.0.4", "gzip;q=0")
    assert content_type == TEXT_004 and "Content-Encoding" not in headers
    assert b"negotiated_total 1.0" in body
    assert set(headers["Vary"].split(", ")) == {"Accept", "Accept-Encoding"}
    body, content_type, headers = await get(PROMETHEUS_3, "gzip")
    assert content_type == OM and headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body).endswith(b"# EOF\n")


async def test_the_probe_handler_serves_only_probes() -> None:
    endpoints = Endpoints(CollectorRegistry(), healthy=lambda: None, ready=lambda: "starting")
    assert (await endpoints.probes(Request("GET", "/healthz", {}, {}))).status == 200
    assert (await endpoints.probes(Request("GET", "/readyz", {}, {}))).status == 503
    assert (await endpoints.probes(Request("GET", "/metrics", {}, {}))).status == 404
