"""Configuration: the example stays valid, every problem is reported at once with its key path and file."""

from __future__ import annotations

import dataclasses
import re
import socket
from pathlib import Path
from typing import Literal

import pytest
from prometheus_client import CollectorRegistry

from exporter.__main__ import main
from exporter.clock import ManualClock
from exporter.config import (
    ConfigError,
    FileSourceConfig,
    Reader,
    UdpSourceConfig,
    load_config,
    parse_config,
    read_api_key,
    redacted,
    setting,
)
from exporter.ids import datagrams_parser_for
from exporter.ingest import Ingest
from exporter.sources.udp import UdpSource
from exporter.state import StateStore
from exporter.telemetry import SelfMetrics
from tests.support import FakeApi, StartExporter, make_config

ROOT = Path(__file__).resolve().parent.parent
SECRET = "sk-ai-v1-0123456789abcdef-secret"


def test_example_config_is_valid_and_documents_every_key() -> None:
    config = load_config(ROOT / "config.example.yaml", {"ZENMUX_API_KEY": SECRET})
    assert config.zenmux.api_key == SECRET
    assert [s.type for s in config.sources] == ["file", "udp"]
    assert config.metrics.extra_labels == ("feature",)
    text = (ROOT / "config.example.yaml").read_text()
    documented = set(re.findall(r"^\s*#?\s*-?\s*([a-z_]+):", text, re.MULTILINE))
    for section in dataclasses.fields(config):
        assert section.name in documented
        if dataclasses.is_dataclass(getattr(config, section.name)):  # not sources, roles (lists)
            for key in dataclasses.fields(getattr(config, section.name)):
                assert key.name in documented, f"{section.name}.{key.name} is not in config.example.yaml"
    for kind in (FileSourceConfig, UdpSourceConfig):
        for key in dataclasses.fields(kind):
            assert key.name in documented, f"sources[].{key.name} is not in config.example.yaml"


def test_every_problem_is_listed_with_key_path_and_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        """
zenmux:
  base_url: ftp://nowhere
  api_key: ${NOT_SET_ANYWHERE}
  concurrency: 0
  timeout: 3
resolve:
  retry_initial_seconds: 10
  retry_max_seconds: 5
sources:
  - type: file
    format: regex
    pattern: "no named group"
    labels: {team: team}
  - type: udp
    listen: "nowhere"
  - type: carrier-pigeon
metrics:
  extra_labels: [model, "bad-name"]
tracing:
  exporter: jaeger
"""
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    message = str(caught.value)
    assert str(path) in message
    expected = [
        "zenmux.base_url",
        "zenmux.api_key: environment variable NOT_SET_ANYWHERE is not set",
        "zenmux.concurrency",
        "zenmux.timeout: unknown key",
        "resolve.retry_max_seconds",
        "sources[0].path: is required",
        "sources[0].pattern: must have a named group",
        "sources[0].labels.team: must also be listed in metrics.extra_labels",
        "sources[1].listen: must be host:port",
        "sources[2].type",
        "metrics.extra_labels[0]: 'model' is reserved",
        "metrics.extra_labels[1]",
        "tracing.exporter",
    ]
    for fragment in expected:
        assert fragment in message, fragment
    assert len(caught.value.problems) == len(expected)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"zenmux": {"api_key": "k"}}, "sources: needs at least one source"),
        ({"zenmux": {}, "sources": [{"type": "udp"}]}, "zenmux: one of api_key or api_key_file is required"),
        (
            {"zenmux": {"api_key": "k", "api_key_file": "/f"}, "sources": [{"type": "udp"}]},
            "set api_key or api_key_file, not both",
        ),
        (
            {"zenmux": {"api_key": "k"}, "sources": [{"type": "udp"}, {"type": "udp"}]},
            "sources[1].name: duplicate source name 'udp'",
        ),
        (
            {"zenmux": {"api_key": "k"}, "sources": [{"type": "udp", "path": "/x"}]},
            "sources[0].path: unknown key",
        ),
        ({"zenmux": {"api_key": "k"}, "sources": [{"type": "udp"}], "metrics": {"max_models": "ten"}}, "max_models"),
        ([1, 2], "(top level): must be a mapping"),
        (
            {"zenmux": {"api_key": "k"}, "sources": [{"type": "udp", "listen": "127.0.0.1:\u00b2"}]},
            "sources[0].listen: must be host:port",
        ),
        (
            {"zenmux": {"api_key": "k"}, "sources": [{"type": "udp"}], "metrics": {"probe_listen": "9468"}},
            "metrics.probe_listen: must be host:port",
        ),
        (
            {"zenmux": {"api_key": "k", "generation_path": "/api/v1/generation?x=1"}, "sources": [{"type": "udp"}]},
            "zenmux.generation_path: must be a path starting with '/', without query or fragment",
        ),
        (
            {"zenmux": {"api_key": "k", "base_url": "https://zenmux.ai/?x=1"}, "sources": [{"type": "udp"}]},
            "zenmux.base_url: must be an http(s) URL without query or fragment",
        ),
    ],
)
def test_single_problems(data: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "inline.yaml", {})
    assert fragment in str(caught.value)


def test_api_key_from_a_mounted_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "api-key"
    secret.write_text(SECRET + "\n")
    config = parse_config({"zenmux": {"api_key_file": str(secret)}, "sources": [{"type": "udp"}]}, "x", {})
    assert read_api_key(config.zenmux) == SECRET
    missing = parse_config({"zenmux": {"api_key_file": str(tmp_path / "no")}, "sources": [{"type": "udp"}]}, "x", {})
    with pytest.raises(ConfigError, match=r"zenmux\.api_key_file: .*/no: cannot read") as caught:
        read_api_key(missing.zenmux)
    assert caught.value.source == str(tmp_path / "no")


def test_check_config_prints_the_effective_config_without_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZENMUX_API_KEY", SECRET)
    assert main(["check-config", "--config", str(ROOT / "config.example.yaml")]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "<redacted>" in out and "generation_path: /api/v1/management/generation" in out
    assert SECRET not in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("zenmux: {api_key: x}\nsources: [{type: file}]\n")
    assert main(["check-config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "sources[0].path: is required" in err and str(bad) in err


FILE_ONLY = {"path", "start_at", "poll_interval_seconds", "max_line_bytes", "rotated_glob"}
UDP_ONLY = {"listen", "receive_buffer_bytes", "max_datagram_bytes", "max_buffered_ids"}


def test_file_and_udp_sources_are_distinct_types_with_only_their_own_keys() -> None:
    config = load_config(ROOT / "config.example.yaml", {"ZENMUX_API_KEY": SECRET})
    file, udp = config.sources
    assert isinstance(file, FileSourceConfig) and isinstance(udp, UdpSourceConfig)
    printed_file, printed_udp = redacted(config)["sources"]
    assert printed_file["type"] == "file" and printed_file.keys() >= FILE_ONLY and not UDP_ONLY & printed_file.keys()
    assert printed_udp["type"] == "udp" and printed_udp.keys() >= UDP_ONLY and not FILE_ONLY & printed_udp.keys()


@pytest.mark.parametrize(
    ("kind", "key"), [("file", k) for k in sorted(UDP_ONLY)] + [("udp", k) for k in sorted(FILE_ONLY)]
)
def test_a_key_of_the_other_source_type_is_an_error_naming_it(kind: str, key: str) -> None:
    other = "udp" if kind == "file" else "file"
    source = {"type": kind, "path": "/x"} if kind == "file" else {"type": kind}
    with pytest.raises(ConfigError) as caught:
        parse_config({"zenmux": {"api_key": "k"}, "sources": [{**source, key: 1}]}, "inline.yaml", {})
    (problem,) = caught.value.problems
    assert problem.startswith(f"sources[0].{key}: unknown key for a {kind} source, only a {other} source has it")


def test_check_config_prints_each_source_with_its_own_keys(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZENMUX_API_KEY", SECRET)
    assert main(["check-config", "--config", str(ROOT / "config.example.yaml")]) == 0
    out = capsys.readouterr().out
    sources = out[out.index("sources:") :].split("\n- ")
    file_part = next(part for part in sources if "type: file" in part)
    assert "rotated_glob:" in file_part and "listen:" not in file_part and "receive_buffer_bytes" not in file_part


@dataclasses.dataclass(frozen=True)
class Knobs:
    enabled: bool = False
    ratio: float = setting(0.5, maximum=1.0)
    mode: Literal["a", "b"] = "a"
    listen: str = setting("", host_port=True)


@pytest.mark.parametrize(
    ("data", "expected", "problems"),
    [
        ({}, Knobs(), []),
        ({"enabled": True, "ratio": 1, "mode": "b", "listen": ":1"}, Knobs(True, 1.0, "b", ":1"), []),
        # A bool is checked like any other key, not silently left at its default.
        ({"enabled": "yes"}, Knobs(), ["knobs.enabled: must be true or false, got 'yes'"]),
        ({"enabled": 1}, Knobs(), ["knobs.enabled: must be true or false, got 1"]),
        (
            {"ratio": 2, "mode": "c", "listen": "x", "other": 1},
            Knobs(),
            [
                "knobs.other: unknown key (known: enabled, listen, mode, ratio)",
                "knobs.ratio: must be >= 0.0 and <= 1, got 2",
                "knobs.mode: must be one of a, b, got 'c'",
                "knobs.listen: must be host:port, got 'x'",
            ],
        ),
    ],
)
def test_the_reader_applies_each_fields_declared_rule(
    data: dict[str, object], expected: Knobs, problems: list[str]
) -> None:
    reader = Reader({})
    assert reader.read(data, "knobs", Knobs) == expected
    assert reader.problems == problems


def test_unreadable_and_unparsable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("zenmux: [unclosed\n")
    with pytest.raises(ConfigError, match=r"\(yaml\)"):
        load_config(broken)


def test_probe_listen_is_optional() -> None:
    base = {"zenmux": {"api_key": "k"}, "sources": [{"type": "udp"}]}
    assert parse_config(base, "inline.yaml", {}).metrics.probe_listen == ""
    config = parse_config({**base, "metrics": {"probe_listen": "0.0.0.0:9468"}}, "inline.yaml", {})
    assert config.metrics.probe_listen == "0.0.0.0:9468"


UDP = {"type": "udp"}


def with_key(**sections: object) -> dict[str, object]:
    return {"zenmux": {"api_key": "k"}, "sources": [UDP], **sections}


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (with_key(resolve={"billing_delay_seconds": float("nan")}), "resolve.billing_delay_seconds: must be a finite"),
        (with_key(resolve={"give_up_after_seconds": float("inf")}), "resolve.give_up_after_seconds: must be a finite"),
        (with_key(resolve={"retry_initial_seconds": float("-inf")}), "resolve.retry_initial_seconds: must be a finite"),
        (with_key(zenmux={"api_key": "k", "timeout_seconds": float("nan")}), "zenmux.timeout_seconds: must be a fin"),
        (with_key(shutdown={"drain_seconds": float("inf")}), "shutdown.drain_seconds: must be a finite"),
        (with_key(state={"dedupe_window_seconds": float("nan")}), "state.dedupe_window_seconds: must be a finite"),
        (with_key(tracing={"sample_ratio": float("nan")}), "tracing.sample_ratio: must be a finite"),
        (with_key(tracing={"sample_ratio": 1.5}), "tracing.sample_ratio: must be >= 0.0 and <= 1, got 1.5"),
        (with_key(resolve={"billing_delay_seconds": 1e300}), "resolve.billing_delay_seconds: must be >= 0.0 and <="),
        (
            {"zenmux": {"api_key": "k"}, "sources": [{"type": "file", "path": "/x", "poll_interval_seconds": 1e999}]},
            "sources[0].poll_interval_seconds: must be a finite",
        ),
        (
            {"zenmux": {"api_key": "k"}, "sources": [{"type": "udp", "receive_buffer_bytes": 2**40}]},
            "sources[0].receive_buffer_bytes: must be >= 4096 and <= 2147483647",
        ),
        (
            {"zenmux": {"api_key": "k"}, "sources": [{"type": "udp", "max_datagram_bytes": 70000}]},
            "sources[0].max_datagram_bytes: must be >= 64 and <= 65535",
        ),
        (with_key(state={"max_pending": 0}), "state.max_pending: must be >= 1"),
        (with_key(zenmux={"api_key": "k", "concurrency": True}), "zenmux.concurrency: must be an integer"),
        # The index is the source's place in the file, even when an earlier entry did not parse.
        (
            {"zenmux": {"api_key": "k"}, "sources": [{"type": "pigeon"}, {"type": "udp"}, {"type": "udp"}]},
            "sources[2].name: duplicate source name 'udp' (also sources[1])",
        ),
        (
            {"zenmux": {"api_key": "k"}, "sources": [{"type": "udp", "name": "a"}, "x", {"type": "udp", "name": "a"}]},
            "sources[2].name: duplicate source name 'a' (also sources[0])",
        ),
    ],
)
def test_numbers_must_be_finite_and_in_range_and_names_unique(data: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "inline.yaml", {})
    assert any(problem.startswith(fragment) for problem in caught.value.problems), caught.value.problems


HEAD = "zenmux: {api_key: k}\n"
ONE_UDP = "sources: [{type: udp}]\n"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (HEAD + ONE_UDP + "resolve:\n  billing_delay_seconds: .nan\n",
         "resolve.billing_delay_seconds: must be a finite number, got nan"),
        (HEAD + ONE_UDP + "resolve:\n  give_up_after_seconds: .inf\n",
         "resolve.give_up_after_seconds: must be a finite number, got inf"),
        (ONE_UDP + "zenmux:\n  api_key: k\n  concurrency: 4\n  concurrency: 8\n",
         "zenmux.concurrency: given twice (lines 4 and 5); the second would silently win"),
        (HEAD + ONE_UDP + "resolve: {}\nresolve: {}\n", "resolve: given twice (lines 3 and 4)"),
        (HEAD + "sources:\n  - type: udp\n    name: a\n    name: b\n", "sources[0].name: given twice (lines 4 and 5)"),
        (HEAD + ONE_UDP + "metrics:\n  listen: no-such-host.invalid:9466\n",
         "metrics.listen: host 'no-such-host.invalid' does not resolve"),
        (HEAD + "sources:\n  - type: udp\n    listen: no-such-host.invalid:9467\n",
         "sources[0].listen: host 'no-such-host.invalid' does not resolve"),
    ],
)
def test_file_problems_name_the_key_path_and_the_file(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert str(path) in str(caught.value)
    assert len(caught.value.problems) == 1 and caught.value.problems[0].startswith(problem), caught.value.problems


def test_duplicate_keys_are_listed_with_every_other_problem(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        HEAD + "sources: [{type: udp, listen: x}]\nresolve: {retry_max_seconds: 60, retry_max_seconds: 90}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert [p.split(":")[0] for p in caught.value.problems] == ["resolve.retry_max_seconds", "sources[0].listen"]


def test_listen_addresses_that_resolve_pass(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "zenmux: {api_key: k}\n"
        "sources: [{type: udp, listen: 'localhost:0'}, {type: udp, name: six, listen: '[::1]:0'}]\n"
        "metrics: {listen: ':9466'}\n",
        encoding="utf-8",
    )
    config = load_config(path, {})
    assert [s.listen for s in config.sources if isinstance(s, UdpSourceConfig)] == ["localhost:0", "[::1]:0"]


def test_a_config_file_that_is_not_utf8_is_reported_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("zenmux: {api_key: k}\n# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert caught.value.problems == ["(file): not UTF-8 text (byte 26: 0xe9); save it as UTF-8"]
    assert main(["check-config", "--config", str(path)]) == 2
    assert str(path) in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "cannot read: No such file or directory"),
        (b"\xff\xfe", "is not UTF-8 text"),
        (b"  \n", "the key is empty"),
        (b"sk-ai v1\n", "the key contains whitespace"),
    ],
)
def test_api_key_file_problems_name_both_files_and_come_with_the_others(
    tmp_path: Path, content: bytes | None, fragment: str
) -> None:
    key_file = tmp_path / "api-key"
    if content is not None:
        key_file.write_bytes(content)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"zenmux: {{api_key_file: '{key_file}', concurrency: 0}}\nsources: [{{type: udp}}]\n", encoding="utf-8"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config, {})
    problems = caught.value.problems
    assert f"zenmux.api_key_file: {key_file}: " + fragment in problems[0] or any(
        p.startswith(f"zenmux.api_key_file: {key_file}: {fragment}") for p in problems
    ), problems
    assert any(p.startswith("zenmux.concurrency") for p in problems), problems  # listed together
    assert str(config) in str(caught.value)
    assert "sk-ai" not in str(caught.value)  # the key itself is never quoted


def test_every_secret_file_problem_is_listed_at_once_naming_its_key_and_file(tmp_path: Path) -> None:
    api_key = tmp_path / "api-key"  # missing
    management_key = tmp_path / "mg-key"
    management_key.write_text("sk-ai-v1-not-a-management-key\n")
    password = tmp_path / "pg-password"
    password.write_bytes(b"\xff\xfe")
    config = tmp_path / "config.yaml"
    config.write_text(
        f"zenmux: {{api_key_file: '{api_key}'}}\nsources: [{{type: udp}}]\n"
        f"reconcile: {{management_api_key_file: '{management_key}'}}\n"
        f"state: {{url: 'postgresql://zenmux@db/zenmux', password_file: '{password}'}}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config, {})
    problems = caught.value.problems
    assert any(p.startswith(f"zenmux.api_key_file: {api_key}: cannot read") for p in problems), problems
    assert any(p.startswith(f"reconcile.management_api_key_file: {management_key}: the key does not start with")
               for p in problems), problems
    assert f"state.password_file: {password}: is not UTF-8 text" in problems, problems
    assert str(config) in str(caught.value)
    assert "not-a-management-key" not in str(caught.value)


async def test_udp_bind_error_names_the_source_and_the_address(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        config = UdpSourceConfig(name="edge", format="plain", listen=listen)
        state = StateStore(tmp_path / "state.db", max_pending=10)
        metrics = SelfMetrics(CollectorRegistry())
        source = UdpSource(config, datagrams_parser_for(config), Ingest(state, metrics, ManualClock(), 0), metrics)
        try:
            with pytest.raises(OSError, match=f"source edge: cannot listen on udp {listen}: Address already in use"):
                await source.start()
        finally:
            await state.close()


async def test_metrics_bind_error_names_the_key_and_the_address(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        config = make_config(tmp_path, fake_api.url, metrics={"listen": listen})
        with pytest.raises(OSError, match=f"metrics.listen {listen}: cannot listen: .*in use"):
            await start_exporter(config)
