"""YAML configuration -> frozen dataclasses; every problem reported at once, with key paths and the file."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
RESERVED_LABELS = frozenset(
    {"model", "protocol", "token_type", "fee_item", "streamed", "finish_reason", "le", "source", "job", "instance"}
)
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
REDACTED = "<redacted>"

Format = Literal["json", "regex", "plain"]
# Bounds for keys without a narrower one: past them a value is a typo, and (for integers) no longer fits the
# C int of a socket option or the SQLite integer it is stored in.
MAX_NUMBER = 1e9
MAX_INT = 2**31 - 1


class ConfigError(Exception):
    """A configuration that cannot run; `problems` lists every one, each naming its key path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        listing = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration in {source}:\n{listing}")


@dataclass(frozen=True)
class ZenMuxConfig:
    base_url: str = "https://zenmux.ai"
    generation_path: str = "/api/v1/management/generation"
    api_key: str = field(default="", repr=False)
    api_key_file: str = ""
    connect_timeout_seconds: float = 5.0
    timeout_seconds: float = 10.0
    concurrency: int = 16
    max_requests_per_second: float = 20.0
    max_response_bytes: int = 1024 * 1024


@dataclass(frozen=True)
class ResolveConfig:
    billing_delay_seconds: float = 240.0
    retry_initial_seconds: float = 30.0
    retry_max_seconds: float = 300.0
    give_up_after_seconds: float = 3600.0


@dataclass(frozen=True, kw_only=True)
class _SourceCommon:
    """What every source has: its name and how its lines are parsed."""

    name: str
    format: Format = "json"
    id_field: str = "generation_id"
    pattern: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class FileSourceConfig(_SourceCommon):
    """A log file tailed across rotations (`type: file`)."""

    type: Literal["file"] = field(default="file", init=False)
    name: str = "file"
    path: str
    start_at: Literal["end", "beginning"] = "end"
    poll_interval_seconds: float = 0.25
    max_line_bytes: int = 64 * 1024
    # Where rotated copies are looked for (a glob; relative to the log's directory). "": the log's name
    # followed by anything (app.log.1, app.log.1.gz, app.log-20261203).
    rotated_glob: str = ""


@dataclass(frozen=True, kw_only=True)
class UdpSourceConfig(_SourceCommon):
    """Ids sent as UDP datagrams (`type: udp`)."""

    type: Literal["udp"] = field(default="udp", init=False)
    name: str = "udp"
    format: Format = "plain"
    listen: str = "127.0.0.1:9467"
    receive_buffer_bytes: int = 4 * 1024 * 1024
    max_datagram_bytes: int = 65507
    max_buffered_ids: int = 100_000


SourceConfig = FileSourceConfig | UdpSourceConfig
SOURCE_TYPES: dict[str, type[FileSourceConfig] | type[UdpSourceConfig]] = {
    "file": FileSourceConfig,
    "udp": UdpSourceConfig,
}


@dataclass(frozen=True)
class StateConfig:
    path: str = "zenmux-exporter.db"
    dedupe_window_seconds: float = 7 * 24 * 3600.0
    max_pending: int = 2_000_000
    # Fleet mode: a postgresql:// URL selects the shared PostgreSQL state instead of the SQLite file at `path`.
    url: str = field(default="", repr=False)
    password_file: str = ""
    # Who this process is among the fleet (file positions are kept per instance); "" = $HOSTNAME or hostname.
    instance: str = ""
    # How long a resolver's claim on a batch of ids holds before other replicas may take them over.
    lease_seconds: float = 60.0


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "0.0.0.0:9466"
    max_models: int = 200
    max_label_values: int = 100
    max_label_value_length: int = 128
    extra_labels: tuple[str, ...] = ()
    # exporter-toolkit's web config file: TLS and/or bcrypt basic auth for /metrics (exporter/webconfig.py).
    web_config_file: str = ""
    # A second, plain listener serving only /healthz and /readyz (no TLS, no auth): for the kubelet when
    # /metrics requires client certificates, and a way in that clients of /metrics cannot exhaust. "": none.
    probe_listen: str = ""


@dataclass(frozen=True)
class TracingConfig:
    exporter: Literal["none", "console", "otlp"] = "none"
    service_name: str = "zenmux-exporter"
    sample_ratio: float = 1.0


@dataclass(frozen=True)
class ShutdownConfig:
    drain_seconds: float = 20.0


@dataclass(frozen=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


ROLES = ("ingest", "resolve", "expose")


@dataclass(frozen=True)
class ReconcileConfig:
    """Reconciliation with ZenMux's account cost and PAYG balance: on when a management key is set."""

    management_api_key: str = field(default="", repr=False)
    management_api_key_file: str = ""
    poll_interval_seconds: float = 300.0
    # Account requests per minute we allow ourselves: the account's 60/min is shared with its usage endpoint.
    max_requests_per_minute: int = 20
    timeout_seconds: float = 30.0
    # Days of per-day, per-model ledger rows kept (in the state) for the comparison and the audit command.
    days_kept: int = 35

    @property
    def enabled(self) -> bool:
        return bool(self.management_api_key or self.management_api_key_file)


@dataclass(frozen=True)
class Config:
    zenmux: ZenMuxConfig = field(default_factory=ZenMuxConfig)
    resolve: ResolveConfig = field(default_factory=ResolveConfig)
    sources: tuple[SourceConfig, ...] = ()
    state: StateConfig = field(default_factory=StateConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    log: LogConfig = field(default_factory=LogConfig)
    reconcile: ReconcileConfig = field(default_factory=ReconcileConfig)
    roles: tuple[str, ...] = ROLES


T = TypeVar("T")


class _Reader:
    """Walks a parsed YAML tree, converting values and collecting problems instead of raising."""

    def __init__(self, environ: Mapping[str, str], *, check_system: bool = False) -> None:
        self.problems: list[str] = []
        self.environ = environ
        # Also look at the machine: read the API key file, resolve listen addresses (load_config does).
        self.check_system = check_system

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def section(self, data: Mapping[str, Any], key: str, path: str) -> dict[str, Any]:
        value = data.get(key, {})
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(path, f"must be a mapping, got {type(value).__name__}")
            return {}
        return value

    def unknown_keys(self, data: Mapping[str, Any], known: set[str], path: str) -> None:
        for key in data:
            if key not in known:
                where = f"{path}.{key}" if path else str(key)
                self.problem(where, f"unknown key (known: {', '.join(sorted(known))})")

    def string(self, data: Mapping[str, Any], key: str, path: str, default: str) -> str:
        value = data.get(key, default)
        if not isinstance(value, str):
            self.problem(f"{path}.{key}", f"must be a string, got {type(value).__name__}")
            return default
        return self.interpolate(value, f"{path}.{key}")

    def interpolate(self, value: str, path: str) -> str:
        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in self.environ:
                self.problem(path, f"environment variable {name} is not set")
                return ""
            return self.environ[name]

        return ENV_REF.sub(replace, value)

    def number(
        self,
        data: Mapping[str, Any],
        key: str,
        path: str,
        default: float,
        *,
        minimum: float = 0.0,
        exclusive_minimum: bool = False,
        maximum: float | None = None,
    ) -> float:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(f"{path}.{key}", f"must be a number, got {value!r}")
            return default
        if not math.isfinite(value):  # YAML's .nan and .inf: a NaN delay never comes due, for one
            self.problem(f"{path}.{key}", f"must be a finite number, got {value!r}")
            return default
        maximum = MAX_NUMBER if maximum is None else maximum
        too_small = value <= minimum if exclusive_minimum else value < minimum
        if too_small or (maximum is not None and value > maximum):
            low = f"> {minimum}" if exclusive_minimum else f">= {minimum}"
            high = f" and <= {maximum:g}"
            self.problem(f"{path}.{key}", f"must be {low}{high}, got {value!r}")
            return default
        return float(value)

    def integer(
        self, data: Mapping[str, Any], key: str, path: str, default: int, *, minimum: int = 1, maximum: int = MAX_INT
    ) -> int:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(f"{path}.{key}", f"must be an integer, got {value!r}")
            return default
        if not minimum <= value <= maximum:
            self.problem(f"{path}.{key}", f"must be >= {minimum} and <= {maximum}, got {value}")
            return default
        return value

    def choice(self, data: Mapping[str, Any], key: str, path: str, default: T, choices: tuple[T, ...]) -> T:
        value = data.get(key, default)
        if value not in choices:
            self.problem(f"{path}.{key}", f"must be one of {', '.join(map(str, choices))}, got {value!r}")
            return default
        return value  # type: ignore[no-any-return]

    def host_port(self, value: str, path: str) -> None:
        _host, sep, port = value.rpartition(":")
        if not sep or not (port.isascii() and port.isdigit()) or int(port) > 65535:
            self.problem(path, f"must be host:port, got {value!r}")
        elif self.check_system:
            host, number = split_host_port(value)
            try:
                socket.getaddrinfo(host, number, proto=socket.IPPROTO_TCP)
            except (OSError, UnicodeError) as err:
                self.problem(path, f"host {host!r} does not resolve ({err}); use an IP address or a resolvable name")

    def key_file(self, key_file: str, path: str) -> None:
        """The API key file's problems, listed with the others (the running exporter reads it again)."""
        try:
            read_key_file(key_file)
        except ConfigError as err:
            self.problems.extend(f"{path}: {problem}" for problem in err.problems)


def _zenmux(r: _Reader, data: dict[str, Any], *, needs_key: bool) -> ZenMuxConfig:
    d = ZenMuxConfig()
    p = "zenmux"
    r.unknown_keys(data, {f.name for f in dataclasses.fields(ZenMuxConfig)}, p)
    base_url = r.string(data, "base_url", p, d.base_url).rstrip("/")
    # The lookup URL is base_url + generation_path + "?id=...": neither part may carry a query or fragment.
    if not re.fullmatch(r"https?://[^/\s?#]+(/[^\s?#]*)?", base_url):
        r.problem(f"{p}.base_url", f"must be an http(s) URL without query or fragment, got {base_url!r}")
    path = r.string(data, "generation_path", p, d.generation_path)
    if not re.fullmatch(r"/[^\s?#]*", path):
        r.problem(f"{p}.generation_path", f"must be a path starting with '/', without query or fragment, got {path!r}")
    known_problems = len(r.problems)
    # A Secret injected as an environment variable often ends in a newline: an illegal header value.
    api_key = r.string(data, "api_key", p, "").strip()
    api_key_reported = len(r.problems) > known_problems  # not a string, or an unset variable
    api_key_file = r.string(data, "api_key_file", p, "")
    if "api_key" in data and not api_key_file and not api_key_reported:
        problem = key_problem(api_key)
        if problem:
            r.problem(f"{p}.api_key", problem)
    if api_key_file and not api_key and r.check_system:
        r.key_file(api_key_file, f"{p}.api_key_file")
    if api_key and api_key_file:
        r.problem(p, "set api_key or api_key_file, not both")
    elif "api_key" not in data and "api_key_file" not in data and needs_key:
        r.problem(p, "one of api_key or api_key_file is required (by the resolve role)")
    return ZenMuxConfig(
        base_url=base_url,
        generation_path=path,
        api_key=api_key,
        api_key_file=api_key_file,
        connect_timeout_seconds=r.number(
            data, "connect_timeout_seconds", p, d.connect_timeout_seconds, exclusive_minimum=True
        ),
        timeout_seconds=r.number(data, "timeout_seconds", p, d.timeout_seconds, exclusive_minimum=True),
        concurrency=r.integer(data, "concurrency", p, d.concurrency),
        max_requests_per_second=r.number(
            data, "max_requests_per_second", p, d.max_requests_per_second, exclusive_minimum=True
        ),
        max_response_bytes=r.integer(data, "max_response_bytes", p, d.max_response_bytes, minimum=1024),
    )


MANAGEMENT_KEY_PREFIX = "sk-mg-"


def _reconcile(r: _Reader, data: dict[str, Any]) -> ReconcileConfig:
    d = ReconcileConfig()
    p = "reconcile"
    r.unknown_keys(data, {f.name for f in dataclasses.fields(ReconcileConfig)}, p)
    known_problems = len(r.problems)
    key = r.string(data, "management_api_key", p, "").strip()
    key_file = r.string(data, "management_api_key_file", p, "")
    if len(r.problems) == known_problems and key:
        problem = key_problem(key) or (
            "" if key.startswith(MANAGEMENT_KEY_PREFIX) else "must be a management key (sk-mg-v1-...)"
        )
        if problem:
            r.problem(f"{p}.management_api_key", problem)
    if key and key_file:
        r.problem(p, "set management_api_key or management_api_key_file, not both")
    return ReconcileConfig(
        management_api_key=key,
        management_api_key_file=key_file,
        poll_interval_seconds=r.number(data, "poll_interval_seconds", p, d.poll_interval_seconds, minimum=10.0),
        max_requests_per_minute=r.integer(data, "max_requests_per_minute", p, d.max_requests_per_minute),
        timeout_seconds=r.number(data, "timeout_seconds", p, d.timeout_seconds, exclusive_minimum=True),
        days_kept=r.integer(data, "days_kept", p, d.days_kept, minimum=2),
    )


def _resolve(r: _Reader, data: dict[str, Any]) -> ResolveConfig:
    d = ResolveConfig()
    p = "resolve"
    r.unknown_keys(data, {f.name for f in dataclasses.fields(ResolveConfig)}, p)
    cfg = ResolveConfig(
        billing_delay_seconds=r.number(data, "billing_delay_seconds", p, d.billing_delay_seconds),
        retry_initial_seconds=r.number(
            data, "retry_initial_seconds", p, d.retry_initial_seconds, exclusive_minimum=True
        ),
        retry_max_seconds=r.number(data, "retry_max_seconds", p, d.retry_max_seconds, exclusive_minimum=True),
        give_up_after_seconds=r.number(
            data, "give_up_after_seconds", p, d.give_up_after_seconds, exclusive_minimum=True
        ),
    )
    if cfg.retry_max_seconds < cfg.retry_initial_seconds:
        r.problem(f"{p}.retry_max_seconds", "must be >= resolve.retry_initial_seconds")
    return cfg


def _source(r: _Reader, data: Any, index: int, extra_labels: tuple[str, ...]) -> SourceConfig | None:
    p = f"sources[{index}]"
    if not isinstance(data, dict):
        r.problem(p, "must be a mapping")
        return None
    kind: Literal["file", "udp"] | None = r.choice(data, "type", p, None, ("file", "udp"))
    if kind is None:
        return None
    cls = SOURCE_TYPES[kind]
    own = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in own:
            other = [k for k, c in SOURCE_TYPES.items() if k != kind and key in {f.name for f in dataclasses.fields(c)}]
            only = f", only a {other[0]} source has it" if other else ""
            r.problem(f"{p}.{key}", f"unknown key for a {kind} source{only} (known: {', '.join(sorted(own))})")
    fmt: Format = r.choice(data, "format", p, "json" if kind == "file" else "plain", ("json", "regex", "plain"))
    pattern = r.string(data, "pattern", p, "")
    if fmt == "regex":
        if not pattern:
            r.problem(f"{p}.pattern", "is required when format is regex")
        else:
            try:
                if "id" not in re.compile(pattern).groupindex:
                    r.problem(f"{p}.pattern", "must have a named group (?P<id>...)")
            except re.error as err:
                r.problem(f"{p}.pattern", f"is not a valid regular expression: {err}")
    labels_raw = data.get("labels", {}) or {}
    labels: dict[str, str] = {}
    if not isinstance(labels_raw, dict):
        r.problem(f"{p}.labels", "must be a mapping of label name to field (json) or group (regex)")
    else:
        for name, origin in labels_raw.items():
            where = f"{p}.labels.{name}"
            if not isinstance(name, str) or not LABEL_NAME.match(name):
                r.problem(where, "is not a valid Prometheus label name")
            elif name not in extra_labels:
                r.problem(where, "must also be listed in metrics.extra_labels")
            elif not isinstance(origin, str) or not origin:
                r.problem(where, "must name a field (json) or a named group (regex)")
            else:
                labels[name] = origin
        if labels and fmt == "plain":
            r.problem(f"{p}.labels", "plain lines carry no fields; use json or regex to extract labels")
    name = r.string(data, "name", p, kind)
    id_field = r.string(data, "id_field", p, "generation_id")
    source: SourceConfig
    if kind == "file":
        f = FileSourceConfig(path="")
        source = FileSourceConfig(
            name=name,
            format=fmt,
            id_field=id_field,
            pattern=pattern,
            labels=labels,
            path=r.string(data, "path", p, ""),
            start_at=r.choice(data, "start_at", p, f.start_at, ("end", "beginning")),
            poll_interval_seconds=r.number(
                data, "poll_interval_seconds", p, f.poll_interval_seconds, exclusive_minimum=True
            ),
            max_line_bytes=r.integer(data, "max_line_bytes", p, f.max_line_bytes, minimum=256),
            rotated_glob=r.string(data, "rotated_glob", p, f.rotated_glob),
        )
        if not source.path:
            r.problem(f"{p}.path", "is required for a file source")
    else:
        u = UdpSourceConfig()
        source = UdpSourceConfig(
            name=name,
            format=fmt,
            id_field=id_field,
            pattern=pattern,
            labels=labels,
            listen=r.string(data, "listen", p, u.listen),
            receive_buffer_bytes=r.integer(data, "receive_buffer_bytes", p, u.receive_buffer_bytes, minimum=4096),
            max_datagram_bytes=r.integer(
                data, "max_datagram_bytes", p, u.max_datagram_bytes, minimum=64, maximum=65535
            ),
            max_buffered_ids=r.integer(data, "max_buffered_ids", p, u.max_buffered_ids),
        )
        r.host_port(source.listen, f"{p}.listen")
    if fmt == "regex" and pattern and labels:
        try:
            groups = re.compile(pattern).groupindex
        except re.error:
            groups = {}
        for label, group in labels.items():
            if groups and group not in groups:
                r.problem(f"{p}.labels.{label}", f"names group {group!r}, which the pattern does not have")
    return source


def _sources(r: _Reader, data: Any, extra_labels: tuple[str, ...], *, needed: bool) -> tuple[SourceConfig, ...]:
    if data is None:
        data = []
    if not isinstance(data, list):
        r.problem("sources", "must be a list")
        return ()
    if not data and needed:
        r.problem("sources", "needs at least one source (type: file or type: udp) for the ingest role")
    indexed = [(i, s) for i, item in enumerate(data) if (s := _source(r, item, i, extra_labels)) is not None]
    seen: dict[str, int] = {}
    for i, s in indexed:  # i: the index in the file, not among the sources that parsed
        if s.name in seen:
            r.problem(
                f"sources[{i}].name",
                f"duplicate source name {s.name!r} (also sources[{seen[s.name]}]); give each source a unique name",
            )
        seen.setdefault(s.name, i)
    return tuple(s for _, s in indexed)


def _simple(r: _Reader, data: dict[str, Any], path: str, cls: type[T], **checks: Callable[[Any], str]) -> T:
    """Reads a flat section whose fields are numbers, strings or choices, using the dataclass defaults."""
    r.unknown_keys(data, {f.name for f in dataclasses.fields(cls)}, path)  # type: ignore[arg-type]
    default = cls()
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        current = getattr(default, f.name)
        if f.name not in data or isinstance(current, bool):
            values[f.name] = current
        elif isinstance(current, int):
            values[f.name] = r.integer(data, f.name, path, current)
        elif isinstance(current, float):
            values[f.name] = r.number(data, f.name, path, current)
        elif f.name in checks:
            values[f.name] = data[f.name]
            message = checks[f.name](data[f.name])
            if message:
                r.problem(f"{path}.{f.name}", message)
                values[f.name] = current
        else:
            values[f.name] = r.string(data, f.name, path, current)
    return cls(**values)


def _one_of(*choices: str) -> Callable[[Any], str]:
    return lambda v: "" if v in choices else f"must be one of {', '.join(choices)}, got {v!r}"


def _extra_labels(r: _Reader, data: dict[str, Any]) -> tuple[str, ...]:
    raw = data.get("extra_labels", []) or []
    if not isinstance(raw, list):
        r.problem("metrics.extra_labels", "must be a list of label names")
        return ()
    names: list[str] = []
    for i, name in enumerate(raw):
        where = f"metrics.extra_labels[{i}]"
        if not isinstance(name, str) or not LABEL_NAME.match(name) or name.startswith("__"):
            r.problem(where, f"{name!r} is not a valid Prometheus label name")
        elif name in RESERVED_LABELS:
            r.problem(where, f"{name!r} is reserved by the exporter")
        elif name in names:
            r.problem(where, f"{name!r} is listed twice")
        else:
            names.append(name)
    return tuple(names)


def _roles(r: _Reader, data: Any) -> tuple[str, ...]:
    if data is None:
        return ROLES
    if not isinstance(data, list) or not data:
        r.problem("roles", f"must be a non-empty list of {', '.join(ROLES)}")
        return ROLES
    roles: list[str] = []
    for i, role in enumerate(data):
        if role not in ROLES:
            r.problem(f"roles[{i}]", f"must be one of {', '.join(ROLES)}, got {role!r}")
        elif role in roles:
            r.problem(f"roles[{i}]", f"{role!r} is listed twice")
        else:
            roles.append(role)
    return tuple(role for role in ROLES if role in roles)


def _state(r: _Reader, data: dict[str, Any], roles: tuple[str, ...]) -> StateConfig:
    state = _simple(r, data, "state", StateConfig)
    if state.url:
        if not re.fullmatch(r"postgres(ql)?://\S+", state.url):
            r.problem("state.url", "must be a postgresql:// URL")  # never quoted: it may hold a password
        if "path" in data:
            r.problem("state", "set state.path (SQLite) or state.url (PostgreSQL), not both")
    else:
        if state.password_file:
            r.problem("state.password_file", "is for state.url (PostgreSQL)")
        if roles != ROLES:
            r.problem(
                "roles",
                f"{', '.join(roles)}: a process on a local SQLite state (state.path) has every role, since a "
                "local file cannot be shared; set state.url to a PostgreSQL database to split the roles",
            )
    if state.lease_seconds < 1:
        r.problem("state.lease_seconds", f"must be >= 1, got {state.lease_seconds!r}")
    return state


def parse_config(
    data: Any, source: str, environ: Mapping[str, str] | None = None, *, check_system: bool = False
) -> Config:
    """Builds a Config from parsed YAML; raises ConfigError listing every problem.

    With `check_system`, also what depends on the machine: the API key file is read and checked, listen
    hosts must resolve."""
    r = _Reader(os.environ if environ is None else environ, check_system=check_system)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): must be a mapping"])
    known = {f.name for f in dataclasses.fields(Config)}
    r.unknown_keys(data, known, "")
    metrics_data = r.section(data, "metrics", "metrics")
    extra = _extra_labels(r, metrics_data)
    metrics = _simple(r, {k: v for k, v in metrics_data.items() if k != "extra_labels"}, "metrics", MetricsConfig)
    r.host_port(metrics.listen, "metrics.listen")
    if metrics.probe_listen:
        r.host_port(metrics.probe_listen, "metrics.probe_listen")
    roles = _roles(r, data.get("roles"))
    config = Config(
        zenmux=_zenmux(r, r.section(data, "zenmux", "zenmux"), needs_key="resolve" in roles),
        resolve=_resolve(r, r.section(data, "resolve", "resolve")),
        sources=_sources(r, data.get("sources"), extra, needed="ingest" in roles),
        state=_state(r, r.section(data, "state", "state"), roles),
        roles=roles,
        metrics=dataclasses.replace(metrics, extra_labels=extra),
        tracing=_simple(
            r,
            r.section(data, "tracing", "tracing"),
            "tracing",
            TracingConfig,
            exporter=_one_of("none", "console", "otlp"),
        ),
        shutdown=_simple(r, r.section(data, "shutdown", "shutdown"), "shutdown", ShutdownConfig),
        log=_simple(
            r,
            r.section(data, "log", "log"),
            "log",
            LogConfig,
            level=_one_of("debug", "info", "warning", "error"),
            format=_one_of("text", "json"),
        ),
        reconcile=_reconcile(r, r.section(data, "reconcile", "reconcile")),
    )
    if not 0.0 <= config.tracing.sample_ratio <= 1.0:
        r.problem("tracing.sample_ratio", f"must be between 0 and 1, got {config.tracing.sample_ratio!r}")
    if r.problems:
        raise ConfigError(source, r.problems)
    return config


def load_config(
    path: Path | str, environ: Mapping[str, str] | None = None, *, check_system: bool = True
) -> Config:
    """Reads and validates a YAML config file, by default against this machine too (the API key file is
    read, listen hosts resolved): pass check_system=False for a config meant for another machine."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(str(path), [f"(file): cannot read: {err.strerror}"]) from None
    except UnicodeDecodeError as err:
        where = f"byte {err.start}: {err.object[err.start]:#04x}"
        raise ConfigError(str(path), [f"(file): not UTF-8 text ({where}); save it as UTF-8"]) from None
    try:
        data, duplicates = load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(str(path), [f"(yaml): {err}"]) from None
    try:
        config = parse_config(data, str(path), environ, check_system=check_system)
    except ConfigError as err:
        raise ConfigError(str(path), duplicates + err.problems) from None
    if duplicates:
        raise ConfigError(str(path), duplicates)
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that notes every key given twice in one mapping (PyYAML keeps the last one silently)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[yaml.MappingNode, Any, int, int]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:
                continue  # an unhashable key: the base constructor reports it
            if first is not key_node:
                self.duplicates.append((node, key, first.start_mark.line + 1, key_node.start_mark.line + 1))
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> tuple[Any, list[str]]:
    """yaml.safe_load, and a problem (key path, both lines) for every key given twice in one mapping."""
    loader = _UniqueKeyLoader(text)
    try:
        root = loader.get_single_node()
        data = None if root is None else loader.construct_document(root)
    finally:
        loader.dispose()
    paths = _node_paths(root) if root is not None and loader.duplicates else {}
    return data, [
        f"{_join(paths.get(id(mapping), ''), key)}: given twice (lines {first} and {second}); the second would "
        "silently win"
        for mapping, key, first, second in loader.duplicates
    ]


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _node_paths(root: yaml.Node) -> dict[int, str]:
    """The key path of every mapping node (by id), in the notation of the other problems."""
    paths: dict[int, str] = {}
    todo: list[tuple[yaml.Node, str]] = [(root, "")]
    while todo:
        node, path = todo.pop()
        if isinstance(node, yaml.MappingNode):
            paths.setdefault(id(node), path)
            todo.extend((value, _join(path, key.value)) for key, value in node.value)
        elif isinstance(node, yaml.SequenceNode):
            todo.extend((item, f"{path}[{i}]") for i, item in enumerate(node.value))
    return paths


def split_host_port(listen: str) -> tuple[str, int]:
    """("host", port) from a validated host:port; an empty host means every interface."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def key_problem(key: str) -> str:
    """Why a (stripped) API key cannot go into an Authorization header, or "" if it can; never quotes the key."""
    if not key:
        return "is empty"
    if not key.isascii() or any(c.isspace() or not c.isprintable() for c in key):
        return "contains whitespace, control or non-ASCII characters"
    return ""


def read_api_key(config: ZenMuxConfig) -> str:
    """The key itself: inline, or read (stripped) from the mounted secret file ("" when neither is set: a
    process without the resolve role needs none)."""
    if config.api_key or not config.api_key_file:
        return config.api_key
    return _read_key_file(config.api_key_file, "zenmux.api_key_file")


def _read_key_file(path: str, where: str, prefix: str = "") -> str:
    """read_key_file, its problems also naming the config key `where`."""
    try:
        return read_key_file(path, prefix)
    except ConfigError as err:
        raise ConfigError(err.source, [f"{where}: {p}" for p in err.problems]) from None


def read_key_file(path: str, prefix: str = "") -> str:
    """The (stripped) key in a mounted secret file; ConfigError naming the file otherwise (never the key)."""
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except OSError as err:
        raise ConfigError(path, [f"{path}: cannot read: {err.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(path, [f"{path}: is not UTF-8 text"]) from None
    problem = key_problem(key) or ("" if key.startswith(prefix) else f"does not start with {prefix}")
    if problem:
        raise ConfigError(path, [f"{path}: the key {problem}"])
    return key


def read_management_key(config: ReconcileConfig) -> str:
    """The management key (inline or from its file), or "" when reconciliation is off."""
    if not config.management_api_key_file:
        return config.management_api_key
    return _read_key_file(config.management_api_key_file, "reconcile.management_api_key_file", MANAGEMENT_KEY_PREFIX)


def redacted(config: Config) -> dict[str, Any]:
    """The effective config as plain data, with secrets replaced."""
    data = dataclasses.asdict(config)
    if data["zenmux"]["api_key"]:
        data["zenmux"]["api_key"] = REDACTED
    if data["reconcile"]["management_api_key"]:
        data["reconcile"]["management_api_key"] = REDACTED
    data["state"]["url"] = redacted_url(config.state.url)
    data["roles"] = list(config.roles)
    data["metrics"]["extra_labels"] = list(config.metrics.extra_labels)
    # Each source with only its own type's keys, its type first.
    data["sources"] = [
        {"type": s.type, **dataclasses.asdict(s), "labels": dict(s.labels)} for s in config.sources
    ]
    return data


def redacted_url(url: str) -> str:
    """A database URL with its password (if any) replaced, for printing."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.partition(':')[0]}:{REDACTED}@{host}"


def read_state_password(config: StateConfig) -> str | None:
    """The PostgreSQL password from state.password_file (stripped), or None (then the URL's, or none)."""
    if not config.password_file:
        return None
    where = "state.password_file"
    try:
        return Path(config.password_file).read_text(encoding="utf-8").strip()
    except OSError as err:
        raise ConfigError(where, [f"{where}: cannot read: {err.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(where, [f"{where}: is not UTF-8 text"]) from None


def instance_name(config: StateConfig) -> str:
    """This process's name among the fleet: state.instance, else $HOSTNAME (a pod's name), else the hostname."""
    return config.instance or os.environ.get("HOSTNAME") or socket.gethostname()


def state_secrets(config: StateConfig) -> list[str]:
    """The database password(s) to keep out of the logs: the URL's and the password file's."""
    from urllib.parse import unquote, urlsplit

    found = [unquote(urlsplit(config.url).password or "")] if config.url else []
    password = read_state_password(config)
    return [s for s in (*found, password) if s]
