"""The demo traffic generator: creates generations on a (simulated) ZenMux and reports their ids by log or UDP."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from random import Random

import httpx

from exporter.simulate.api import CREATE_PATH

log = logging.getLogger(__name__)

DEFAULT_FEATURES = ("chat", "search", "summarize")
# Past this much lateness the generator stops catching up, like a real app that simply served fewer requests.
MAX_BACKLOG_SECONDS = 1.0


class _AppLog:
    """Appends one JSON line per write; reopens when the path is rotated away, like WatchedFileHandler."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - lives as long as the generator
        self._ident = os.fstat(self._file.fileno())[1:3]

    def write(self, line: bytes) -> None:
        try:
            ident = os.stat(self._path)[1:3]
        except FileNotFoundError:
            ident = None
        if ident != self._ident:
            self._file.close()
            self._file = open(self._path, "ab", buffering=0)  # noqa: SIM115
            self._ident = os.fstat(self._file.fileno())[1:3]
        # Unbuffered + O_APPEND: the whole line lands in one write(2), so a tailer never sees half of it.
        self._file.write(line)

    def close(self) -> None:
        self._file.close()


def log_line(rng: Random, generation_id: str, model: str, feature: str, total_tokens: int) -> bytes:
    """One application log line (~250 bytes) announcing a generation id among ordinary noise fields."""
    now = datetime.now(UTC)
    entry = {
        "ts": now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z",
        "level": "info",
        "msg": "llm call completed",
        "generation_id": generation_id,
        "model": model,
        "feature": feature,
        "user_id": f"u_{rng.randrange(1, 50_000):05d}",
        "tokens": total_tokens,
        "duration_ms": rng.randrange(180, 9000),
        "status": 200,
    }
    # Default separators: what json.dumps-based app loggers actually write ("key": "value").
    return json.dumps(entry).encode() + b"\n"


def _total_tokens(usage: object) -> int:
    # The inline usage comes in the protocol's own shape; Anthropic's has no total.
    if not isinstance(usage, dict):
        return 0
    for name in ("total_tokens", "totalTokenCount"):
        if isinstance(usage.get(name), int):
            return int(usage[name])
    parts = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens", "output_tokens")
    return sum(v for v in (usage.get(p) for p in parts) if isinstance(v, int))


async def generate_traffic(
    api_url: str,
    api_key: str,
    *,
    rate_per_second: float,
    stop: asyncio.Event,
    log_path: Path | None,
    udp_target: tuple[str, int] | None,
    count: int | None = None,
    features: Sequence[str] = DEFAULT_FEATURES,
    client: httpx.AsyncClient | None = None,
    rng: Random | None = None,
) -> list[str]:
    """Create generations at rate_per_second until stop is set or count ids exist; return the ids.

    Each id goes to exactly one output: with both a log and a UDP target they alternate (log first), so the
    exporter's totals can be compared exactly with the API's. Failed creates are logged and skipped.
    """
    if not rate_per_second > 0:
        raise ValueError("rate_per_second must be > 0")
    if not features:
        raise ValueError("features must not be empty")
    rng = rng if rng is not None else Random()
    url = api_url.rstrip("/") + CREATE_PATH
    headers = {"Authorization": f"Bearer {api_key}"}
    own_client = client is None
    http = client if client is not None else httpx.AsyncClient(timeout=10.0)
    app_log = _AppLog(log_path) if log_path is not None else None
    sock: socket.socket | None = None
    udp_addr: tuple[str, int] | None = None
    loop = asyncio.get_running_loop()
    if udp_target is not None:
        infos = await loop.getaddrinfo(udp_target[0], udp_target[1], type=socket.SOCK_DGRAM)
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        udp_addr = (str(sockaddr[0]), int(sockaddr[1]))
    ids: list[str] = []
    failures = 0
    start = loop.time()
    sent = 0
    try:
        while not stop.is_set() and (count is None or len(ids) < count):
            delay = start + sent / rate_per_second - loop.time()
            if delay < -MAX_BACKLOG_SECONDS:
                start = loop.time() - sent / rate_per_second
            elif delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    break
                except TimeoutError:
                    pass
            sent += 1
            feature = rng.choice(features)
            try:
                response = await http.post(url, headers=headers, json={})
                if response.status_code != 200:
                    raise httpx.HTTPStatusError(
                        f"status {response.status_code}", request=response.request, response=response
                    )
                created = response.json()
                generation_id = str(created["id"])
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                failures += 1
                if failures == 1 or failures % 100 == 0:
                    log.warning("traffic: creating a generation failed (%d so far): %s", failures, exc)
                continue
            to_log = app_log is not None and (sock is None or len(ids) % 2 == 0)
            if to_log:
                assert app_log is not None
                tokens = _total_tokens(created.get("usage"))
                app_log.write(log_line(rng, generation_id, str(created.get("model")), feature, tokens))
            elif sock is not None and udp_addr is not None:
                await loop.sock_sendto(sock, generation_id.encode(), udp_addr)
            ids.append(generation_id)
    finally:
        if app_log is not None:
            app_log.close()
        if sock is not None:
            sock.close()
        if own_client:
            await http.aclose()
    return ids
