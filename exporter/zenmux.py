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
from exporter.redact import Redactor
from exporter.transport import BodyEncodingError, BodyTooLarge, PooledTransport, read_bounded


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
        self._redact = Redactor([api_key])
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
            proxy = environment_proxy(self._url)
            limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
            transport = (
                # SSL_CERT_FILE/DIR honoured, as httpx does; made at the first TLS connection
                PooledTransport(ssl_context=httpx.create_ssl_context, max_connections=config.concurrency)
                if proxy is None
                else httpx.AsyncHTTPTransport(verify=httpx.create_ssl_context(), proxy=proxy, limits=limits)
            )
        self._transport = transport
        # The pool's own GET (no httpx request and response models) when the transport is ours.
        self._pooled = transport if isinstance(transport, PooledTransport) else None
        url = httpx.URL(self._url)
        self._origin = (url.raw_scheme, url.raw_host, url.port or (443 if url.scheme == "https" else 80))
        self._target = url.raw_path
        self._raw_headers = list(self._headers.raw)
        # The pool's GET is bounded as a whole by `lookup`'s timeout_seconds, which starts first and so always ends
        # before a read or write timeout of the same length would: they are left out (no timer per read).
        self._timeouts: dict[str, float | None] = {**timeout.as_dict(), "read": None, "write": None}

    @property
    def billing_expected(self) -> bool:
        return self.key_kind is not KeyKind.SUBSCRIPTION

    async def lookup(self, generation_id: str) -> LookupResult:
        """Never raises (but CancelledError): whatever goes wrong is an outcome, which the resolver backs off."""
        # httpx's read timeout is per read: a body dripping in holds the slot far longer. This bounds the whole.
        try:
            async with asyncio.timeout(self._config.timeout_seconds):
                result = await self._exchange(generation_id)
        except TimeoutError:
            return LookupResult(Outcome.TIMEOUT, detail="lookup took longer than timeout_seconds")
        except MemoryError:
            return LookupResult(Outcome.TOO_LARGE, detail="out of memory reading the response")
        except Exception as err:  # a bug or a peer nothing foresaw: counted and retried later, not a tight loop
            return LookupResult(Outcome.CONNECTION_ERROR, detail=f"unexpected {type(err).__name__}")
        record = result.record
        if record is not None and record.generation_id and record.generation_id != generation_id:
            return dataclasses.replace(
                result, outcome=Outcome.MALFORMED, record=None, detail="record is for another generation"
            )
        return self._scrubbed(result)

    def _scrubbed(self, result: LookupResult) -> LookupResult:
        """What the API echoes (request id, error text, record strings that become labels) without the key."""
        redact = self._redact
        record = result.record
        texts = [result.request_id or "", result.detail]
        if record is not None:
            texts += [record.model, record.protocol, record.finish_reason]
            texts += [item.code for item in record.billing.fee_items] if record.billing else []
        if not redact.found_in("\0".join(texts)):
            return result
        if record is not None:
            billing = record.billing
            if billing is not None:
                items = tuple(dataclasses.replace(item, code=redact(item.code)) for item in billing.fee_items)
                billing = dataclasses.replace(billing, fee_items=items)
            record = dataclasses.replace(record, model=redact(record.model), protocol=redact(record.protocol),
                                         finish_reason=redact(record.finish_reason), billing=billing)
        request_id = None if result.request_id is None else redact(result.request_id)[:128]
        return dataclasses.replace(result, request_id=request_id, detail=redact(result.detail), record=record)

    async def _exchange(self, generation_id: str) -> LookupResult:
        if self._pooled is not None:
            return await self._get(self._pooled, generation_id)
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
                # Bounded in decoded bytes: httpx's decoders inflate a whole chunk at once (a gzip bomb's
                # 2 KB become gigabytes in one call).
                body = await read_bounded(response, self._config.max_response_bytes)
            except BodyTooLarge:
                return LookupResult(
                    Outcome.TOO_LARGE,
                    response.status_code,
                    headers.get("x-zenmux-requestid"),
                    detail=f"body over {self._config.max_response_bytes} bytes (decoded)",
                )
            except BodyEncodingError as err:
                return LookupResult(
                    Outcome.MALFORMED, response.status_code, headers.get("x-zenmux-requestid"), detail=str(err)
                )
            finally:
                await response.aclose()
        except httpx.TimeoutException as err:
            return LookupResult(Outcome.TIMEOUT, detail=type(err).__name__)
        except (httpx.TransportError, httpx.DecodingError) as err:
            return LookupResult(Outcome.CONNECTION_ERROR, detail=type(err).__name__)
        return classify(response.status_code, body, headers, self.billing_expected, self._clock.time())

    async def _get(self, pool: PooledTransport, generation_id: str) -> LookupResult:
        """`_exchange` on the pool's own GET: the same request, bounds and outcomes."""
        limit = self._config.max_response_bytes
        target = self._target + urllib.parse.quote(generation_id, safe="").encode("ascii")
        try:
            answer = await pool.get(self._origin, target, self._raw_headers, self._timeouts, limit)
        except httpx.TimeoutException as err:
            return LookupResult(Outcome.TIMEOUT, detail=type(err).__name__)
        except httpx.TransportError as err:
            return LookupResult(Outcome.CONNECTION_ERROR, detail=type(err).__name__)
        headers = answer.headers
        if isinstance(answer.problem, BodyTooLarge):
            return LookupResult(
                Outcome.TOO_LARGE,
                answer.status,
                headers.get("x-zenmux-requestid"),
                detail=f"body over {limit} bytes (decoded)",
            )
        if answer.problem is not None:
            return LookupResult(
                Outcome.MALFORMED, answer.status, headers.get("x-zenmux-requestid"), detail=str(answer.problem)
            )
        return classify(answer.status, answer.body, headers, self.billing_expected, self._clock.time())

    async def aclose(self) -> None:
        await self._transport.aclose()
