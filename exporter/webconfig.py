"""The web config file of Prometheus exporters (exporter-toolkit's format): TLS and bcrypt basic auth for /metrics.

    tls_server_config:
      cert_file: /etc/zenmux-exporter/tls.crt
      key_file: /etc/zenmux-exporter/tls.key
      client_ca_file: ""                # optional: verify client certificates against this CA
      client_auth_type: NoClientCert    # or RequireAndVerifyClientCert, VerifyClientCertIfGiven
      min_version: TLS12                # or TLS13
      max_version: TLS13                # or TLS12
    http_server_config:
      headers:                          # added to every response
        X-Content-Type-Options: nosniff
    basic_auth_users:
      prometheus: $2y$10$...            # bcrypt hashes (htpasswd -nBC 10 "" | tr -d ':\\n')

Basic auth guards every path but the probes (/healthz, /readyz), which reveal nothing and which kubelet
calls without credentials. Password checks run off the event loop and a successful check is remembered
(by a hash of user and password) so scrapes do not pay bcrypt's cost each time.

What exporter-toolkit documents and Python's ssl cannot do is refused by name, not approximated:
RequestClientCert and RequireAnyClientCert (a certificate asked for but not verified), inline cert/key/
client_ca, client_allowed_sans, cipher_suites, prefer_server_cipher_suites, curve_preferences, http2: true,
rate_limit. The certificate, key and CA files are read again when one of them changes (checked at most once a
second, on a new connection): cert-manager rotates them in place.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import os
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import yaml

from exporter.config import ConfigError
from exporter.web import Handler, Request, Response

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
CACHE_SIZE = 256
# bcrypt is slow on purpose; a flood of wrong passwords must not take every worker thread (scrapes render
# on the same default executor), so at most this many checks run at once and the rest queue.
CONCURRENT_CHECKS = 2
_TLS_KEYS = {"cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version", "max_version"}
# exporter-toolkit keys this implementation does not have: refused by name rather than ignored.
_TLS_UNSUPPORTED = {"cert", "key", "client_ca", "client_allowed_sans", "cipher_suites",
                    "prefer_server_cipher_suites", "curve_preferences"}
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# Go's crypto/tls asks for (or requires) a certificate it then does not verify; OpenSSL verifies whatever it
# asks for, so these two would mean something else here.
_CLIENT_AUTH_UNSUPPORTED = ("RequestClientCert", "RequireAnyClientCert")
# The kubelet presents no client certificate: these need the plain probe listener (metrics.probe_listen).
CERT_REQUIRED_TYPES = ("RequireAndVerifyClientCert",)
BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
BCRYPT_MAX_PASSWORD_BYTES = 72
_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
# exporter-toolkit's documented response headers (http_server_config.headers).
_HEADERS = ("Content-Security-Policy", "X-Frame-Options", "X-Content-Type-Options", "X-XSS-Protection",
            "Strict-Transport-Security")
RELOAD_CHECK_SECONDS = 1.0


@dataclass(frozen=True)
class TlsSettings:
    cert: Path
    key: Path
    ca: Path | None
    verify_mode: ssl.VerifyMode
    minimum: ssl.TLSVersion
    maximum: ssl.TLSVersion
    client_auth_type: str = "NoClientCert"

    def build(self) -> ssl.SSLContext:
        """A server context from the files as they are now; OSError or ssl.SSLError when they are unusable."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = self.minimum
        context.maximum_version = self.maximum
        context.load_cert_chain(self.cert, self.key)
        if self.ca is not None:
            context.load_verify_locations(self.ca)
            context.verify_mode = self.verify_mode
        return context

    def stamp(self) -> tuple[tuple[int, int, int], ...]:
        """What changes when a file is rewritten or replaced (cert-manager swaps a symlinked directory)."""
        stamps = []
        for path in (self.cert, self.key, self.ca):
            if path is None:
                continue
            try:
                st = os.stat(path)
            except OSError:
                stamps.append((0, 0, 0))
            else:
                stamps.append((st.st_mtime_ns, st.st_ino, st.st_size))
        return tuple(stamps)


class ReloadingContext:
    """The server's SSLContext, built again when a certificate, key or CA file changes.

    Called on each new connection; the files are stat'ed at most once per RELOAD_CHECK_SECONDS. A change
    that does not load (a half-written file) keeps the last good context and is logged, once per change."""

    def __init__(self, settings: TlsSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._stamp = settings.stamp()
        self.context = settings.build()
        self._checked_at = clock()
        self._failed_stamp: tuple[tuple[int, int, int], ...] | None = None
        self.reloads = 0

    def __call__(self) -> ssl.SSLContext:
        now = self._clock()
        if now - self._checked_at >= RELOAD_CHECK_SECONDS:
            self._checked_at = now
            stamp = self.settings.stamp()
            if stamp != self._stamp and stamp != self._failed_stamp:
                try:
                    self.context = self.settings.build()
                except (OSError, ssl.SSLError) as err:
                    self._failed_stamp = stamp
                    log.warning("TLS files changed but do not load (%s); serving the previous certificate",
                                _reason(err))
                else:
                    self._stamp = stamp
                    self.reloads += 1
                    log.info("TLS certificate files changed: reloaded")
        return self.context


@dataclass
class WebConfig:
    """A loaded web config: an SSL context (or None) and the users allowed to read /metrics."""

    ssl_context: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)
    tls: ReloadingContext | None = None
    headers: dict[str, str] = field(default_factory=dict)
    _verified: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    _checks: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(CONCURRENT_CHECKS))
    # Checked against when the user is unknown, at the configured hashes' cost, so a wrong user name takes
    # as long as a wrong password and user names cannot be told apart by timing.
    _dummy_hash: bytes = b""

    @property
    def client_certificate_required(self) -> bool:
        return self.tls is not None and self.tls.settings.client_auth_type in CERT_REQUIRED_TYPES

    def server_tls(self) -> ssl.SSLContext | ReloadingContext | None:
        """What the HTTP server is given: the reloading context when files are known, else a fixed one."""
        return self.tls if self.tls is not None else self.ssl_context

    def __post_init__(self) -> None:
        if self.tls is not None and self.ssl_context is None:
            self.ssl_context = self.tls.context
        if self.users and not self._dummy_hash:
            cost = max(int(hashed.split(b"$")[2]) for hashed in self.users.values())
            self._dummy_hash = bcrypt.hashpw(b"not a password", bcrypt.gensalt(cost))

    def protect(self, handler: Handler) -> Handler:
        """The handler behind basic auth (when users are configured)."""
        if not self.users:
            return handler

        async def guarded(request: Request) -> Response:
            if request.path in OPEN_PATHS or await self.authorized(request.header("authorization")):
                return await handler(request)
            return Response(
                401,
                b"unauthorized\n",
                headers={"WWW-Authenticate": 'Basic realm="zenmux-exporter", charset="UTF-8"'},
            )

        return guarded

    async def authorized(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic" or not encoded:
            return False
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        if not sep:
            return False
        if len(password.encode()) > BCRYPT_MAX_PASSWORD_BYTES:
            # bcrypt reads 72 bytes; Python's bcrypt refuses longer passwords rather than cut them.
            _warn_long_password(user)
            return False
        hashed = self.users.get(user)
        token = hashlib.sha256(b"%s\0%s\0%s" % (user.encode(), password.encode(), hashed or b"")).digest()
        if hashed is not None and token in self._verified:
            self._verified.move_to_end(token)
            return True
        async with self._checks:
            ok = await asyncio.to_thread(_check, password.encode(), hashed if hashed is not None else self._dummy_hash)
        if not ok or hashed is None:
            return False
        self._verified[token] = None
        while len(self._verified) > CACHE_SIZE:
            self._verified.popitem(last=False)
        return True


_warned_long: set[str] = set()


def _warn_long_password(user: str) -> None:
    if user not in _warned_long and len(_warned_long) < CACHE_SIZE:
        _warned_long.add(user)
        log.warning("basic auth for user %r refused: passwords over %d bytes cannot be checked with bcrypt",
                    user[:64], BCRYPT_MAX_PASSWORD_BYTES)


def _check(password: bytes, hashed: bytes) -> bool:
    try:
        return bool(bcrypt.checkpw(password, hashed))
    except ValueError:
        return False


def load_web_config(path: str | Path) -> WebConfig:
    """Reads and validates the file; raises ConfigError listing every problem (never echoing a hash)."""
    source = str(path)
    try:
        data: Any = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(source, [f"(file): cannot read: {err.strerror}"]) from None
    except yaml.YAMLError as err:
        raise ConfigError(source, [f"(yaml): {err}"]) from None
    problems: list[str] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): must be a mapping"])
    for key in data:
        if key not in ("tls_server_config", "basic_auth_users", "http_server_config"):
            problems.append(f"{key}: unknown key (known: basic_auth_users, http_server_config, tls_server_config)")
    users = _users(data.get("basic_auth_users"), problems)
    tls = _tls(data.get("tls_server_config"), Path(path).parent, problems)
    headers = _http_server_config(data.get("http_server_config"), problems)
    if problems:
        raise ConfigError(source, problems)
    return WebConfig(None, users, tls, headers)


def _http_server_config(raw: Any, problems: list[str]) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append("http_server_config: must be a mapping")
        return {}
    headers: dict[str, str] = {}
    for key, value in raw.items():
        if key == "http2":
            if value is not False:
                problems.append("http_server_config.http2: HTTP/2 is not supported (HTTP/1.1 only); set false")
        elif key == "headers":
            if not isinstance(value, dict):
                problems.append("http_server_config.headers: must be a mapping")
                continue
            for name, text in value.items():
                where = f"http_server_config.headers.{name}"
                if name not in _HEADERS:
                    problems.append(f"{where}: not one of exporter-toolkit's headers ({', '.join(_HEADERS)})")
                elif not isinstance(text, str) or any(c in text for c in "\r\n\0"):
                    problems.append(f"{where}: must be a single-line string")
                elif text:  # blank: unset, as exporter-toolkit does
                    headers[name] = text
        else:
            problems.append(f"http_server_config.{key}: not supported (known: headers, http2)")
    return headers


def _users(raw: Any, problems: list[str]) -> dict[str, bytes]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append("basic_auth_users: must be a mapping of user name to bcrypt hash")
        return {}
    users: dict[str, bytes] = {}
    for user, hashed in raw.items():
        where = f"basic_auth_users.{user}"
        if not isinstance(user, str) or not user or ":" in user:
            problems.append(f"{where}: user names must be non-empty strings without ':'")
        elif not isinstance(hashed, str) or not BCRYPT_HASH.fullmatch(hashed):
            problems.append(f"{where}: must be a bcrypt hash ($2a$/$2b$/$2y$, 60 characters), not a password")
        else:
            users[user] = hashed.encode()
    return users


def _tls(raw: Any, base: Path, problems: list[str]) -> ReloadingContext | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        problems.append("tls_server_config: must be a mapping")
        return None
    for key in raw:
        if key in _TLS_UNSUPPORTED:
            problems.append(f"tls_server_config.{key}: exporter-toolkit's {key} is not supported here")
        elif key not in _TLS_KEYS:
            problems.append(f"tls_server_config.{key}: unknown key (known: {', '.join(sorted(_TLS_KEYS))})")
    cert, key = raw.get("cert_file"), raw.get("key_file")
    if not isinstance(cert, str) or not cert or not isinstance(key, str) or not key:
        problems.append("tls_server_config: cert_file and key_file are both required")
        return None
    auth = raw.get("client_auth_type", "NoClientCert")
    if auth in _CLIENT_AUTH_UNSUPPORTED:
        problems.append(f"tls_server_config.client_auth_type: {auth} (a client certificate asked for but not "
                        "verified) is not supported; use VerifyClientCertIfGiven or RequireAndVerifyClientCert")
        return None
    if auth not in _CLIENT_AUTH:
        problems.append(f"tls_server_config.client_auth_type: must be one of {', '.join(_CLIENT_AUTH)}")
        return None
    versions = {}
    for name, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        version = raw.get(name, default)
        if version not in _VERSIONS:
            problems.append(f"tls_server_config.{name}: must be one of {', '.join(_VERSIONS)}")
            return None
        versions[name] = _VERSIONS[version]
    if versions["min_version"] > versions["max_version"]:
        problems.append("tls_server_config.max_version: is below min_version")
        return None
    ca = raw.get("client_ca_file", "")
    if not isinstance(ca, str) or (_CLIENT_AUTH[auth] != ssl.CERT_NONE and not ca):
        problems.append(f"tls_server_config.client_ca_file: a CA file is required with client_auth_type {auth}")
        return None
    settings = TlsSettings(base / cert, base / key, base / ca if ca else None, _CLIENT_AUTH[auth],
                           versions["min_version"], versions["max_version"], auth)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(settings.cert, settings.key)
    except (OSError, ssl.SSLError) as err:
        problems.append(f"tls_server_config: cannot load cert_file/key_file: {_reason(err)}")
        return None
    try:
        return ReloadingContext(settings)
    except (OSError, ssl.SSLError) as err:
        problems.append(f"tls_server_config.client_ca_file: cannot load: {_reason(err)}")
        return None


def _reason(err: OSError | ssl.SSLError) -> str:
    if isinstance(err, ssl.SSLError):
        return str(err.reason or err)
    return str(err.strerror or err)

