"""The file tailer driven poll by poll on real files: positions, truncation, overlong lines, backpressure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from exporter.clock import ManualClock
from exporter.config import SourceConfig
from exporter.ids import lines_parser_for
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
        self.source = FileSource(self.config, lines_parser_for(self.config), self.ingest, self.state, metrics)

    @classmethod
    async def open(cls, tmp_path: Path, *, max_pending: int = 1000, max_line_bytes: int = 65536) -> Tail:
        tail = cls(tmp_path, max_pending=max_pending, max_line_bytes=max_line_bytes)
        await tail.source.open_initial()
        return tail

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, {"source": "app", **labels}) or 0.0

    async def drain(self) -> None:
        while await self.source.poll():
            pass


async def test_ids_and_position_are_saved_together(tmp_path: Path) -> None:
    tail = await Tail.open(tmp_path)
    append_lines(tail.log, [json_line(f"id{i}") for i in range(5)])
    await tail.drain()
    assert tail.state.pending == 5
    position = await tail.state.position("app")
    assert position is not None and position.offset == tail.log.stat().st_size


async def test_a_partial_line_waits_for_its_newline(tmp_path: Path) -> None:
    tail = await Tail.open(tmp_path)
    tail.log.write_text(json_line("first") + "\n" + json_line("second")[:20])
    await tail.drain()
    assert tail.state.pending == 1
    with tail.log.open("a") as handle:
        handle.write(json_line("second")[20:] + "\n")
    await tail.drain()
    assert tail.state.pending == 2
    assert await tail.state.status("second") == 0


async def test_truncated_and_refilled_past_the_offset_is_read_from_the_start(tmp_path: Path) -> None:
    tail = await Tail.open(tmp_path)
    append_lines(tail.log, [json_line(f"old{i}") for i in range(3)])
    await tail.drain()
    # Between two polls the file is truncated and refilled beyond the old offset: only its head tells.
    tail.log.write_text("".join(json_line(f"new{i}", "other") + "\n" for i in range(10)))
    await tail.drain()
    assert tail.state.pending == 13
    assert tail.metric("zenmux_exporter_file_rotations_total", kind="truncate") == 1


async def test_a_file_refilled_to_the_same_size_is_read_again(tmp_path: Path) -> None:
    tail = await Tail.open(tmp_path)
    append_lines(tail.log, [json_line(f"old{i}") for i in range(3)])
    await tail.drain()
    assert not await tail.source.poll()  # read to the end: later polls of the unchanged file skip it
    before = tail.log.stat()
    # Copied and truncated, then refilled to exactly the old size; only its times and head tell.
    tail.log.write_text("".join(json_line(f"new{i}") + "\n" for i in range(3)))
    assert tail.log.stat().st_size == before.st_size
    os.utime(tail.log, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))  # coarse clocks: a later mtime
    await tail.drain()
    assert tail.state.pending == 6
    assert tail.metric("zenmux_exporter_file_rotations_total", kind="truncate") == 1


async def test_an_overlong_line_without_newline_is_skipped_in_bounded_memory(tmp_path: Path) -> None:
    tail = await Tail.open(tmp_path, max_line_bytes=1024)
    with tail.log.open("wb") as handle:
        handle.write(b"x" * (3 * 1024 * 1024 + 17))  # several read chunks, no newline
    await tail.drain()
    with tail.log.open("ab") as handle:
        handle.write(b"tail of the long line\n" + json_line("after").encode() + b"\n")
    await tail.drain()
    assert await tail.state.status("after") == 0
    assert tail.state.pending == 1
    assert tail.metric("zenmux_exporter_ids_rejected_total", reason="line_too_long") == 1


async def test_a_full_queue_holds_the_file_back_instead_of_dropping(tmp_path: Path) -> None:
    tail = await Tail.open(tmp_path, max_pending=3)
    append_lines(tail.log, [json_line(f"id{i}") for i in range(3)])
    await tail.drain()
    append_lines(tail.log, [json_line("waiting")])
    await tail.drain()
    assert await tail.state.status("waiting") is None
    position = await tail.state.position("app")
    assert position is not None and position.offset < tail.log.stat().st_size


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
async def test_crlf_and_blank_lines(tmp_path: Path, newline: str) -> None:
    tail = await Tail.open(tmp_path)
    tail.log.write_text(newline.join([json_line("a"), "", "   ", json_line("b"), ""]), newline="")
    await tail.drain()
    assert tail.state.pending == 2


async def test_a_full_queue_never_drops_file_ids(tmp_path: Path) -> None:
    tail = await Tail.open(tmp_path, max_pending=10)
    append_lines(tail.log, [json_line(f"id{i}") for i in range(100)])
    await tail.drain()  # one chunk may pass the bound; nothing in it is rejected
    assert tail.state.pending == 100
    assert tail.metric("zenmux_exporter_ids_rejected_total", reason="queue_full") == 0
    append_lines(tail.log, [json_line("later")])
    await tail.drain()
    assert await tail.state.status("later") is None  # waits in the file, position before it
    position = await tail.state.position("app")
    assert position is not None and position.offset < tail.log.stat().st_size


async def test_lines_appended_to_the_renamed_file_after_rotation_are_read(tmp_path: Path) -> None:
    tail = await Tail.open(tmp_path)
    append_lines(tail.log, [json_line("before")])
    await tail.drain()
    rotated = tmp_path / "app.log.1"
    tail.log.rename(rotated)
    append_lines(tail.log, [json_line("in-new-file")])
    await tail.source.poll()  # the rotation is seen; the writer has not reopened its log yet
    with rotated.open("a") as old:
        old.write(json_line("late-in-old")[:30])
    await tail.source.poll()
    with rotated.open("a") as old:
        old.write(json_line("late-in-old")[30:] + "\n" + json_line("last-in-old"))  # the last line lacks "\n"
    for _ in range(8):
        await tail.source.poll()
    for generation_id in ("before", "late-in-old", "last-in-old", "in-new-file"):
        assert await tail.state.status(generation_id) == 0, generation_id
    assert tail.state.pending == 4
    assert tail.metric("zenmux_exporter_file_rotations_total", kind="rename") == 1


async def test_start_at_end_begins_after_the_last_complete_line(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text(json_line("history") + "\n" + json_line("being-written")[:25])
    config = SourceConfig(type="file", name="app", path=str(log), start_at="end")
    state = StateStore(tmp_path / "state.db", max_pending=100)
    registry = CollectorRegistry()
    metrics = SelfMetrics(registry)
    ingest = Ingest(state, metrics, ManualClock(), billing_delay_seconds=0)
    source = FileSource(config, lines_parser_for(config), ingest, state, metrics)
    await source.open_initial()
    with log.open("a") as handle:
        handle.write(json_line("being-written")[25:] + "\n")
    await source.poll()
    assert await state.status("history") is None
    assert await state.status("being-written") == 0
