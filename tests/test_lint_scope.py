"""`make lint` covers every Python file of the repository: mypy's `files` name a directory above each one (ruff
checks the whole tree)."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SKIPPED = {".venv", ".venv-sdk-prev", ".git", ".mypy_cache", ".ruff_cache", ".pytest_cache", "build"}


def python_files() -> list[Path]:
    return [
        path.relative_to(REPO)
        for path in REPO.rglob("*.py")
        if not SKIPPED & set(path.relative_to(REPO).parts) and not path.relative_to(REPO).parts[0].endswith(".egg-info")
    ]


def test_mypy_checks_every_python_file() -> None:
    roots = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]["files"]
    files = python_files()
    assert files
    unchecked = [str(p) for p in files if not any(p.is_relative_to(root) for root in roots)]
    assert unchecked == [], "add their directory to [tool.mypy] files in pyproject.toml"
