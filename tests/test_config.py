"""Configuration: the example stays valid, every problem is reported at once with its key path and file."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from exporter.__main__ import main
from exporter.config import ConfigError, SourceConfig, load_config, parse_config, read_api_key

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
    for key in dataclasses.fields(SourceConfig):
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
    with pytest.raises(ConfigError, match=r"zenmux\.api_key_file: cannot read"):
        read_api_key(missing.zenmux)


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
