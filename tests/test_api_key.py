"""The API key as configured: inline, from the environment or from a file; whitespace around it is stripped, a key
that is empty or has whitespace inside is a config problem whose message never quotes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from exporter.config import ConfigError, parse_config, read_api_key

KEY = "sk-ai-v1-0123456789abcdef-secret"


def zenmux_config(**zenmux: Any) -> dict[str, Any]:
    return {"zenmux": zenmux, "sources": [{"type": "udp"}]}


def test_an_env_injected_key_is_stripped_of_its_trailing_newline() -> None:
    config = parse_config(zenmux_config(api_key="${ZENMUX_API_KEY}"), "x", {"ZENMUX_API_KEY": KEY + "\n"})
    assert config.zenmux.api_key == KEY
    assert read_api_key(config.zenmux) == KEY
    assert parse_config(zenmux_config(api_key=f"  {KEY}\r\n"), "x", {}).zenmux.api_key == KEY


@pytest.mark.parametrize(
    "key", ["", "  \n", "${EMPTY}", "sk-ai-v1-with space", "sk-ai-v1-\x00nul", "${TABBED}", "sk-ai-v1-nul\u00e9"]
)
def test_an_empty_or_whitespace_inline_key_is_a_config_problem(key: str) -> None:
    environ = {"EMPTY": "", "TABBED": "sk-ai-v1-\tsecret-part"}
    with pytest.raises(ConfigError) as caught:
        parse_config(zenmux_config(api_key=key), "x", environ)
    message = str(caught.value)
    assert "zenmux.api_key:" in message
    assert "secret-part" not in message and "with space" not in message and "nul" not in message


@pytest.mark.parametrize("content", ["", " \n\n", "sk-ai-v1-secret part\n", "sk-ai-v1-secret\x07part"])
def test_an_empty_or_whitespace_key_file_is_refused_without_quoting_it(tmp_path: Path, content: str) -> None:
    secret = tmp_path / "key"
    secret.write_text(content)
    config = parse_config(zenmux_config(api_key_file=str(secret)), "x", {})
    with pytest.raises(ConfigError) as caught:
        read_api_key(config.zenmux)
    message = str(caught.value)
    assert "zenmux.api_key_file:" in message
    assert "part" not in message


def test_a_key_file_with_a_trailing_newline_is_fine(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text(KEY + "\n")
    config = parse_config(zenmux_config(api_key_file=str(secret)), "x", {})
    assert read_api_key(config.zenmux) == KEY
