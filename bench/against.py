"""The exporter builds a benchmark runs: this checkout, and for `--against REV` a git worktree of REV with its own venv.

The worktree and the venv are kept under the cache directory (`$ZENMUX_BENCH_CACHE`, else
`$XDG_CACHE_HOME/zenmux-bench`, else `~/.cache/zenmux-bench`) and reused: the worktree by commit, the venv by a
hash of REV's pyproject.toml, so a venv is rebuilt only when the revision's dependencies change. The venv holds
only the dependencies; REV's own `exporter` package runs from its worktree (PYTHONPATH), so two revisions with
the same dependencies share one venv.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Build:
    """One exporter under test: which interpreter runs which checkout's `exporter` package."""

    name: str
    python: str
    root: Path

    def env(self) -> dict[str, str]:
        return {"PYTHONPATH": str(self.root)}


def this_build() -> Build:
    return Build("this", sys.executable, ROOT)


def cache_dir() -> Path:
    explicit = os.environ.get("ZENMUX_BENCH_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "zenmux-bench"


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def checkout(rev: str, cache: Path) -> tuple[str, Path]:
    """A detached git worktree of `rev` (reused if it is already there); returns (full commit, its path)."""
    commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    path = cache / "worktrees" / commit
    if not (path / "exporter" / "__init__.py").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        _git("worktree", "prune")  # a worktree whose directory was deleted from the cache
        _log(f"git worktree of {commit[:12]} in {path}")
        _git("worktree", "add", "--force", "--detach", str(path), commit)
    return commit, path


def venv(root: Path, cache: Path, extra: tuple[str, ...] = ()) -> Path:
    """A venv with `root`'s runtime dependencies (from its pyproject.toml) and `extra`, keyed by their hash."""
    pyproject = (root / "pyproject.toml").read_bytes()
    key = hashlib.sha256(pyproject + sys.version.encode() + repr(extra).encode()).hexdigest()[:16]
    path = cache / "venvs" / key
    python = path / "bin" / "python"
    marker = path / ".installed"
    if not marker.exists():
        dependencies = [*tomllib.loads(pyproject.decode())["project"]["dependencies"], *extra]
        _log(f"venv {path} ({len(dependencies)} dependencies)")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True)
        # The benchmark's own helpers that run inside the revision (its bench/ and tests/support.py) need pytest
        # only to be importable.
        subprocess.run([str(python), "-m", "pip", "install", "-q", *dependencies, "pytest"], check=True)
        marker.write_text(key + "\n")
    return python


def byte_compile(build: Build) -> None:
    """Byte-compiles the build's `exporter` package, as the image's `pip install` does: with
    PYTHONDONTWRITEBYTECODE set, every exporter start would otherwise compile it again, which no deployment does
    (0.1-0.2 s of each restart)."""
    subprocess.run([build.python, "-m", "compileall", "-q", str(build.root / "exporter")], check=True,
                   stdout=subprocess.DEVNULL)


def against(rev: str) -> Build:
    cache = cache_dir()
    commit, root = checkout(rev, cache)
    return Build(commit[:7], str(venv(root, cache)), root)


# The API peer's server (bench/fakeapi.py): kept out of the project's venv, where google-genai would use it.
PEER_PACKAGES = ("aiohttp>=3.9,<4",)


def peer_build() -> Build:
    """This checkout's code with aiohttp beside its dependencies: what runs the benchmark's API peer."""
    return Build("peer", str(venv(ROOT, cache_dir(), PEER_PACKAGES)), ROOT)
