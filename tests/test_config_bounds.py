"""Configs check-config accepts cannot make the exporter (or a fleet) misbehave: every number passes the date and
time arithmetic it meets, cross-key rules hold, and state.url is one libpq can connect with."""

from __future__ import annotations

import dataclasses
import random
import typing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.__main__ import main
from exporter.config import (
    MAX_INT,
    MAX_NUMBER,
    NO_RULE,
    SECTIONS,
    Config,
    ConfigError,
    Rule,
    parse_config,
)
from exporter.contribution import LabelLimiter, LedgerShape
from exporter.ledger import Ledger
from exporter.policy import backoff, decide
from exporter.reconcile import days_window
from exporter.records import LookupResult, Outcome
from exporter.state import PendingId

BASE: dict[str, Any] = {
    "zenmux": {"api_key": "sk-ai-v1-demo"},
    "sources": [{"type": "udp", "listen": "127.0.0.1:0"}],
}
# From now to 2100: the clock the exporter will meet.
NOW = st.floats(min_value=1.7e9, max_value=4.1e9)


def numeric_keys() -> list[tuple[str, str, type, Rule]]:
    """(section, key, int or float, rule) of every number in the config's mappings."""
    keys = []
    for section in SECTIONS:
        cls = typing.get_type_hints(Config)[section]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] in (int, float):
                keys.append((section, f.name, hints[f.name], f.metadata.get("rule", NO_RULE)))
    return keys


def number(kind: type, rule: Rule) -> st.SearchStrategy[Any]:
    """Values around and within the key's bounds, and past them (which the reader must refuse)."""
    if kind is int:
        low = 1 if rule.minimum is None else int(rule.minimum)
        high = MAX_INT if rule.maximum is None else int(rule.maximum)
        return st.one_of(st.sampled_from([low, high, high + 1, MAX_INT, 10**6]), st.integers(low, high))
    low_f = 0.0 if rule.minimum is None else rule.minimum
    high_f = MAX_NUMBER if rule.maximum is None else rule.maximum
    return st.one_of(
        st.sampled_from([low_f, high_f, high_f * 10, MAX_NUMBER, 1e-9]),
        st.floats(low_f, high_f, allow_nan=False, allow_infinity=False),
    )


@st.composite
def configs(draw: st.DrawFn) -> dict[str, Any]:
    data: dict[str, Any] = {"zenmux": dict(BASE["zenmux"]), "sources": BASE["sources"]}
    # A few keys at a time: with every key drawn, nearly every example has one out of range and stops there.
    for section, key, kind, rule in draw(st.lists(st.sampled_from(numeric_keys()), max_size=4, unique=True)):
        data.setdefault(section, {})[key] = draw(number(kind, rule))
    if draw(st.booleans()):
        data["state"] = {**data.get("state", {}), "url": "postgresql://zenmux@db:5432/zenmux"}
    return data


def exercise(config: Config, now: float, attempt: int) -> None:
    """The date and time arithmetic the config's numbers meet in the running exporter."""
    ledger = Ledger(LedgerShape(()), LabelLimiter(10, 10, 10))
    ledger.forget_daily_outside(*days_window(now, config.reconcile.days_kept))  # housekeeping
    resolve = config.resolve
    backoff(attempt, resolve.retry_initial_seconds, resolve.retry_max_seconds, random.Random(0))
    first_seen = now - resolve.billing_delay_seconds
    decide(PendingId("g", "s", (), first_seen, attempt), LookupResult(Outcome.NOT_READY), now, resolve,
           rng=random.Random(0))
    for seconds in (
        resolve.billing_delay_seconds,
        resolve.give_up_after_seconds,
        config.state.dedupe_window_seconds,
        config.state.lease_seconds,
        config.shutdown.drain_seconds,
        config.reconcile.poll_interval_seconds,
    ):
        datetime.fromtimestamp(now + seconds, UTC)  # a due time, a lease, a deadline
        datetime.fromtimestamp(now - seconds, UTC)  # the dedupe horizon, a first sighting


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=configs(), now=NOW, attempt=st.integers(0, 2**31 - 1))
def test_configs_that_pass_never_crash_the_time_arithmetic(data: dict[str, Any], now: float, attempt: int) -> None:
    try:
        config = parse_config(data, "fuzz.yaml", {}, check_system=False)
    except ConfigError as err:
        assert err.problems and all(p.split(":")[0] for p in err.problems)
        return
    exercise(config, now, attempt)


def check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> tuple[int, str, str]:
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    code = main(["check-config", "--config", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


KEY = "zenmux: {api_key: sk-ai-v1-demo}\nsources: [{type: udp}]\n"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        # Passed check-config, then raised OverflowError in housekeeping: a crash-looping pod.
        ("reconcile: {days_kept: 1000000}", "reconcile.days_kept: must be >= 2 and <= 3660, got 1000000"),
        ("resolve: {give_up_after_seconds: 1000000000}", "resolve.give_up_after_seconds: must be > 0.0 and <= 2.592e"),
        ("state: {dedupe_window_seconds: 1000000000}", "state.dedupe_window_seconds: must be >= 0.0 and <= 3.162"),
        ("zenmux: {api_key: sk-ai-v1-demo, concurrency: 100000}", "zenmux.concurrency: must be >= 1 and <= 1024"),
        ("shutdown: {drain_seconds: 86400}", "shutdown.drain_seconds: must be >= 0.0 and <= 3600"),
        # Cross-key rules.
        ("resolve: {billing_delay_seconds: 240, give_up_after_seconds: 200}",
         "resolve.give_up_after_seconds: must be > resolve.billing_delay_seconds + resolve.retry_initial_seconds "
         "(270), got 200"),
        ("resolve: {give_up_after_seconds: 7200}\nstate: {dedupe_window_seconds: 3600}",
         "state.dedupe_window_seconds: must be >= resolve.give_up_after_seconds (7200), got 3600"),
        ("resolve: {retry_initial_seconds: 30, retry_max_seconds: 10}",
         "resolve.retry_max_seconds: must be >= resolve.retry_initial_seconds (30), got 10"),
        ("roles: [resolve]\nzenmux: {api_key: sk-ai-v1-demo, timeout_seconds: 60}\n"
         "state: {url: 'postgresql://u@h/db', lease_seconds: 30}",
         "state.lease_seconds: must be >= zenmux.connect_timeout_seconds + zenmux.timeout_seconds + "
         "zenmux.concurrency / zenmux.max_requests_per_second (65.8), got 30"),
        # Required strings.
        ("sources: [{type: file, path: ''}]", "sources[0].path: must not be empty"),
        ("sources: [{type: udp, name: ''}]", "sources[0].name: must not be empty"),
        ("sources: [{type: udp, id_field: ''}]", "sources[0].id_field: must not be empty"),
        ("state: {path: ''}", "state.path: must not be empty"),
        ("tracing: {service_name: ''}", "tracing.service_name: must not be empty"),
        # A URL libpq refuses only when connecting: retried forever as an outage.
        ("state: {url: 'postgresql://u:hunter2@h:notaport/db'}", "state.url: port 'notaport' must be a number"),
        ("state: {url: 'postgresql://u:hunter2@h:70000/db'}", "state.url: port '70000' must be a number"),
        ("state: {url: 'postgresql://u:hunter2@h/db?sslmode=verify'}", "state.url: sslmode 'verify' must be one of"),
        ("state: {url: 'postgresql://u:hunter2@h/db?sslmod=require'}",
         'state.url: is not a URL libpq can read: invalid URI query parameter: "sslmod"'),
        ("state: {url: 'postgresql://u:hunter2@h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.crt'}",
         "state.url (sslrootcert): /nonexistent/ca.crt: cannot read"),
    ],
)
def test_check_config_refuses_what_would_misbehave_naming_key_and_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, problem: str
) -> None:
    given = {line.split(":")[0] for line in text.splitlines()}
    base = "".join(line + "\n" for line in KEY.splitlines() if line.split(":")[0] not in given)
    code, out, err = check_config(tmp_path, capsys, base + text)
    assert code == 2, out
    assert "given twice" not in err
    assert f"invalid configuration in {tmp_path / 'fleet.yaml'}" in err
    assert problem in err
    assert "hunter2" not in err


def test_an_empty_environment_variable_is_not_an_unset_key() -> None:
    data = {**BASE, "state": {"url": "${ZENMUX_STATE_URL}"}}
    with pytest.raises(ConfigError) as raised:
        parse_config(data, "pod.yaml", {"ZENMUX_STATE_URL": ""})
    assert "state.url: is empty once ZENMUX_STATE_URL is filled in" in raised.value.problems


def test_the_lease_rule_holds_only_where_ids_are_claimed() -> None:
    slow = {"zenmux": {"api_key": "sk-ai-v1-demo", "timeout_seconds": 60}, "state": {"lease_seconds": 30}}
    parse_config({**BASE, **slow}, "sidecar.yaml")  # SQLite: nothing is claimed under a lease
    ingest = {**slow, "roles": ["ingest"], "state": {"url": "postgresql://u@h/db", "lease_seconds": 30}}
    parse_config({**BASE, **ingest}, "ingest.yaml")


def test_check_config_prints_the_url_redacted_not_the_default_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = check_config(tmp_path, capsys, KEY + "state: {url: 'postgresql://zenmux:hunter2@db:5432/zenmux'}")
    assert code == 0
    assert "url: postgresql://zenmux:<redacted>@db:5432/zenmux" in out
    assert "path:" not in out.split("state:")[1].split("metrics:")[0]
    assert "hunter2" not in out
    code, out, _ = check_config(tmp_path, capsys, KEY + "state: {path: /var/lib/x/state.db}")
    assert code == 0
    state = out.split("state:")[1].split("metrics:")[0]
    assert "path: /var/lib/x/state.db" in state and "url:" not in state
