"""The exporter's HTTP surface: /metrics (text or OpenMetrics), /healthz, /readyz."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client import exposition as text_format
from prometheus_client.openmetrics import exposition as openmetrics

from exporter.web import Request, Response, text

INDEX = b"""<html><head><title>zenmux-exporter</title></head><body><h1>zenmux-exporter</h1>
<p><a href="/metrics">/metrics</a> &middot; <a href="/healthz">/healthz</a> &middot; <a href="/readyz">/readyz</a></p>
</body></html>"""


def render(registry: CollectorRegistry, accept: str) -> tuple[bytes, str]:
    """The exposition in the format the scraper asked for; exemplars only exist in OpenMetrics."""
    if "application/openmetrics-text" in accept:
        return openmetrics.generate_latest(registry), openmetrics.CONTENT_TYPE_LATEST  # type: ignore[no-untyped-call]
    return text_format.generate_latest(registry), text_format.CONTENT_TYPE_LATEST


class Endpoints:
    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        healthy: Callable[[], str | None],
        ready: Callable[[], str | None],
    ) -> None:
        """`healthy` and `ready` return None when fine, or the reason they are not."""
        self._registry = registry
        self._healthy = healthy
        self._ready = ready

    async def handle(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return Response(405, b"method not allowed\n", headers={"Allow": "GET, HEAD"})
        if request.path == "/metrics":
            return await self._metrics(request)
        if request.path == "/healthz":
            return _probe(self._healthy())
        if request.path == "/readyz":
            return _probe(self._ready())
        if request.path == "/":
            return Response(200, INDEX, "text/html; charset=utf-8")
        return text(404, "not found\n")

    async def _metrics(self, request: Request) -> Response:
        # Rendering walks every series: off the event loop, so a scrape never stalls ingest or lookups.
        body, content_type = await asyncio.to_thread(render, self._registry, request.header("accept"))
        headers = {}
        if "gzip" in request.header("accept-encoding"):
            body = gzip.compress(body, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
        return Response(200, body, content_type, headers)


def _probe(problem: str | None) -> Response:
    return text(200, "ok\n") if problem is None else text(503, problem + "\n")
