"""The ZenMux API client: one lookup -> a typed result (the records and their parsing are exporter/records.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import urllib.parse
import urllib.request

import httpx

from exporter.clock import Clock, SystemClock
from exporter.config import ZenMuxConfig
from exporter.records import LookupResult, Outcome, classify
from exporter.transport import PooledTransport


class KeyKind(enum.Enum):
    PAY_AS_YOU_GO = "pay_as_you_go"
    SUBSCRIPTION = "subscription"
    MANAGEMENT = "management"


def key_kind(api_key: str) -> KeyKind:
    """Subscription keys get metering only; every other key is expected to see billing fields."""
    if api_key.startswith("sk-ss-"):
        return KeyKind.SUBSCRIPTION
    if api_key.startswith("sk-mg-"):
        return KeyKind.MANAGEMENT
    return KeyKind.PAY_AS_YOU_GO


NO_BODY = httpx.ByteStream(b"")


def environment_proxy(url: str) -> str | None:
    """The proxy the standard *_PROXY/NO_PROXY variables set for `url`, as httpx's trust_env would use it."""
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.netloc):
        return None
    return proxy


class ZenMuxClient:
    """Looks generation ids up over an httpx transport; never raises for a failed lookup.

    Lookups go to the transport directly: httpx's client layer (URL merging, auth and redirect flows,
    cookies, event hooks) was ~0.1 ms of CPU per lookup and does nothing for one fixed GET.
    """

    def __init__(
        self,
        config: ZenMuxConfig,
        api_key: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._config = config
        self._clock = clock or SystemClock()
        self.key_kind = key_kind(api_key)
        self._url = config.base_url.rstrip("/") + config.generation_path + "?id="
        # The request is built with an explicit (empty) stream, so httpx adds no headers of its own: Host is
        # set here, once, instead of being worked out from the URL on every lookup.
        self._headers = httpx.Headers(
            {
                "Host": httpx.URL(self._url).netloc.decode("ascii"),
                "Accept": "*/*",
                "Accept-Encoding": "gzip, deflate",
                "Authorization": f"Bearer {api_key}",
                "User-Agent": "zenmux-exporter",
            }
        )
        timeout = httpx.Timeout(config.timeout_seconds, connect=config.connect_timeout_seconds)
        self._extensions = {"timeout": timeout.as_dict()}
        if transport is None:
            ssl_context = httpx.create_ssl_context()  # SSL_CERT_FILE/DIR honoured, as httpx does
            proxy = environment_proxy(self._url)
            limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
            transport = (
                PooledTransport(ssl_context=ssl_context, max_connections=config.concurrency)
                if proxy is None
                else httpx.AsyncHTTPTransport(verify=ssl_context, proxy=proxy, limits=limits)
            )
        self._transport = transport

    @property
    def billing_expected(self) -> bool:
        return self.key_kind is not KeyKind.SUBSCRIPTION

    async def lookup(self, generation_id: str) -> LookupResult:
        # httpx's read timeout is per read: a body dripping in holds the slot far longer. This bounds the whole.
        try:
            async with asyncio.timeout(self._config.timeout_seconds):
                result = await self._exchange(generation_id)
        except TimeoutError:
            return LookupResult(Outcome.TIMEOUT, detail="lookup took longer than timeout_seconds")
        record = result.record
        if record is not None and record.generation_id and record.generation_id != generation_id:
            return dataclasses.replace(
                result, outcome=Outcome.MALFORMED, record=None, detail="record is for another generation"
            )
        return result

    async def _exchange(self, generation_id: str) -> LookupResult:
        request = httpx.Request(
            "GET",
            self._url + urllib.parse.quote(generation_id, safe=""),
            headers=self._headers,
            stream=NO_BODY,
            extensions=self._extensions,
        )
        try:
            response = await self._transport.handle_async_request(request)
            try:
                headers = {k.lower(): v for k, v in response.headers.items()}
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > self._config.max_response_bytes:
                        return LookupResult(
                            Outcome.TOO_LARGE,
                            response.status_code,
                            headers.get("x-zenmux-requestid"),
                            detail=f"body over {self._config.max_response_bytes} bytes",
                        )
            finally:
                await response.aclose()
        except httpx.TimeoutException as err:
            return LookupResult(Outcome.TIMEOUT, detail=type(err).__name__)
        except (httpx.TransportError, httpx.DecodingError) as err:
            return LookupResult(Outcome.CONNECTION_ERROR, detail=type(err).__name__)
        return classify(response.status_code, bytes(body), headers, self.billing_expected, self._clock.time())

    async def aclose(self) -> None:
        await self._transport.aclose()
