"""The web config file of Prometheus exporters (exporter-toolkit's format): TLS and bcrypt basic auth for /metrics.

    tls_server_config:
      cert_file: /etc/zenmux-exporter/tls.crt
      key_file: /etc/zenmux-exporter/tls.key
      client_ca_file: ""                # optional: verify client certificates against this CA
      client_auth_type: NoClientCert    # or RequireAndVerifyClientCert, VerifyClientCertIfGiven
      min_version: TLS12                # or TLS13
    basic_auth_users:
      prometheus: $2y$10$...            # bcrypt hashes (htpasswd -nBC 10 "" | tr -d ':\\n')

Basic auth guards every path but the probes (/healthz, /readyz), which reveal nothing and which kubelet
calls without credentials. Password checks run off the event loop and a successful check is remembered
(by a hash of user and password) so scrapes do not pay bcrypt's cost each time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re
import ssl
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import yaml

from exporter.config import ConfigError
from exporter.web import Handler, Request, Response

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
CACHE_SIZE = 256
# bcrypt is slow on purpose; a flood of wrong passwords must not take every worker thread (scrapes render
# on the same default executor), so at most this many checks run at once and the rest queue.
CONCURRENT_CHECKS = 2
_TLS_KEYS = {"cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version"}
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_NONE,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
_MIN_VERSION = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}


@dataclass
class WebConfig:
    """A loaded web config: an SSL context (or None) and the users allowed to read /metrics."""

    ssl_context: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)
    _verified: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    _checks: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(CONCURRENT_CHECKS))
    # Checked against when the user is unknown, at the configured hashes' cost, so a wrong user name takes
    # as long as a wrong password and user names cannot be told apart by timing.
    _dummy_hash: bytes = b""

    def __post_init__(self) -> None:
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
    context = _tls(data.get("tls_server_config"), Path(path).parent, problems)
    if problems:
        raise ConfigError(source, problems)
    return WebConfig(context, users)


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


def _tls(raw: Any, base: Path, problems: list[str]) -> ssl.SSLContext | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        problems.append("tls_server_config: must be a mapping")
        return None
    for key in raw:
        if key not in _TLS_KEYS:
            problems.append(f"tls_server_config.{key}: unknown key (known: {', '.join(sorted(_TLS_KEYS))})")
    cert, key = raw.get("cert_file"), raw.get("key_file")
    if not isinstance(cert, str) or not cert or not isinstance(key, str) or not key:
        problems.append("tls_server_config: cert_file and key_file are both required")
        return None
    auth = raw.get("client_auth_type", "NoClientCert")
    if auth not in _CLIENT_AUTH:
        problems.append(f"tls_server_config.client_auth_type: must be one of {', '.join(_CLIENT_AUTH)}")
        return None
    minimum = raw.get("min_version", "TLS12")
    if minimum not in _MIN_VERSION:
        problems.append(f"tls_server_config.min_version: must be one of {', '.join(_MIN_VERSION)}")
        return None
    ca = raw.get("client_ca_file", "")
    if not isinstance(ca, str) or (_CLIENT_AUTH[auth] != ssl.CERT_NONE and not ca):
        problems.append(f"tls_server_config.client_ca_file: a CA file is required with client_auth_type {auth}")
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _MIN_VERSION[minimum]
    try:
        context.load_cert_chain(base / cert, base / key)
    except (OSError, ssl.SSLError) as err:
        problems.append(f"tls_server_config: cannot load cert_file/key_file: {_reason(err)}")
        return None
    if ca:
        try:
            context.load_verify_locations(base / ca)
        except (OSError, ssl.SSLError) as err:
            problems.append(f"tls_server_config.client_ca_file: cannot load: {_reason(err)}")
            return None
        context.verify_mode = _CLIENT_AUTH[auth]
    return context


def _reason(err: OSError | ssl.SSLError) -> str:
    if isinstance(err, ssl.SSLError):
        return str(err.reason or err)
    return str(err.strerror or err)

