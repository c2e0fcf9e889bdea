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
VARY = "Accept, Accept-Encoding"
PROBE_PATHS = frozenset({"/healthz", "/readyz"})
_SERVED = frozenset({"application/openmetrics-text", "text/plain", "text/*", "*/*"})


def _weighted(header: str) -> list[tuple[str, float]]:
    """An Accept or Accept-Encoding header's members with their q (RFC 9110 12.4.2), best first, q=0 dropped;
    equal q keeps the header's order. A q that does not parse counts as 0 (not acceptable)."""
    members: list[tuple[str, float]] = []
    for member in header.split(","):
        value, *params = member.split(";")
        quality = 1.0
        for param in params:
            name, _, raw = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(raw.strip())
                except ValueError:
                    quality = 0.0
                if not 0.0 <= quality <= 1.0:
                    quality = 0.0
        kept = ";".join([value, *(p for p in params if p.partition("=")[0].strip().lower() != "q")]).strip()
        if value.strip() and quality > 0:
            members.append((kept, quality))
    return sorted(members, key=lambda member: -member[1])


def negotiate(accept: str) -> tuple[bool, str]:
    """(OpenMetrics?, Content-Type) as prometheus_client's choose_encoder picks them for the Accept header's
    best media range we serve (choose_encoder alone ignores q and passes over text 0.0.4 for a later
    OpenMetrics: a scraper that prefers 0.0.4 would get OpenMetrics)."""
    chosen = ""
    for media, _ in _weighted(accept):
        if media.split(";")[0].strip().lower() in _SERVED:
            chosen = media
            break
    _, content_type = text_format.choose_encoder(chosen)
    if content_type.startswith("application/openmetrics-text"):
        # The ledger renders OpenMetrics 1.0.0; a scraper asking for a later version is told what it gets.
        return True, openmetrics.CONTENT_TYPE_LATEST
    return False, content_type


def wants_gzip(accept_encoding: str) -> bool:
    """gzip when its q (named, or through `*`) is above 0 and not below identity's; `gzip;q=0` is identity."""
    qualities = {coding.lower(): quality for coding, quality in _weighted(accept_encoding)}
    named = {coding.split(";")[0].strip().lower() for coding in accept_encoding.split(",")}
    gzip_q = qualities.get("gzip", qualities.get("x-gzip", 0.0 if {"gzip", "x-gzip"} & named else
                                                 qualities.get("*", 0.0)))
    identity_q = qualities.get("identity", 0.0 if "identity" in named else qualities.get("*", 1.0) or 1.0)
    return gzip_q > 0 and gzip_q >= identity_q


def render(
    registry: CollectorRegistry, accept: str, ledger: LedgerExposition | None = None
) -> tuple[bytes, str]:
    """The exposition in the format the scraper asked for; exemplars only exist in OpenMetrics.

    The registry's collectors go through prometheus_client; the ledger (when given) through its incremental
    renderer, which yields the same bytes prometheus_client would for its metric families (the text format's
    0.0.4 and 1.0.0 differ only in how they escape names that are not legacy names: ours all are)."""
    is_openmetrics, content_type = negotiate(accept)
    if is_openmetrics:
        own = openmetrics.generate_latest(registry)  # type: ignore[no-untyped-call]
        if ledger is None:
            return own, content_type
        assert own.endswith(EOF_LINE)
        body = b"".join([own[: -len(EOF_LINE)], *ledger.parts(openmetrics=True), EOF_LINE])
        return body, content_type
    own = text_format.generate_latest(registry)
    if ledger is None:
        return own, content_type
    return b"".join([own, *ledger.parts(openmetrics=False)]), content_type


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
    is_openmetrics, content_type = negotiate(accept)
    if is_openmetrics:
        own = openmetrics.generate_latest(registry)  # type: ignore[no-untyped-call]
        assert own.endswith(EOF_LINE)
        head, tail = own[: -len(EOF_LINE)], EOF_LINE
        fragments, checksum = ledger.compressed(openmetrics=True)
    else:
        head, tail = text_format.generate_latest(registry), b""
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
        compress = wants_gzip(request.header("accept-encoding"))
        body, content_type = await asyncio.to_thread(
            _body, self._registry, request.header("accept"), self._ledger if self._leading() else None, compress
        )
        headers = {"Content-Encoding": "gzip", "Vary": VARY} if compress else {"Vary": VARY}
        return Response(200, body, content_type, headers)

    async def probes(self, request: Request) -> Response:
        """Only /healthz and /readyz: the plain probe listener (metrics.probe_listen) serves nothing else."""
        if request.path not in PROBE_PATHS:
            return text(404, "not found\n")
        return await self.handle(request)


def _probe(problem: str | None) -> Response:
    return text(200, "ok\n") if problem is None else text(503, problem + "\n")
