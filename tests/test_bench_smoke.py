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
