"""The benchmark harness stays runnable: its quick mode of one cheap workload produces a result row.

Speed is never asserted here; `make bench` measures it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.__main__ import main

pytestmark = pytest.mark.slow  # a benchmark workload with real processes


def test_quick_idle_workload_produces_a_row(tmp_path: Path) -> None:
    code = main(["--quick", "--only", "idle", "--results-dir", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "latest.json").read_text())
    assert not result["errors"]
    [row] = result["rows"]
    assert row["workload"] == "idle: CPU"
    assert row["figure"] >= 0
    assert result["machine"]["nproc"]


def test_against_a_revision_runs_both_and_prints_their_ratio(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--against HEAD`: a git worktree of HEAD with its own venv (built once, then reused from the cache), the
    workload run on both, each figure printed for both with their ratio."""
    code = main(["--against", "HEAD", "--quick", "--only", "idle", "--results-dir", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "latest.json").read_text())
    [ours] = result["rows"]
    [theirs] = result["against"]["rows"]
    assert ours["workload"] == theirs["workload"] == "idle: CPU"
    assert not result["against"]["errors"]
    out = capsys.readouterr().out.splitlines()
    at = next(i for i, text in enumerate(out) if text.startswith("| workload"))
    header, line = out[at], out[at + 2]
    commit = result["against"]["commit"]
    assert f"this/{commit}" in header and line.startswith("| idle: CPU")
    cells = [cell.strip() for cell in line.split("|")]
    assert cells[3].endswith("% of a core")  # REV's own figure beside ours
    if ours["figure"] and theirs["figure"]:  # a quick idle run may see no CPU tick at all: no ratio then
        assert cells[4].endswith("x") or cells[4].endswith(("(better)", "(worse)"))
