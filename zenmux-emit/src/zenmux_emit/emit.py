"""Sending generation ids to the exporter from an application: UDP datagrams or JSON lines, never blocking or raising.

Standard library only (the `zenmux-emit` distribution), so an application can also vendor this one file. Usage::

    from zenmux_emit import emit

    emit.emit(response.id, {"feature": "chat"})          # target from $ZENMUX_EMIT (default udp://127.0.0.1:9467)

    sender = emit.open_emitter("file:///var/log/app/generations.log")
    sender.emit(response.id)

Targets (`open_emitter`, `$ZENMUX_EMIT`):

* ``udp://HOST:PORT`` — one id per datagram, plain (the UDP source's default ``format: plain``; labels dropped);
* ``udp://HOST:PORT?format=json`` — one JSON object per datagram (``format: json``; labels carried);
* ``file:///ABSOLUTE/PATH`` — appends one JSON object per line (the file source's ``format: json``);
  ``?max_bytes=N`` renames the file to ``PATH.1`` past N bytes (default 64 MiB, 0 never);
* ``?id_field=NAME`` (json forms) — the key holding the id (default ``generation_id``);
* ``none`` or an empty string — discard everything.

Every `emit` returns True when the id was handed to the kernel and False when it was dropped
(invalid id, unreachable or unwritable target, full buffer); it never raises and never waits.

Drops are counted and said: each emitter has ``sent`` and ``dropped`` counters and ``last_error`` (the reason of
the last drop). A target that cannot be used (``udp://localhost`` without a port, ``?format=jsn``, a file in a
missing directory) logs one warning on the ``zenmux_emit`` logger when the emitter is built; the first drop logs
one warning, and later drops at most one every `WARN_INTERVAL_SECONDS`, with the count since the last one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Callable, Mapping
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger("zenmux_emit")

__all__ = [
    "DEFAULT_TARGET",
    "ENV_VAR",
    "Emitter",
    "FileEmitter",
    "NullEmitter",
    "UdpEmitter",
    "default_emitter",
    "emit",
    "encode_json",
    "open_emitter",
    "valid_id",
]

ENV_VAR = "ZENMUX_EMIT"
DEFAULT_TARGET = "udp://127.0.0.1:9467"
DEFAULT_ID_FIELD = "generation_id"
DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024
# The largest UDP payload over IPv4; the exporter's default max_datagram_bytes.
MAX_DATAGRAM_BYTES = 65507
MAX_LABEL_VALUE_CHARS = 1024
# After the first drop's warning, at most one warning per this many seconds (with the count since the last).
WARN_INTERVAL_SECONDS = 60.0

# What the exporter accepts as a generation id. Defined here, the one module an application vendors, and used by
# the exporter's parsers (exporter/ids.py), so what an application sends and what the exporter takes agree.
ID_PATTERN = r"[A-Za-z0-9_.:-]{1,128}"
_VALID_ID = re.compile(ID_PATTERN)
LabelValue = str | int | float | bool


def valid_id(generation_id: object) -> bool:
    """True for what the exporter accepts as an id: 1-128 characters of [A-Za-z0-9_.:-]."""
    return isinstance(generation_id, str) and _VALID_ID.fullmatch(generation_id) is not None


def encode_json(
    generation_id: str, labels: Mapping[str, LabelValue] | None = None, id_field: str = DEFAULT_ID_FIELD
) -> bytes:
    """One JSON line (with the trailing newline): the id under id_field plus the labels as string fields.

    Labels whose name is not a string or whose value is not a str/int/float/bool are left out;
    the id field cannot be overridden by a label.
    """
    record: dict[str, str] = {id_field: generation_id}
    for name, value in (labels or {}).items():
        if not isinstance(name, str) or name == id_field or not isinstance(value, str | int | float | bool):
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        record[name] = text[:MAX_LABEL_VALUE_CHARS]
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


class Emitter(Protocol):
    """Anything that can take a generation id; what `zenmux_emit.hooks` sends to."""

    def emit(self, generation_id: str, labels: Mapping[str, LabelValue] | None = None) -> bool: ...


class _Counted:
    """Shared bookkeeping: how many ids went out, how many were dropped, the last reason, and the warnings."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.sent = 0
        self.dropped = 0
        self.last_error = ""
        self._clock = clock
        self._warned_at: float | None = None
        self._unwarned = 0

    def _unusable(self, reason: str) -> None:
        """The target cannot work as given: say so once now, so a typo is seen before any id is lost."""
        self.last_error = reason
        self._warned_at = self._clock()
        log.warning("zenmux_emit: %s; ids are dropped until this is fixed", reason)

    def _drop(self, reason: str) -> bool:
        self.dropped += 1
        self.last_error = reason
        self._unwarned += 1
        now = self._clock()
        if self._warned_at is None or now - self._warned_at >= WARN_INTERVAL_SECONDS:
            log.warning(
                "zenmux_emit: %d generation id(s) dropped (%d in all): %s", self._unwarned, self.dropped, reason
            )
            self._warned_at = now
            self._unwarned = 0
        return False


class NullEmitter(_Counted):
    """Discards every id (target ``none``); also what a target that cannot be parsed turns into."""

    def __init__(self, reason: str = "", *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        self.reason = reason
        if reason:
            self._unusable(reason)

    def emit(self, generation_id: str, labels: Mapping[str, LabelValue] | None = None) -> bool:
        if not self.reason:  # target none: discarding is what was asked for, so it is counted but not said
            self.dropped += 1
            return False
        return self._drop(self.reason)


class UdpEmitter(_Counted):
    """Sends each id as one datagram from a non-blocking socket; a full buffer or no listener drops it."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9467,
        *,
        format: str = "plain",
        id_field: str = DEFAULT_ID_FIELD,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(clock)
        self.format = format
        self.id_field = id_field
        self._sock: socket.socket | None = None
        self._address: tuple[str, int] | tuple[str, int, int, int] | None = None
        if format not in ("plain", "json"):
            self._unusable(f"udp://{host}:{port}: unknown format {format!r} (plain or json)")
            return
        if not 0 < port < 65536:
            self._unusable(f"udp://{host}:{port}: port out of range")
            return
        try:
            # Resolved once here, so emit() never waits on DNS; use an IP literal to avoid even this lookup.
            family, _type, _proto, _canon, address = socket.getaddrinfo(
                "127.0.0.1" if host == "localhost" else host, port, type=socket.SOCK_DGRAM
            )[0]
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
        except (OSError, UnicodeError, ValueError, OverflowError) as err:
            self._unusable(f"cannot set up udp://{host}:{port}: {err}")
            return
        self._sock = sock
        self._address = address  # type: ignore[assignment]

    def emit(self, generation_id: str, labels: Mapping[str, LabelValue] | None = None) -> bool:
        try:
            if self._sock is None or self._address is None:
                return self._drop(self.last_error or "socket closed")
            if not valid_id(generation_id):
                return self._drop(f"invalid id {generation_id!r:.80}")
            if self.format == "json":
                payload = encode_json(generation_id, labels, self.id_field)
            else:
                payload = generation_id.encode("ascii") + b"\n"
            if len(payload) > MAX_DATAGRAM_BYTES:
                return self._drop("datagram too large")
            self._sock.sendto(payload, self._address)
        except Exception as err:  # an emitter must never raise into the application
            return self._drop(f"send failed: {err}")
        self.sent += 1
        return True

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


class FileEmitter(_Counted):
    """Appends each id as one JSON line with a single O_APPEND write, so processes and threads may share a file.

    The file is opened per line (a few microseconds), which follows any rotation done by others; past
    max_bytes the emitter itself renames the file to PATH.1 (the exporter follows rename rotations).
    Opening is non-blocking: a FIFO without a reader, or a full one, drops the line instead of waiting.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        id_field: str = DEFAULT_ID_FIELD,
        max_bytes: int = DEFAULT_MAX_FILE_BYTES,
        mode: int = 0o644,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(clock)
        self.path = os.fspath(path)
        self.id_field = id_field
        self.max_bytes = max_bytes
        self.mode = mode
        directory = os.path.dirname(self.path) or "."
        if not os.path.isdir(directory):
            # Kept (the directory may be created later), but a typo should not go unnoticed.
            self._unusable(f"file://{self.path}: directory {directory} does not exist")

    def emit(self, generation_id: str, labels: Mapping[str, LabelValue] | None = None) -> bool:
        try:
            if not valid_id(generation_id):
                return self._drop(f"invalid id {generation_id!r:.80}")
            line = encode_json(generation_id, labels, self.id_field)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(self.path, flags, self.mode)
            try:
                written = os.write(fd, line)
                if 0 < written < len(line):  # a nearly full disk or pipe: finish the line if at all possible
                    written += os.write(fd, line[written:])
                if written != len(line):
                    return self._drop("short write")
                if self.max_bytes > 0:
                    self._rotate_if_large(fd)
            finally:
                os.close(fd)
        except BlockingIOError:
            return self._drop("target busy (a FIFO without room)")
        except OSError as err:
            if err.errno == errno.ENXIO:
                return self._drop("FIFO has no reader")
            return self._drop(f"write failed: {err}")
        except Exception as err:  # an emitter must never raise into the application
            return self._drop(f"write failed: {err}")
        self.sent += 1
        return True

    def _rotate_if_large(self, fd: int) -> None:
        info = os.fstat(fd)
        if info.st_size < self.max_bytes or not stat.S_ISREG(info.st_mode):
            return
        # Best effort (the next write tries again); only rotate the file written to, since another
        # process may have rotated it a moment ago.
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == info.st_ino:
                os.replace(self.path, self.path + ".1")


def open_emitter(target: str) -> UdpEmitter | FileEmitter | NullEmitter:
    """An emitter for a target string (see the module docstring); an unusable target gives a NullEmitter."""
    target = target.strip()
    if target in ("", "none"):
        return NullEmitter()
    try:
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        id_field = query.get("id_field", DEFAULT_ID_FIELD)
        if url.scheme == "udp":
            if url.hostname is None or url.port is None:
                return NullEmitter(f"udp target needs host:port, got {target!r}")
            return UdpEmitter(url.hostname, url.port, format=query.get("format", "plain"), id_field=id_field)
        if url.scheme == "file":
            path = unquote(url.path)
            if url.netloc not in ("", "localhost") or not path.startswith("/"):
                return NullEmitter(f"file target needs an absolute path (file:///...), got {target!r}")
            max_bytes = int(query.get("max_bytes", DEFAULT_MAX_FILE_BYTES))
            return FileEmitter(path, id_field=id_field, max_bytes=max_bytes)
    except ValueError as err:
        return NullEmitter(f"cannot parse target {target!r}: {err}")
    return NullEmitter(f"unknown target {target!r} (udp://host:port, file:///path or none)")


_default: UdpEmitter | FileEmitter | NullEmitter | None = None
_default_lock = threading.Lock()


def default_emitter() -> UdpEmitter | FileEmitter | NullEmitter:
    """The process-wide emitter, built once from $ZENMUX_EMIT (default udp://127.0.0.1:9467)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = open_emitter(os.environ.get(ENV_VAR, DEFAULT_TARGET))
    return _default


def emit(generation_id: str, labels: Mapping[str, LabelValue] | None = None) -> bool:
    """Sends one id (and optional labels) through the default emitter; True if handed over, never raises."""
    try:
        return default_emitter().emit(generation_id, labels)
    except Exception:
        return False
