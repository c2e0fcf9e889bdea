"""YAML configuration -> frozen dataclasses; every problem reported at once, with key paths and the file."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import yaml

from exporter.pgurl import ssl_root_cert, url_problem

LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
RESERVED_LABELS = frozenset(
    {"model", "protocol", "token_type", "fee_item", "streamed", "finish_reason", "le", "source", "job", "instance"}
)
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
REDACTED = "<redacted>"
MANAGEMENT_KEY_PREFIX = "sk-mg-"

Format = Literal["json", "regex", "plain"]
# Bounds for keys without a narrower one: past them a value is a typo, and (for integers) no longer fits the
# C int of a socket option or the SQLite integer it is stored in. Durations have ceilings of their own (below):
# a value that passes must also pass the date and time arithmetic it meets (tests/test_config_bounds.py).
MAX_NUMBER = 1e9
MAX_INT = 2**31 - 1
HOUR = 3600.0
DAY = 24 * HOUR


class ConfigError(Exception):
    """A configuration that cannot run; `problems` lists every one, each naming its key path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        listing = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration in {source}:\n{listing}")


@dataclass(frozen=True)
class Rule:
    """How one key is checked, declared on its field (`setting(...)`) and applied by `Reader.read`.

    The kind of check follows the field's type: bool, int, float (finite, within [minimum, maximum]), str
    (`${ENV}` interpolated), Literal (one of its values). An empty string where the default is empty means
    "not set" and skips the string checks; where the default is not empty (or the key is required), an empty
    string is a problem."""

    minimum: float | None = None  # None: 0 for numbers, 1 for integers
    exclusive_minimum: bool = False
    maximum: float | None = None  # None: MAX_NUMBER, MAX_INT
    normalize: Callable[[str], str] | None = None  # applied to a string before its checks
    pattern: str = ""  # the whole string must match
    pattern_problem: str = ""  # said when it does not; may quote {value!r}
    host_port: bool = False  # host:port; with check_system the host must resolve
    required: bool = False  # must be given (a default exists only to build the dataclass in code)
    check: Callable[[str], str] | None = None  # a string's problem beyond its pattern ("" if none); never quoted


def setting(default: Any, *, repr: bool = True, **rule: Any) -> Any:
    """A config field with its default and its Rule."""
    return field(default=default, repr=repr, metadata={"rule": Rule(**rule)})


NO_RULE = Rule()


@dataclass(frozen=True)
class ZenMuxConfig:
    base_url: str = setting(
        "https://zenmux.ai",
        normalize=lambda url: url.rstrip("/"),
        # The lookup URL is base_url + generation_path + "?id=...": neither part may carry a query or fragment.
        pattern=r"https?://[^/\s?#]+(/[^\s?#]*)?",
        pattern_problem="must be an http(s) URL without query or fragment, got {value!r}",
    )
    generation_path: str = setting(
        "/api/v1/management/generation",
        pattern=r"/[^\s?#]*",
        pattern_problem="must be a path starting with '/', without query or fragment, got {value!r}",
    )
    # A Secret injected as an environment variable often ends in a newline: an illegal header value.
    api_key: str = setting("", repr=False, normalize=str.strip)
    api_key_file: str = ""
    connect_timeout_seconds: float = setting(5.0, exclusive_minimum=True, maximum=300.0)
    timeout_seconds: float = setting(10.0, exclusive_minimum=True, maximum=600.0)
    concurrency: int = setting(16, maximum=1024)
    max_requests_per_second: float = setting(20.0, exclusive_minimum=True, maximum=100_000.0)
    max_response_bytes: int = setting(1024 * 1024, minimum=1024, maximum=256 * 1024 * 1024)


@dataclass(frozen=True)
class ResolveConfig:
    # 240: ZenMux bills 3-5 minutes after a generation; against the simulated API (`fake-api --billing-delay`,
    # the demos) seconds do.
    billing_delay_seconds: float = setting(240.0, maximum=DAY)
    retry_initial_seconds: float = setting(30.0, exclusive_minimum=True, maximum=DAY)
    retry_max_seconds: float = setting(300.0, exclusive_minimum=True, maximum=DAY)
    give_up_after_seconds: float = setting(3600.0, exclusive_minimum=True, maximum=30 * DAY)


@dataclass(frozen=True, kw_only=True)
class _SourceCommon:
    """What every source has: its name and how its lines are parsed."""

    name: str
    format: Format = "json"
    id_field: str = "generation_id"
    pattern: str = ""
    # Read by _labels (it needs metrics.extra_labels and the format), not by the generic reader.
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class FileSourceConfig(_SourceCommon):
    """A log file tailed across rotations (`type: file`)."""

    type: Literal["file"] = field(default="file", init=False)
    name: str = "file"
    path: str = setting("", required=True)
    start_at: Literal["end", "beginning"] = "end"
    poll_interval_seconds: float = setting(0.25, exclusive_minimum=True, maximum=60.0)
    max_line_bytes: int = setting(64 * 1024, minimum=256, maximum=64 * 1024 * 1024)
    # Where rotated copies are looked for (a glob; relative to the log's directory). "": the log's name
    # followed by anything (app.log.1, app.log.1.gz, app.log-20261203).
    rotated_glob: str = ""
    # A generation of the log (one life of its content) is known by a digest of its first bytes, as Filebeat's
    # and the OpenTelemetry filelog receiver's fingerprints are (1024 bytes there too); raise it if every file
    # begins with a longer fixed header.
    fingerprint_bytes: int = setting(1024, minimum=64, maximum=32768)
    # Checkpoints of generations no file on disk holds any more: at most this many, none older than the age
    # (what a file still on disk holds keeps its checkpoint).
    checkpoints_kept: int = setting(256, minimum=1, maximum=100_000)
    checkpoints_max_age_seconds: float = setting(7 * 24 * 3600.0, exclusive_minimum=True, maximum=10 * 365 * 86400.0)
    # On stop, what the writer left is read for this long at most: a writer appending faster than we read must
    # not hold SIGTERM. What is not read then is read at the next start, from the saved position.
    final_read_seconds: float = setting(2.0, maximum=HOUR)


@dataclass(frozen=True, kw_only=True)
class UdpSourceConfig(_SourceCommon):
    """Ids sent as UDP datagrams (`type: udp`)."""

    type: Literal["udp"] = field(default="udp", init=False)
    name: str = "udp"
    format: Format = "plain"
    listen: str = setting("127.0.0.1:9467", host_port=True)
    receive_buffer_bytes: int = setting(4 * 1024 * 1024, minimum=4096)
    max_datagram_bytes: int = setting(65507, minimum=64, maximum=65535)
    max_buffered_ids: int = setting(100_000, maximum=10_000_000)


SourceConfig = FileSourceConfig | UdpSourceConfig
SOURCE_TYPES: dict[str, type[FileSourceConfig] | type[UdpSourceConfig]] = {
    "file": FileSourceConfig,
    "udp": UdpSourceConfig,
}


@dataclass(frozen=True)
class StateConfig:
    path: str = "zenmux-exporter.db"
    dedupe_window_seconds: float = setting(7 * DAY, maximum=366 * DAY)
    max_pending: int = 2_000_000
    # Fleet mode: a postgresql:// URL selects the shared PostgreSQL state instead of the SQLite file at `path`.
    # Never quoted in a problem: it may hold a password.
    url: str = setting(
        "", repr=False, pattern=r"postgres(ql)?://\S+", pattern_problem="must be a postgresql:// URL", check=url_problem
    )
    password_file: str = ""
    # Who this process is among the fleet (file positions are kept per instance); "" = $HOSTNAME or hostname.
    instance: str = ""
    # How long a resolver's claim on a batch of ids holds before other replicas may take them over.
    lease_seconds: float = setting(60.0, minimum=1.0, maximum=HOUR)
    # Server-side bounds set on every connection: a statement runs at most this long; a lock is waited for at
    # most this long; a session idle inside a transaction (its process frozen) is ended after this, freeing
    # the rows it locked for the rest of the fleet.
    statement_timeout_seconds: float = setting(30.0, minimum=1.0, maximum=3600.0)
    lock_timeout_seconds: float = setting(2.0, minimum=0.1, maximum=3600.0)
    idle_in_transaction_timeout_seconds: float = setting(5.0, minimum=0.5, maximum=3600.0)


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = setting("0.0.0.0:9466", host_port=True)
    max_models: int = setting(200, maximum=100_000)
    max_label_values: int = setting(100, maximum=100_000)
    max_label_value_length: int = setting(128, maximum=4096)
    # Read by _extra_labels (a list of label names), not by the generic reader.
    extra_labels: tuple[str, ...] = ()
    # exporter-toolkit's web config file: TLS and/or bcrypt basic auth for /metrics (exporter/webconfig.py).
    web_config_file: str = ""
    # A second, plain listener serving only /healthz and /readyz (no TLS, no auth): for the kubelet when
    # /metrics requires client certificates, and a way in that clients of /metrics cannot exhaust. "": none.
    probe_listen: str = setting("", host_port=True)


@dataclass(frozen=True)
class TracingConfig:
    exporter: Literal["none", "console", "otlp"] = "none"
    service_name: str = "zenmux-exporter"
    sample_ratio: float = setting(1.0, maximum=1.0)


@dataclass(frozen=True)
class ShutdownConfig:
    drain_seconds: float = setting(20.0, maximum=HOUR)


@dataclass(frozen=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


ROLES = ("ingest", "resolve", "expose")


@dataclass(frozen=True)
class ReconcileConfig:
    """Reconciliation with ZenMux's account cost and PAYG balance: on when a management key is set."""

    management_api_key: str = setting("", repr=False, normalize=str.strip)
    management_api_key_file: str = ""
    poll_interval_seconds: float = setting(300.0, minimum=10.0, maximum=DAY)
    # Account requests per minute we allow ourselves: the account's 60/min is shared with its usage endpoint.
    max_requests_per_minute: int = setting(20, maximum=600)
    timeout_seconds: float = setting(30.0, exclusive_minimum=True, maximum=600.0)
    # Days of per-day, per-model ledger rows kept (in the state) for the comparison and the audit command; ten
    # years at most (a day count is date arithmetic: a million days is before year 1).
    days_kept: int = setting(35, minimum=2, maximum=3660)

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


class Reader:
    """Reads sections of a parsed YAML tree into their dataclasses by the fields' declared rules, collecting
    problems (each with its key path) instead of raising."""

    def __init__(self, environ: Mapping[str, str], *, check_system: bool = False) -> None:
        self.problems: list[str] = []
        self.failed: set[str] = set()  # key paths with a problem: cross-key checks skip them
        self.environ = environ
        # Also look at the machine: read the API key file, resolve listen addresses (load_config does).
        self.check_system = check_system

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")
        self.failed.add(path)

    def section(self, data: Mapping[str, Any], key: str) -> dict[str, Any]:
        value = data.get(key, {})
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(key, f"must be a mapping, got {type(value).__name__}")
            return {}
        return value

    def unknown_keys(self, data: Mapping[str, Any], known: set[str], path: str) -> None:
        for key in data:
            if key not in known:
                self.problem(_join(path, key), f"unknown key (known: {', '.join(sorted(known))})")

    def read(
        self, data: Mapping[str, Any], path: str, cls: type[T], *, check_unknown: bool = True, **given: Any
    ) -> T:
        """An instance of the dataclass `cls` from the mapping `data` at `path`: each field read and checked
        by its type and Rule (a key with a problem keeps its default); `given` fields are read elsewhere."""
        fields = [f for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
        if check_unknown:
            self.unknown_keys(data, {f.name for f in fields}, path)
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = dict(given)
        for f in fields:
            if f.name in given:
                continue
            rule: Rule = f.metadata.get("rule", NO_RULE)
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            where = f"{path}.{f.name}"
            if f.name in data:
                values[f.name] = self.value(data[f.name], where, hints[f.name], rule, default)
            else:
                if rule.required:
                    self.problem(where, "is required")
                values[f.name] = default
            value = values[f.name]
            if isinstance(value, str) and not value and (default or rule.required) and where not in self.failed:
                self.problem(where, "must not be empty")
                values[f.name] = default
            elif isinstance(value, str) and (value or default) and not self.check_string(value, where, rule):
                values[f.name] = default
        return cls(**values)

    def value(self, value: Any, where: str, hint: Any, rule: Rule, default: Any) -> Any:
        """`value` checked against the field's type and rule, or `default` (and a problem)."""
        if hint is bool:
            if isinstance(value, bool):
                return value
            self.problem(where, f"must be true or false, got {value!r}")
        elif hint is int:
            low = 1 if rule.minimum is None else int(rule.minimum)
            high = MAX_INT if rule.maximum is None else int(rule.maximum)
            if isinstance(value, bool) or not isinstance(value, int):
                self.problem(where, f"must be an integer, got {value!r}")
            elif not low <= value <= high:
                self.problem(where, f"must be >= {low} and <= {high}, got {value}")
            else:
                return value
        elif hint is float:
            return self.number(value, where, rule, default)
        elif hint is str:
            if isinstance(value, str):
                text = self.interpolate(value, where)
                if value and not text and where not in self.failed:
                    # `url: ${ZENMUX_STATE_URL}` with the variable empty would silently mean "not set".
                    self.problem(where, f"is empty once {', '.join(ENV_REF.findall(value))} is filled in")
                    return default
                return rule.normalize(text) if rule.normalize else text
            self.problem(where, f"must be a string, got {type(value).__name__}")
        elif typing.get_origin(hint) is Literal:
            choices = typing.get_args(hint)
            if value in choices:
                return value
            self.problem(where, f"must be one of {', '.join(map(str, choices))}, got {value!r}")
        else:
            raise TypeError(f"{where}: no reader for {hint!r}; pass it to Reader.read")
        return default

    def number(self, value: Any, where: str, rule: Rule, default: float) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(where, f"must be a number, got {value!r}")
            return default
        if not math.isfinite(value):  # YAML's .nan and .inf: a NaN delay never comes due, for one
            self.problem(where, f"must be a finite number, got {value!r}")
            return default
        minimum = 0.0 if rule.minimum is None else rule.minimum
        maximum = MAX_NUMBER if rule.maximum is None else rule.maximum
        too_small = value <= minimum if rule.exclusive_minimum else value < minimum
        if too_small or value > maximum:
            low = f"> {minimum}" if rule.exclusive_minimum else f">= {minimum}"
            self.problem(where, f"must be {low} and <= {maximum:g}, got {value!r}")
            return default
        return float(value)

    def check_string(self, value: str, where: str, rule: Rule) -> bool:
        """Whether a string passes its rule's pattern and host:port checks (a problem for each that fails)."""
        if where in self.failed:
            return True  # already reported
        if rule.pattern and not re.fullmatch(rule.pattern, value):
            self.problem(where, rule.pattern_problem.format(value=value))
        if rule.host_port:
            self.host_port(value, where)
        if rule.check and where not in self.failed and (problem := rule.check(value)):
            self.problem(where, problem)
        return where not in self.failed

    def interpolate(self, value: str, path: str) -> str:
        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in self.environ:
                self.problem(path, f"environment variable {name} is not set")
                return ""
            return self.environ[name]

        return ENV_REF.sub(replace, value)

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

    def key_file(self, key_file: str, path: str, prefix: str = "") -> None:
        """A key file's problems, listed with the others (the running exporter reads it again)."""
        try:
            read_key_file(key_file, prefix)
        except ConfigError as err:
            self.problems.extend(f"{path}: {problem}" for problem in err.problems)

    def secret_file(self, secret_file: str, path: str) -> None:
        """A password file's problems, listed with the others (never its content)."""
        try:
            _read_secret(secret_file)
        except ConfigError as err:
            self.problems.extend(f"{path}: {problem}" for problem in err.problems)


# What one key cannot say alone: checks across the keys of a section (or of sections), after the reader.


def _check_zenmux(r: Reader, data: Mapping[str, Any], zenmux: ZenMuxConfig, *, needs_key: bool) -> None:
    p = "zenmux"
    if "api_key" in data and not zenmux.api_key_file and f"{p}.api_key" not in r.failed:
        problem = key_problem(zenmux.api_key)
        if problem:
            r.problem(f"{p}.api_key", problem)
    if zenmux.api_key_file and not zenmux.api_key and r.check_system:
        r.key_file(zenmux.api_key_file, f"{p}.api_key_file")
    if zenmux.api_key and zenmux.api_key_file:
        r.problem(p, "set api_key or api_key_file, not both")
    elif "api_key" not in data and "api_key_file" not in data and needs_key:
        r.problem(p, "one of api_key or api_key_file is required (by the resolve role)")


def _check_reconcile(r: Reader, reconcile: ReconcileConfig) -> None:
    p = "reconcile"
    key, key_file = reconcile.management_api_key, reconcile.management_api_key_file
    if key and not {f"{p}.management_api_key", f"{p}.management_api_key_file"} & r.failed:
        problem = key_problem(key) or (
            "" if key.startswith(MANAGEMENT_KEY_PREFIX) else "must be a management key (sk-mg-v1-...)"
        )
        if problem:
            r.problem(f"{p}.management_api_key", problem)
    if key and key_file:
        r.problem(p, "set management_api_key or management_api_key_file, not both")
    elif key_file and r.check_system:
        r.key_file(key_file, f"{p}.management_api_key_file", MANAGEMENT_KEY_PREFIX)


@dataclass(frozen=True)
class Bound:
    """A rule across keys: `key` must be at least (`strict`: more than) what `formula`, over other keys, makes
    it, wherever `applies`. Skipped when any key it reads has a problem of its own."""

    key: str
    formula: str  # the bound as the user reads it, in key paths
    least: Callable[[Config], float]
    why: str
    keys: tuple[str, ...]  # the other keys `least` reads
    strict: bool = False
    applies: Callable[[Config], bool] = lambda config: True


def _claim_seconds(config: Config) -> float:
    """How long a resolver may hold a claimed id before its lookup ends: a batch of `concurrency` ids waits for
    the rate limit's tokens, then the last lookup may take its connect and read timeouts."""
    zenmux = config.zenmux
    return zenmux.connect_timeout_seconds + zenmux.timeout_seconds + zenmux.concurrency / zenmux.max_requests_per_second


BOUNDS = (
    Bound(
        "resolve.retry_max_seconds",
        "resolve.retry_initial_seconds",
        lambda c: c.resolve.retry_initial_seconds,
        "the backoff grows from the one to the other",
        ("resolve.retry_initial_seconds",),
    ),
    Bound(
        "resolve.give_up_after_seconds",
        "resolve.billing_delay_seconds + resolve.retry_initial_seconds",
        lambda c: c.resolve.billing_delay_seconds + c.resolve.retry_initial_seconds,
        "an id ZenMux has not billed at its first lookup needs at least one retry before it is given up, "
        "or it is counted without cost",
        ("resolve.billing_delay_seconds", "resolve.retry_initial_seconds"),
        strict=True,
    ),
    Bound(
        "state.dedupe_window_seconds",
        "resolve.give_up_after_seconds",
        lambda c: c.resolve.give_up_after_seconds,
        "an id is remembered at least as long as it may be retried, or a copy of it that arrives meanwhile "
        "(a second source, a log read again) is counted twice",
        ("resolve.give_up_after_seconds",),
    ),
    Bound(
        "state.lease_seconds",
        "zenmux.connect_timeout_seconds + zenmux.timeout_seconds + zenmux.concurrency / "
        "zenmux.max_requests_per_second",
        _claim_seconds,
        "a claim must outlast the lookups of the batch it holds, or another resolver takes over ids still "
        "being looked up and the fleet looks them up twice",
        ("zenmux.connect_timeout_seconds", "zenmux.timeout_seconds", "zenmux.concurrency",
         "zenmux.max_requests_per_second"),
        applies=lambda c: bool(c.state.url) and "resolve" in c.roles,
    ),
)


def _check_bounds(r: Reader, config: Config) -> None:
    for bound in BOUNDS:
        if not bound.applies(config) or {bound.key, *bound.keys} & r.failed:
            continue
        section, key = bound.key.split(".")
        value: float = getattr(getattr(config, section), key)
        least = bound.least(config)
        if value < least or (bound.strict and value == least):
            relation = ">" if bound.strict else ">="
            r.problem(bound.key, f"must be {relation} {bound.formula} ({least:g}), got {value:g}: {bound.why}")


def _check_state(r: Reader, data: Mapping[str, Any], state: StateConfig, roles: tuple[str, ...]) -> None:
    if state.lock_timeout_seconds > state.statement_timeout_seconds:
        r.problem("state.lock_timeout_seconds", "must be <= state.statement_timeout_seconds")
    if state.url:
        if "path" in data:
            r.problem("state", "set state.path (SQLite) or state.url (PostgreSQL), not both")
        if state.password_file and r.check_system:
            r.secret_file(state.password_file, "state.password_file")
        if r.check_system and "state.url" not in r.failed and (ca := ssl_root_cert(state.url)):
            r.secret_file(ca, "state.url (sslrootcert)")  # sslmode=verify-full without its CA mounted
    else:
        if state.password_file:
            r.problem("state.password_file", "is for state.url (PostgreSQL)")
        if roles != ROLES:
            r.problem(
                "roles",
                f"{', '.join(roles)}: a process on a local SQLite state (state.path) has every role, since a "
                "local file cannot be shared; set state.url to a PostgreSQL database to split the roles",
            )


def _source(r: Reader, data: Any, index: int, extra_labels: tuple[str, ...]) -> SourceConfig | None:
    p = f"sources[{index}]"
    if not isinstance(data, dict):
        r.problem(p, "must be a mapping")
        return None
    kind = data.get("type")
    if kind not in SOURCE_TYPES:
        r.problem(f"{p}.type", f"must be one of {', '.join(SOURCE_TYPES)}, got {kind!r}")
        return None
    cls = SOURCE_TYPES[kind]
    own = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in own:
            other = [k for k, c in SOURCE_TYPES.items() if k != kind and key in {f.name for f in dataclasses.fields(c)}]
            only = f", only a {other[0]} source has it" if other else ""
            r.problem(f"{p}.{key}", f"unknown key for a {kind} source{only} (known: {', '.join(sorted(own))})")
    source: SourceConfig = r.read(data, p, cls, check_unknown=False, labels={})
    labels = _labels(r, data.get("labels", {}) or {}, p, extra_labels, source.format)
    if source.format == "regex":
        _check_pattern(r, source.pattern, labels, p)
    return dataclasses.replace(source, labels=labels)


def _labels(r: Reader, raw: Any, p: str, extra_labels: tuple[str, ...], fmt: Format) -> dict[str, str]:
    labels: dict[str, str] = {}
    if not isinstance(raw, dict):
        r.problem(f"{p}.labels", "must be a mapping of label name to field (json) or group (regex)")
        return labels
    for name, origin in raw.items():
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
    return labels


def _check_pattern(r: Reader, pattern: str, labels: Mapping[str, str], p: str) -> None:
    if not pattern:
        r.problem(f"{p}.pattern", "is required when format is regex")
        return
    try:
        groups = re.compile(pattern).groupindex
    except re.error as err:
        r.problem(f"{p}.pattern", f"is not a valid regular expression: {err}")
        return
    if "id" not in groups:
        r.problem(f"{p}.pattern", "must have a named group (?P<id>...)")
        return
    for name, group in labels.items():
        if group not in groups:
            r.problem(f"{p}.labels.{name}", f"names group {group!r}, which the pattern does not have")


def _sources(r: Reader, data: Any, extra_labels: tuple[str, ...], *, needed: bool) -> tuple[SourceConfig, ...]:
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


def _extra_labels(r: Reader, data: dict[str, Any]) -> tuple[str, ...]:
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


def _roles(r: Reader, data: Any) -> tuple[str, ...]:
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


# The mappings of Config (sources and roles are lists).
SECTIONS = ("metrics", "zenmux", "resolve", "state", "tracing", "shutdown", "log", "reconcile")


def parse_config(
    data: Any, source: str, environ: Mapping[str, str] | None = None, *, check_system: bool = False
) -> Config:
    """Builds a Config from parsed YAML; raises ConfigError listing every problem.

    With `check_system`, also what depends on the machine: the API key file is read and checked, listen
    hosts must resolve."""
    r = Reader(os.environ if environ is None else environ, check_system=check_system)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): must be a mapping"])
    r.unknown_keys(data, {f.name for f in dataclasses.fields(Config)}, "")
    sections = {name: r.section(data, name) for name in SECTIONS}
    metrics = sections["metrics"]
    extra = _extra_labels(r, metrics)
    roles = _roles(r, data.get("roles"))
    config = Config(
        metrics=r.read(metrics, "metrics", MetricsConfig, extra_labels=extra),
        zenmux=r.read(sections["zenmux"], "zenmux", ZenMuxConfig),
        resolve=r.read(sections["resolve"], "resolve", ResolveConfig),
        sources=_sources(r, data.get("sources"), extra, needed="ingest" in roles),
        state=r.read(sections["state"], "state", StateConfig),
        tracing=r.read(sections["tracing"], "tracing", TracingConfig),
        shutdown=r.read(sections["shutdown"], "shutdown", ShutdownConfig),
        log=r.read(sections["log"], "log", LogConfig),
        reconcile=r.read(sections["reconcile"], "reconcile", ReconcileConfig),
        roles=roles,
    )
    _check_zenmux(r, sections["zenmux"], config.zenmux, needs_key="resolve" in roles)
    _check_bounds(r, config)
    _check_state(r, sections["state"], config.state, roles)
    _check_reconcile(r, config.reconcile)
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
    # The backend in use, not the other one's default: a fleet's process shows its (redacted) URL, a sidecar
    # its file.
    if config.state.url:
        data["state"]["url"] = redacted_url(config.state.url)
        del data["state"]["path"]
    else:
        del data["state"]["url"]
    data["roles"] = list(config.roles)
    data["metrics"]["extra_labels"] = list(config.metrics.extra_labels)
    # Each source with only its own type's keys, its type first.
    data["sources"] = [
        {"type": s.type, **dataclasses.asdict(s), "labels": dict(s.labels)} for s in config.sources
    ]
    return data


def url_passwords(url: str) -> list[str]:
    """The passwords a database URL carries: in its user info, and as a `password` query parameter (libpq
    takes both)."""
    from urllib.parse import parse_qs, unquote, urlsplit

    if not url:
        return []
    parts = urlsplit(url)
    found = [unquote(parts.password or ""), *parse_qs(parts.query).get("password", [])]
    return [p for p in found if p]


def redacted_url(url: str) -> str:
    """A database URL with its passwords (user info and `password=` query parameter) replaced, for printing."""
    for password in url_passwords(url):
        url = url.replace(password, REDACTED).replace(quote(password, safe=""), REDACTED)
    return url


def read_state_password(config: StateConfig) -> str | None:
    """The PostgreSQL password from state.password_file (stripped), or None (then the URL's, or none)."""
    if not config.password_file:
        return None
    try:
        return _read_secret(config.password_file)
    except ConfigError as err:
        raise ConfigError(err.source, [f"state.password_file: {p}" for p in err.problems]) from None


def _read_secret(path: str) -> str:
    """A secret file's (stripped) text; ConfigError naming the file otherwise (never its content)."""
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as err:
        raise ConfigError(path, [f"{path}: cannot read: {err.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(path, [f"{path}: is not UTF-8 text"]) from None


def instance_name(config: StateConfig) -> str:
    """This process's name among the fleet: state.instance, else $HOSTNAME (a pod's name), else the hostname."""
    return config.instance or os.environ.get("HOSTNAME") or socket.gethostname()


def state_secrets(config: StateConfig) -> list[str]:
    """The database password(s) to keep out of the logs: the URL's and the password file's."""
    password = read_state_password(config)
    return [s for s in (*url_passwords(config.url), password) if s]
