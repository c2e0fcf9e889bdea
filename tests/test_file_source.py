"""The file tailer driven poll by poll on real files: positions, truncation, overlong lines, backpressure."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from exporter.clock import ManualClock
from exporter.config import SourceConfig
from exporter.ids import parser_for
from exporter.ingest import Ingest
from exporter.sources.file import FileSource
from exporter.state import StateStore
from exporter.telemetry import SelfMetrics
from tests.support import append_lines, json_line


class Tail:
    """A FileSource with its own state database and registry, polled by hand."""

    def __init__(self, tmp_path: Path, *, max_pending: int = 1000, max_line_bytes: int = 65536) -> None:
        self.log = tmp_path / "app.log"
        self.registry = CollectorRegistry()
        self.state = StateStore(tmp_path / "state.db", max_pending=max_pending)
        self.config = SourceConfig(
            type="file", name="app", path=str(self.log), start_at="beginning", max_line_bytes=max_line_bytes
        )
        metrics = SelfMetrics(self.registry)
        self.ingest = Ingest(self.state, metrics, ManualClock(), billing_delay_seconds=0)
        self.source = FileSource(self.config, parser_for(self.config), self.ingest, self.state, metrics)
        self.source.open_initial()

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, {"source": "app", **labels}) or 0.0

    def drain(self) -> None:
        while self.source.poll():
            pass


def test_ids_and_position_are_saved_together(tmp_path: Path) -> None:
    tail = Tail(tmp_path)
    append_lines(tail.log, [json_line(f"id{i}") for i in range(5)])
    tail.drain()
    assert tail.state.pending == 5
    position = tail.state.position("app")
    assert position is not None and position.offset == tail.log.stat().st_size


def test_a_partial_line_waits_for_its_newline(tmp_path: Path) -> None:
    tail = Tail(tmp_path)
    tail.log.write_text(json_line("first") + "\n" + json_line("second")[:20])
    tail.drain()
    assert tail.state.pending == 1
    with tail.log.open("a") as handle:
        handle.write(json_line("second")[20:] + "\n")
    tail.drain()
    assert tail.state.pending == 2
    assert tail.state.status("second") == 0


def test_truncated_and_refilled_past_the_offset_is_read_from_the_start(tmp_path: Path) -> None:
    tail = Tail(tmp_path)
    append_lines(tail.log, [json_line(f"old{i}") for i in range(3)])
    tail.drain()
    # Between two polls the file is truncated and refilled beyond the old offset: only its head tells.
    tail.log.write_text("".join(json_line(f"new{i}", "other") + "\n" for i in range(10)))
    tail.drain()
    assert tail.state.pending == 13
    assert tail.metric("zenmux_exporter_file_rotations_total", kind="truncate") == 1


def test_an_overlong_line_without_newline_is_skipped_in_bounded_memory(tmp_path: Path) -> None:
    tail = Tail(tmp_path, max_line_bytes=1024)
    with tail.log.open("wb") as handle:
        handle.write(b"x" * (3 * 1024 * 1024 + 17))  # several read chunks, no newline
    tail.drain()
    with tail.log.open("ab") as handle:
        handle.write(b"tail of the long line\n" + json_line("after").encode() + b"\n")
    tail.drain()
    assert tail.state.status("after") == 0
    assert tail.state.pending == 1
    assert tail.metric("zenmux_exporter_ids_rejected_total", reason="line_too_long") == 1


def test_a_full_queue_holds_the_file_back_instead_of_dropping(tmp_path: Path) -> None:
    tail = Tail(tmp_path, max_pending=3)
    append_lines(tail.log, [json_line(f"id{i}") for i in range(3)])
    tail.drain()
    append_lines(tail.log, [json_line("waiting")])
    tail.drain()
    assert tail.state.status("waiting") is None
    position = tail.state.position("app")
    assert position is not None and position.offset < tail.log.stat().st_size


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_crlf_and_blank_lines(tmp_path: Path, newline: str) -> None:
    tail = Tail(tmp_path)
    tail.log.write_text(newline.join([json_line("a"), "", "   ", json_line("b"), ""]), newline="")
    tail.drain()
    assert tail.state.pending == 2
