"""The exporter's HTTP surface: /metrics (text or OpenMetrics), /healthz, /readyz."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client import exposition as text_format
from prometheus_client.openmetrics import exposition as openmetrics

from exporter.exposition import LedgerExposition
from exporter.gzipcache import Fragment, gzip_member
from exporter.web import Request, Response, text

INDEX = b"""<html><head><title>zenmux-exporter</title></head><body><h1>zenmux-exporter</h1>
<p><a href="/metrics">/metrics</a> &middot; <a href="/healthz">/healthz</a> &middot; <a href="/readyz">/readyz</a></p>
</body></html>"""


EOF_LINE = b"# EOF\n"


def render(
    registry: CollectorRegistry, accept: str, ledger: LedgerExposition | None = None
) -> tuple[bytes, str]:
    """The exposition in the format the scraper asked for; exemplars only exist in OpenMetrics.

    The registry's collectors go through prometheus_client; the ledger (when given) through its incremental
    renderer, which yields the same bytes prometheus_client would for its metric families."""
    if "application/openmetrics-text" in accept:
        own = openmetrics.generate_latest(registry)  # type: ignore[no-untyped-call]
        if ledger is None:
            return own, openmetrics.CONTENT_TYPE_LATEST
        assert own.endswith(EOF_LINE)
        body = b"".join([own[: -len(EOF_LINE)], *ledger.parts(openmetrics=True), EOF_LINE])
        return body, openmetrics.CONTENT_TYPE_LATEST
    own = text_format.generate_latest(registry)
    if ledger is None:
        return own, text_format.CONTENT_TYPE_LATEST
    return b"".join([own, *ledger.parts(openmetrics=False)]), text_format.CONTENT_TYPE_LATEST


def _body(
    registry: CollectorRegistry, accept: str, ledger: LedgerExposition | None, compress: bool
) -> tuple[bytes, str]:
    if compress and ledger is not None:
        return _gzip_body(registry, accept, ledger)
    body, content_type = render(registry, accept, ledger)
    if compress:
        # zlib releases the GIL while it compresses: the event loop (UDP, lookups) keeps running.
        body = gzip.compress(body, compresslevel=1)
    return body, content_type


def _gzip_body(registry: CollectorRegistry, accept: str, ledger: LedgerExposition) -> tuple[bytes, str]:
    """The same bytes as render(), gzipped: only the self-metrics are compressed here; the ledger's part is
    its cached deflate fragments, spliced into one gzip member (a 59 MB body costs ~1 ms, not ~100 ms)."""
    if "application/openmetrics-text" in accept:
        own = openmetrics.generate_latest(registry)  # type: ignore[no-untyped-call]
        assert own.endswith(EOF_LINE)
        head, tail, content_type = own[: -len(EOF_LINE)], EOF_LINE, openmetrics.CONTENT_TYPE_LATEST
        fragments, checksum = ledger.compressed(openmetrics=True)
    else:
        head, tail, content_type = text_format.generate_latest(registry), b"", text_format.CONTENT_TYPE_LATEST
        fragments, checksum = ledger.compressed(openmetrics=False)
    first, last = Fragment.of(head), Fragment.of(tail, last=True)
    checksum = first.checksum.then(checksum).then(last.checksum)
    return gzip_member([first.data, *fragments, last.data], checksum), content_type


class Endpoints:
    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        healthy: Callable[[], str | None],
        ready: Callable[[], str | None],
        ledger: LedgerExposition | None = None,
        leading: Callable[[], bool] = lambda: True,
    ) -> None:
        """`healthy` and `ready` return None when fine, or the reason they are not. `ledger`, when given, is
        rendered after the registry's collectors (which must then not include the ledger's collector), while
        `leading` says so (fleet mode: only the leading exposer serves the business series)."""
        self._registry = registry
        self._ledger = ledger
        self._leading = leading
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
        # Rendering and compressing run off the event loop, so a scrape never stalls ingest or lookups.
        compress = "gzip" in request.header("accept-encoding")
        body, content_type = await asyncio.to_thread(
            _body, self._registry, request.header("accept"), self._ledger if self._leading() else None, compress
        )
        headers = {"Content-Encoding": "gzip"} if compress else {}
        return Response(200, body, content_type, headers)


def _probe(problem: str | None) -> Response:
    return text(200, "ok\n") if problem is None else text(503, problem + "\n")
