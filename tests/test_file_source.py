"""The file tailer driven poll by poll on real files: checkpoints, truncation, overlong lines, backpressure."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from exporter.clock import ManualClock
from exporter.config import FileSourceConfig
from exporter.ids import LinesParser, lines_parser_for
from exporter.ingest import Ingest
from exporter.sources import file as file_source
from exporter.sources.file import FileSource
from exporter.state import StateStore
from exporter.telemetry import SelfMetrics
from tests.support import append_lines, json_line, reading
from tests.tailing import Tail, compress, copytruncate, lines, reopen


async def test_ids_and_position_are_saved_together(tmp_path: Path) -> None:
    tail = await Tail.open(tmp_path)
    append_lines(tail.log, [json_line(f"id{i}") for i in range(5)])
    await tail.drain()
    assert tail.state.pending == 5
    position = await reading(tail.state, "app")
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
    position = await reading(tail.state, "app")
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
    position = await reading(tail.state, "app")
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
    config = FileSourceConfig(name="app", path=str(log), start_at="end")
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


def recovered(tail: Tail) -> tuple[float, float]:
    return (
        tail.metric("zenmux_exporter_file_rotations_total", kind="copytruncate_recovered"),
        tail.metric("zenmux_exporter_file_recovered_lines_total"),
    )


@pytest.mark.parametrize("compressed", ["", ".gz", ".bz2", ".xz"])
async def test_copytruncate_between_two_polls_reads_the_tail_from_the_copy(tmp_path: Path, compressed: str) -> None:
    tail = await Tail.open(tmp_path)
    append_lines(tail.log, lines("read", 5))
    await tail.drain()
    append_lines(tail.log, lines("unread", 5))  # written after the last poll
    copytruncate(tail.log, tmp_path / "app.log.1")
    if compressed:
        compress(tmp_path / "app.log.1", compressed)
    append_lines(tail.log, lines("new", 2))
    await tail.drain()
    assert tail.state.pending == 12
    assert all([await tail.state.status(f"unread{i}") == 0 for i in range(5)])
    assert tail.metric("zenmux_exporter_file_rotations_total", kind="truncate") == 1
    assert recovered(tail) == (1, 5)
    assert tail.metric("zenmux_exporter_ids_duplicate_total") == 0


@pytest.mark.parametrize("rotation", ["copytruncate", "copytruncate+compress", "copytruncate+dateext+compress"])
async def test_copytruncate_while_stopped_is_recovered_at_start(tmp_path: Path, rotation: str) -> None:
    tail = await Tail.open(tmp_path)
    append_lines(tail.log, lines("read", 5))
    await tail.drain()
    append_lines(tail.log, lines("unread", 5))  # the exporter is down from here
    copy = tmp_path / ("app.log-20261203" if "dateext" in rotation else "app.log.1")
    copytruncate(tail.log, copy)
    if "compress" in rotation:
        compress(copy)
    append_lines(tail.log, lines("new", 2))
    tail = await reopen(tail, tmp_path)
    await tail.drain()
    assert tail.state.pending == 12
    assert recovered(tail) == (1, 5)
    assert tail.metric("zenmux_exporter_ids_duplicate_total") == 0


async def test_delaycompress_the_previous_copy_is_compressed_while_the_exporter_reads_the_new_one(
    tmp_path: Path,
) -> None:
    tail = await Tail.open(tmp_path)
    append_lines(tail.log, lines("first", 3))
    await tail.drain()
    copytruncate(tail.log, tmp_path / "app.log.1")  # nothing unread in this one
    await tail.drain()
    append_lines(tail.log, lines("second", 4))
    await tail.drain()
    append_lines(tail.log, lines("second-unread", 2))
    # Next rotation with delaycompress: app.log.1 -> app.log.2.gz, the log -> app.log.1 (plain), truncated.
    (tmp_path / "app.log.1").rename(tmp_path / "app.log.2")
    compress(tmp_path / "app.log.2")
    copytruncate(tail.log, tmp_path / "app.log.1")
    await tail.drain()
    assert tail.state.pending == 9
    assert recovered(tail) == (2, 2)


async def test_rename_rotation_finished_while_stopped_and_already_compressed(tmp_path: Path) -> None:
    tail = await Tail.open(tmp_path)
    append_lines(tail.log, lines("read", 5))
    await tail.drain()
    append_lines(tail.log, lines("unread", 5))
    tail.log.rename(tmp_path / "app.log.1")
    compress(tmp_path / "app.log.1")
    append_lines(tail.log, lines("new", 2))
    tail = await reopen(tail, tmp_path)
    await tail.drain()
    assert tail.state.pending == 12
    assert tail.metric("zenmux_exporter_file_recovered_lines_total") == 5
    assert tail.metric("zenmux_exporter_ids_duplicate_total") == 0


async def test_a_crash_while_draining_a_copy_resumes_in_the_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(file_source, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(file_source, "CHUNKS_PER_POLL", 1)
    tail = await Tail.open(tmp_path)
    append_lines(tail.log, lines("read", 5))
    await tail.drain()
    append_lines(tail.log, lines("unread", 200))  # ~20 chunks of the copy
    copytruncate(tail.log, tmp_path / "app.log.1")
    gz = compress(tmp_path / "app.log.1")
    append_lines(tail.log, lines("new", 2))
    for _ in range(3):
        assert await tail.source.poll()  # one chunk a poll: the copy is being drained
    position = await reading(tail.state, "app")
    assert position is not None and position.inode == gz.stat().st_ino  # the checkpoint names the copy
    read_before = tail.state.pending
    assert 5 < read_before < 205
    tail = await reopen(tail, tmp_path)  # killed mid-drain
    await tail.drain()
    assert tail.state.pending == 207
    assert tail.metric("zenmux_exporter_ids_duplicate_total") == 0  # nothing read twice
    assert recovered(tail) == (0, 205 - read_before)


async def test_copies_that_share_a_long_header_are_told_apart_by_the_bytes_before_the_offset(tmp_path: Path) -> None:
    header = "# " + "banner " * 700 + "\n"  # every generation starts so, longer than the head fingerprint
    tail = await Tail.open(tmp_path)
    tail.log.write_text(header + "".join(line + "\n" for line in lines("gen1-", 50)))
    await tail.drain()
    copytruncate(tail.log, tmp_path / "app.log.1")
    tail.log.write_text(header + "".join(line + "\n" for line in lines("gen2-", 5)))
    await tail.drain()
    append_lines(tail.log, lines("gen2-unread", 3))
    (tmp_path / "app.log.1").rename(tmp_path / "app.log.2")  # gen1: same head, longer than our offset
    copytruncate(tail.log, tmp_path / "app.log.1")
    await tail.drain()
    assert tail.state.pending == 58
    assert all([await tail.state.status(f"gen2-unread{i}") == 0 for i in range(3)])
    assert recovered(tail) == (2, 3)
    assert tail.metric("zenmux_exporter_ids_duplicate_total") == 0


async def test_two_copies_of_one_generation_are_read_once(tmp_path: Path) -> None:
    tail = await Tail.open(tmp_path)
    append_lines(tail.log, lines("read", 5))
    await tail.drain()
    append_lines(tail.log, lines("unread", 5))
    shutil.copyfile(tail.log, tmp_path / "app.log-20261203")  # two rotation schemes copied the same file
    copytruncate(tail.log, tmp_path / "app.log.1")
    append_lines(tail.log, lines("new", 2))
    await tail.drain()
    # The same bytes are the same generation, whatever the name: its unread tail is read from one of them.
    assert tail.state.pending == 12
    assert recovered(tail) == (1, 5)
    assert tail.metric("zenmux_exporter_ids_duplicate_total") == 0


async def test_a_copy_shorter_than_the_offset_is_not_taken(tmp_path: Path) -> None:
    tail = await Tail.open(tmp_path)
    append_lines(tail.log, lines("a", 30))  # past the fingerprint's 1024 bytes
    await tail.drain()
    shutil.copyfile(tail.log, tmp_path / "app.log.1")  # copied here ...
    append_lines(tail.log, lines("b", 5))
    await tail.drain()  # ... read past the copy's end ...
    with tail.log.open("r+b") as handle:
        handle.truncate(0)  # ... truncated later: nothing unread, and the copy does not reach our offset
    append_lines(tail.log, lines("new", 2))
    await tail.drain()
    assert tail.state.pending == 37
    assert recovered(tail) == (0, 0)
    assert tail.metric("zenmux_exporter_ids_duplicate_total") == 0  # the copy is not read again
    assert tail.metric("zenmux_exporter_file_rotations_total", kind="copytruncate_unrecovered") == 1


async def test_a_truncation_during_a_read_is_not_taken_for_more_of_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_source, "CHUNK_BYTES", 4096)
    log = tmp_path / "app.log"
    append_lines(log, lines("old", 200))  # ~5 chunks

    def rotate_after_the_first_chunk(parse: LinesParser) -> LinesParser:
        # The writer's logrotate runs between two chunk reads of one poll: copied, truncated, refilled past
        # the offset. The next chunk at the old offset would be the middle of the new file.
        def parse_and_rotate(data: bytes) -> Any:
            if not (tmp_path / "app.log.1").exists():
                copytruncate(log, tmp_path / "app.log.1")
                append_lines(log, lines("new", 200))
            return parse(data)

        return parse_and_rotate

    tail = await Tail.open(tmp_path, parse=rotate_after_the_first_chunk)
    await tail.drain()
    assert tail.state.pending == 400
    statuses = [await tail.state.status(f"{generation}{i}") for generation in ("old", "new") for i in range(200)]
    assert statuses == [0] * 400
    assert tail.metric("zenmux_exporter_file_rotations_total", kind="copytruncate_recovered") == 1
    assert tail.metric("zenmux_exporter_ids_rejected_total", reason="not_json") == 0  # no line read from its middle


async def test_a_writer_faster_than_the_read_at_stop_does_not_hold_the_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(file_source, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(file_source, "CHUNKS_PER_POLL", 1)
    clock: list[ManualClock] = []
    appended: list[str] = []

    def keep_writing(parse: LinesParser) -> LinesParser:
        # The writer appends two chunks' worth while we parse one, and each chunk takes 0.1 s (the injected
        # clock): the read at stop never catches up. It gives up after 400 chunks, so a stop that does not
        # stop still ends (and the test fails instead of hanging).
        def parse_and_write(data: bytes) -> Any:
            if len(appended) < 400 * 100:
                batch = lines(f"late{len(appended)}-", 100)
                append_lines(tmp_path / "app.log", batch)
                appended.extend(batch)
            clock[0].advance(0.1)
            return parse(data)

        return parse_and_write

    tail = await Tail.open(tmp_path, max_pending=100_000, parse=keep_writing, final_read_seconds=2.0)
    clock.append(tail.clock)
    append_lines(tail.log, lines("early", 50))
    stop = asyncio.Event()
    stop.set()
    await tail.source.run(stop)  # stopped at once: only the read of what the writer left
    assert 2.0 <= tail.clock.now - 1_800_000_000.0 < 2.2  # ~20 chunks of 0.1 s, not 400
    position = await reading(tail.state, "app")
    assert position is not None
    with tail.log.open("rb") as handle:
        read = handle.read(position.offset)
    assert read.endswith(b"\n") and position.offset < tail.log.stat().st_size
    # What the saved position covers is queued, nothing past it.
    assert tail.state.pending == read.count(b"\n")
    total = 50 + len(appended)
    tail = await reopen(tail, tmp_path, max_pending=100_000)  # the next start reads the rest, once
    await tail.drain()
    assert tail.state.pending == total
    assert tail.metric("zenmux_exporter_ids_duplicate_total") == 0
