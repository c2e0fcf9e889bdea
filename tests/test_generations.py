"""Any number of rotations while the file source is not reading: every generation of the log is read once, on
real files, across simulated kills (a new source on the same state), whatever the rotation scheme."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from exporter.sources import file as file_source
from exporter.sources import rotated
from exporter.sources.rotated import digest
from tests.support import append_lines, json_line, wait_until
from tests.tailing import Logrotate, Tail, compress, copytruncate, lines, reopen

ROTATIONS = {
    "rename": ("rename", ""),
    "rename+compress": ("rename", "compress"),
    "rename+delaycompress": ("rename", "delaycompress"),
    "copytruncate": ("copytruncate", ""),
    "copytruncate+compress": ("copytruncate", "compress"),
    "copytruncate+delaycompress": ("copytruncate", "delaycompress"),
}


async def statuses(tail: Tail, ids: list[str]) -> list[int | None]:
    return [await tail.state.status(i) for i in ids]


@pytest.mark.parametrize("scheme", ROTATIONS)
async def test_several_rotations_while_stopped_read_every_generation_once(tmp_path: Path, scheme: str) -> None:
    how, compression = ROTATIONS[scheme]
    tail = await Tail.open(tmp_path)
    logrotate = Logrotate(tail.log)
    written = lines("read", 20)
    append_lines(tail.log, written)
    await tail.drain()
    for generation in range(4):  # the exporter is down: four generations written and rotated away
        more = lines(f"gen{generation}-", 15)
        append_lines(tail.log, more)
        written += more
        logrotate.rotate(how, compression)
    append_lines(tail.log, lines("live", 3))
    written += lines("live", 3)
    tail = await reopen(tail, tmp_path)
    await tail.drain()
    ids = [json.loads(line)["generation_id"] for line in written]
    assert await statuses(tail, ids) == [0] * len(ids)
    assert tail.state.pending == len(ids)
    assert tail.metric("zenmux_exporter_ids_duplicate_total") == 0
    assert tail.metric("zenmux_exporter_file_recovered_lines_total") == 60


async def test_restarts_killed_before_reading_anything_lose_nothing(tmp_path: Path) -> None:
    tail = await Tail.open(tmp_path)
    logrotate = Logrotate(tail.log)
    append_lines(tail.log, lines("read", 20))
    await tail.drain()
    for life, (how, compression) in enumerate(ROTATIONS.values()):
        append_lines(tail.log, lines(f"life{life}-", 10))
        logrotate.rotate(how, compression)
        tail = await reopen(tail, tmp_path)  # started (it scanned) and killed before a single poll
    tail = await reopen(tail, tmp_path)
    await tail.drain()
    assert tail.state.pending == 20 + 10 * len(ROTATIONS)
    assert tail.metric("zenmux_exporter_ids_duplicate_total") == 0


async def test_a_finished_generation_is_not_read_again_under_another_name_or_compression(tmp_path: Path) -> None:
    tail = await Tail.open(tmp_path)
    append_lines(tail.log, lines("gen1-", 30))
    await tail.drain()
    tail.log.rename(tmp_path / "app.log.1")
    append_lines(tail.log, lines("gen2-", 5))
    await tail.drain()  # gen1 read to its end (finished), gen2 being read
    compress(tmp_path / "app.log.1", ".xz").rename(tmp_path / "old-gen1.log.xz")
    shutil.copyfile(tmp_path / "old-gen1.log.xz", tmp_path / "app.log.7.xz")  # and a second copy of it
    tail = await reopen(tail, tmp_path, rotated_glob="*.xz")
    await tail.drain()
    assert tail.state.pending == 35
    assert tail.metric("zenmux_exporter_ids_duplicate_total") == 0
    assert tail.metric("zenmux_exporter_file_recovered_lines_total") == 0


async def test_generations_shorter_than_the_fingerprint_and_a_first_line_being_written(tmp_path: Path) -> None:
    tail = await Tail.open(tmp_path)
    logrotate = Logrotate(tail.log)
    append_lines(tail.log, lines("a", 1))  # far shorter than 1024 bytes
    await tail.drain()
    for generation in range(3):  # one-line generations: each is all of its fingerprint
        append_lines(tail.log, lines(f"short{generation}-", 1))
        logrotate.rotate("rename" if generation % 2 else "copytruncate", "")
    with tail.log.open("a") as handle:  # a first line being written when the log is renamed away
        handle.write(json_line("being-written")[:30])
    logrotate.rotate("rename", "")
    tail = await reopen(tail, tmp_path)
    with (tmp_path / "app.log.1").open("a") as handle:  # the writer finishes it before reopening its log
        handle.write(json_line("being-written")[30:] + "\n")
    await tail.drain()
    assert await statuses(tail, ["a0", "short0-0", "short1-0", "short2-0", "being-written"]) == [0] * 5
    assert tail.state.pending == 5
    assert tail.metric("zenmux_exporter_ids_rejected_total", reason="not_json") == 0


async def test_generations_behind_a_fixed_header_longer_than_the_fingerprint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    header = "# " + "the same banner in every file " * 60 + "\n"  # ~1.8 KiB: longer than the 1024-byte fingerprint
    tail = await Tail.open(tmp_path)
    logrotate = Logrotate(tail.log)
    tail.log.write_text(header + "".join(line + "\n" for line in lines("gen0-", 40)))
    await tail.drain()
    # While stopped: two more generations behind the same header, one shorter and one longer than the first.
    for generation, count in ((1, 5), (2, 60)):
        logrotate.rotate("rename", "")
        tail.log.write_text(header + "".join(line + "\n" for line in lines(f"gen{generation}-", count)))
    logrotate.rotate("rename", "")
    tail.log.write_text(header)
    tail = await reopen(tail, tmp_path)
    await tail.drain()
    assert tail.state.pending == 105
    assert tail.metric("zenmux_exporter_ids_duplicate_total") == 0
    # The rule: the same first bytes, other bytes at a checkpoint's offset (or unknown ids before it): another
    # generation, read from its start, and said.
    assert tail.metric("zenmux_exporter_file_identity_conflicts_total") >= 2
    assert "fingerprint_bytes" in caplog.text


async def test_a_copy_and_its_compressed_twin_are_one_generation(tmp_path: Path) -> None:
    tail = await Tail.open(tmp_path)
    append_lines(tail.log, lines("read", 10))
    await tail.drain()
    append_lines(tail.log, lines("unread", 10))
    copytruncate(tail.log, tmp_path / "app.log.1")
    # gzip has written app.log.1.gz and not yet removed app.log.1: the same generation under two names.
    with (tmp_path / "app.log.1").open("rb") as plain, gzip.open(tmp_path / "app.log.1.gz", "wb") as packed:
        shutil.copyfileobj(plain, packed)
    append_lines(tail.log, lines("new", 2))
    tail = await reopen(tail, tmp_path)
    await tail.drain()
    (tmp_path / "app.log.1").unlink()  # gzip is done; the next rotation's scan meets the .gz alone
    tail.log.rename(tmp_path / "app.log.2")
    append_lines(tail.log, lines("newer", 1))
    await tail.drain()
    assert tail.state.pending == 23
    assert tail.metric("zenmux_exporter_ids_duplicate_total") == 0
    assert tail.metric("zenmux_exporter_file_recovered_lines_total") == 10


async def test_a_copy_still_being_compressed_is_read_once_it_is_whole(tmp_path: Path) -> None:
    tail = await Tail.open(tmp_path)
    append_lines(tail.log, lines("read", 10))
    await tail.drain()
    append_lines(tail.log, [json_line(f"unread{i}", "x" * 200) for i in range(300)])  # ~80 KiB: many gzip blocks
    tail.log.rename(tmp_path / "app.log.1")
    packed = compress(tmp_path / "app.log.1")
    whole = packed.read_bytes()
    packed.write_bytes(whole[: len(whole) // 2])  # gzip is half way (and the plain file already gone)
    append_lines(tail.log, lines("new", 2))
    tail = await reopen(tail, tmp_path)
    await tail.drain()
    assert 12 <= tail.state.pending < 312  # what the half-written copy holds so far, not more
    packed.write_bytes(whole)
    tail.source._rescan_at = 0.0  # the rescan's time has come (RESCAN_SECONDS of time.monotonic)
    await tail.drain()
    assert tail.state.pending == 312
    assert tail.metric("zenmux_exporter_ids_duplicate_total") == 0


async def test_start_at_end_skips_history_on_a_first_start_only(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    for number in (3, 2, 1):
        (tmp_path / f"app.log.{number}").write_text("".join(line + "\n" for line in lines(f"old{number}-", 5)))
    append_lines(log, lines("history", 5))
    tail = await Tail.open(tmp_path, start_at="end")
    await tail.drain()
    assert tail.state.pending == 0
    assert tail.metric("zenmux_exporter_file_history_skipped_total") == 3
    append_lines(log, lines("after-start", 2))
    await tail.drain()
    log.rename(tmp_path / "app.log.4")  # while stopped: rotated twice
    append_lines(log, lines("down1-", 3))
    log.rename(tmp_path / "app.log.5")
    append_lines(log, lines("down2-", 4))
    tail = await reopen(tail, tmp_path, start_at="end")  # not a first start: nothing written since is skipped
    await tail.drain()
    assert tail.state.pending == 9
    assert await tail.state.status("history0") is None and await tail.state.status("down1-0") == 0


async def test_checkpoints_are_bounded_and_an_expired_generation_is_never_read_again(tmp_path: Path) -> None:
    tail = await Tail.open(tmp_path, checkpoints_kept=2)
    kept: list[bytes] = []
    for generation in range(6):  # logrotate's `rotate 1`: older files are deleted
        append_lines(tail.log, lines(f"gen{generation}-", 3))
        await tail.drain()
        for old in tmp_path.glob("app.log.*"):
            kept.append(old.read_bytes())
            old.unlink()
        tail.log.rename(tmp_path / "app.log.1")
        await tail.drain()
    history = await tail.state.file_history("app")
    assert len(history.checkpoints) <= 2 + 2  # the kept ones, and those of files still on disk
    assert tail.metric("zenmux_exporter_file_checkpoints") == len(history.checkpoints)
    assert tail.metric("zenmux_exporter_file_checkpoints_expired_total") >= 2
    # An old generation whose checkpoint has expired comes back (restored from a backup, with its times).
    restored = tmp_path / "app.log.9"
    restored.write_bytes(kept[0])
    os.utime(restored, ns=(1, 1))
    tail = await reopen(tail, tmp_path, checkpoints_kept=2)
    await tail.drain()
    assert tail.state.pending == 18
    assert await tail.state.status("gen0-0") == 0  # still pending once: never counted twice
    assert tail.metric("zenmux_exporter_ids_duplicate_total") == 0
    assert tail.metric("zenmux_exporter_file_history_skipped_total") == 1


async def test_a_generation_deleted_before_it_was_read_to_its_end_is_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tail = await Tail.open(tmp_path)
    append_lines(tail.log, lines("read", 5))
    await tail.drain()
    append_lines(tail.log, lines("lost", 5))
    tail.log.rename(tmp_path / "app.log.1")
    (tmp_path / "app.log.1").unlink()  # rotated away and deleted while the exporter was down
    append_lines(tail.log, lines("new", 2))
    tail = await reopen(tail, tmp_path)
    await tail.drain()
    assert tail.state.pending == 7
    assert caplog.text.count("in no file matching") == 1
    caplog.clear()
    tail = await reopen(tail, tmp_path)
    await tail.drain()
    assert "in no file matching" not in caplog.text


async def test_compressed_copies_are_read_off_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loop_thread = threading.get_ident()
    threads: list[int] = []
    real = file_source._read_at

    def spy(handle: object, offset: int) -> bytes:
        threads.append(threading.get_ident())
        return real(handle, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(file_source, "_read_at", spy)
    tail = await Tail.open(tmp_path)
    append_lines(tail.log, lines("read", 5))
    await tail.drain()
    append_lines(tail.log, lines("unread", 50))
    copytruncate(tail.log, tmp_path / "app.log.1")
    compress(tmp_path / "app.log.1")
    await tail.drain()
    assert tail.state.pending == 55
    assert threads and loop_thread not in threads


def legacy_state(path: Path, log: Path, offset: int) -> None:
    """A state as the previous release wrote it (schema 2): one position per source, head and tail digests."""
    data = log.read_bytes()
    head, tail = data[: min(offset, 4096)], data[max(offset - 4096, 0) : offset]
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;"
        "INSERT INTO meta VALUES ('schema_version', '2');"
        "CREATE TABLE positions (source TEXT PRIMARY KEY, device INTEGER NOT NULL, inode INTEGER NOT NULL, "
        "offset INTEGER NOT NULL, fingerprint BLOB NOT NULL) WITHOUT ROWID;"
    )
    stat = log.stat()
    db.execute("INSERT INTO positions VALUES ('app', ?, ?, ?, ?)",
               (stat.st_dev, stat.st_ino, offset, digest(head) + digest(tail)))
    db.commit()
    db.close()


@pytest.mark.parametrize("rotated_since", [0, 1, 3])
async def test_an_upgrade_from_one_position_per_source_reads_nothing_twice_and_skips_nothing(
    tmp_path: Path, rotated_since: int
) -> None:
    log = tmp_path / "app.log"
    logrotate = Logrotate(log)
    for generation in range(3):  # read by the previous release, and rotated away: history
        append_lines(log, lines(f"old{generation}-", 5))
        logrotate.rotate("rename", "compress" if generation else "")
    append_lines(log, lines("read", 8))
    offset = log.stat().st_size
    legacy_state(tmp_path / "state.db", log, offset)  # the previous release read this far, then was upgraded
    expected = 0
    append_lines(log, lines("unread", 4))
    expected += 4
    for generation in range(rotated_since):  # and rotated meanwhile
        logrotate.rotate("rename" if generation % 2 else "copytruncate", "delaycompress")
        append_lines(log, lines(f"new{generation}-", 6))
        expected += 6
    tail = await Tail.open(tmp_path)
    await tail.drain()
    assert tail.state.pending == expected
    assert await tail.state.status("read0") is None and await tail.state.status("old0-0") is None
    assert tail.metric("zenmux_exporter_file_history_skipped_total") == 3


async def test_empty_rotated_files_hold_no_generation(tmp_path: Path) -> None:
    """An empty log rotated (logrotate's default `ifempty`), plain or compressed, has nothing to read: the scan
    passes over it. An empty .gz was once taken for a new generation at each scan, read (0 lines) and found again
    by the scan that followed, ahead of the log (empty too, so of the same head): the source never settled."""
    tail = await Tail.open(tmp_path)
    logrotate = Logrotate(tail.log)
    append_lines(tail.log, lines("first", 5))
    await tail.drain()
    logrotate.rotate("rename", "compress")
    logrotate.rotate("rename", "compress")  # the log was empty: an empty .gz
    logrotate.rotate("rename", "")  # and an empty plain file
    tail = await reopen(tail, tmp_path)

    async def settle() -> None:
        polls = quiet = 0
        while quiet <= file_source.ROTATION_GRACE_POLLS:
            polls += 1
            assert polls < 100, "the source never settles"
            quiet = 0 if await tail.source.poll() else quiet + 1

    await settle()
    append_lines(tail.log, lines("live", 3))
    await settle()
    ids = [json.loads(line)["generation_id"] for line in lines("first", 5) + lines("live", 3)]
    assert await statuses(tail, ids) == [0] * len(ids)
    assert tail.metric("zenmux_exporter_ids_duplicate_total") == 0


@pytest.mark.parametrize("how", ["rename", "copytruncate"])
async def test_a_rotation_while_the_scan_looks_hides_no_generation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The log rotated between the scan's listing of the directory and its opening of the log: the rotated
    file is in no listing, the log the scan opens holds a new generation. The lines of the one being read that
    only the rotated file holds were left for the next rotation's scan (none came: the fleet crash test waited
    for them until it timed out), and that generation was said to be gone."""
    tail = await Tail.open(tmp_path)
    append_lines(tail.log, lines("read", 5))
    await tail.drain()
    append_lines(tail.log, lines("unread", 3))  # written, then the log rotated before the source polled
    real = rotated._open_all
    rotations: list[str] = []

    def rotation_then_opening(paths: list[Path], live: Path, head_bytes: int, result: rotated.Scan) -> object:
        if not rotations:  # the writer's logrotate runs after the scan listed the directory, before it opens
            rotations.append(how)
            Logrotate(tail.log).rotate(how, "")
            append_lines(tail.log, lines("new", 2))
        return real(paths, live, head_bytes, result)

    monkeypatch.setattr(rotated, "_open_all", rotation_then_opening)
    tail = await reopen(tail, tmp_path)  # a restart's scan (a rescan while the log is read takes the same path)
    await tail.drain()
    assert rotations == [how]
    ids = [json.loads(line)["generation_id"] for line in lines("read", 5) + lines("unread", 3) + lines("new", 2)]
    assert await statuses(tail, ids) == [0] * len(ids)
    assert tail.metric("zenmux_exporter_ids_duplicate_total") == 0


async def test_a_rotation_under_every_scan_hides_no_generation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rotations (renamed, then compressed) land between the listing and the opening in every one of the scans
    taken in a row: the last scan is taken, but the generation it does not see is not marked gone (a finished
    generation in a compressed file is never read again); it is found by the look again a moment later."""
    tail = await Tail.open(tmp_path)
    logrotate = Logrotate(tail.log)
    append_lines(tail.log, lines("read", 5))
    await tail.drain()
    append_lines(tail.log, lines("unread", 3))
    real = rotated._open_all
    rotations: list[int] = []

    def rotation_then_opening(paths: list[Path], live: Path, head_bytes: int, result: rotated.Scan) -> object:
        if len(rotations) < rotated.SCAN_ATTEMPTS:
            rotations.append(1)
            logrotate.rotate("rename", "compress")
            append_lines(tail.log, lines(f"gen{len(rotations)}-", 2))
        return real(paths, live, head_bytes, result)

    monkeypatch.setattr(rotated, "_open_all", rotation_then_opening)
    tail = await reopen(tail, tmp_path)
    await tail.drain()
    monkeypatch.setattr(rotated, "_open_all", real)
    assert len(rotations) == rotated.SCAN_ATTEMPTS
    assert tail.source._rescan_at is not None  # the look again, soon
    tail.source._rescan_at = 0.0  # (it is due: RESCAN_SECONDS have passed)
    await tail.drain()
    written = lines("read", 5) + lines("unread", 3) + [
        line for n in range(1, rotated.SCAN_ATTEMPTS + 1) for line in lines(f"gen{n}-", 2)
    ]
    ids = [json.loads(line)["generation_id"] for line in written]
    assert await statuses(tail, ids) == [0] * len(ids)
    assert tail.metric("zenmux_exporter_ids_duplicate_total") == 0


async def rescan_until_the_wait_is_long(tail: Tail) -> None:
    """Looks again, as due, until the wait before the next look has doubled past 30 s: each look finds the same
    empty rotated file left for later."""
    for _ in range(7):
        tail.source._rescan_at = 0.0
        await tail.drain()
    assert tail.source._rescan_at is not None and tail.source._rescan_at - time.monotonic() > 30


async def test_a_file_left_for_later_is_looked_at_again_soon_whatever_was_left_before(tmp_path: Path) -> None:
    """The look again after a file the scan could not take yet waits RESCAN_SECONDS, doubling while the same
    files stay left (never a scan per poll). An empty rotated log, left at every scan (it may be the log renamed
    away, still written), had doubled it to RESCAN_MAX_SECONDS: a copy gzip was still writing, found later,
    waited a minute for its look, its lines with it."""
    tail = await Tail.open(tmp_path)
    logrotate = Logrotate(tail.log)
    append_lines(tail.log, lines("first", 3))
    await tail.drain()
    logrotate.rotate("rename", "")
    logrotate.rotate("rename", "")  # the log was empty: an empty plain file, left for later at every scan
    append_lines(tail.log, lines("read", 5))
    await tail.drain()
    await rescan_until_the_wait_is_long(tail)
    append_lines(tail.log, lines("unread", 4))
    copytruncate(tail.log, tmp_path / "app.log.copy")
    packed = compress(tmp_path / "app.log.copy")
    whole = packed.read_bytes()
    packed.write_bytes(whole[:10])  # gzip has written its header so far (and the plain copy is gone)
    await tail.drain()
    packed.write_bytes(whole)

    async def read() -> bool:
        await tail.source.poll()
        return tail.state.pending == 12

    await wait_until(read, timeout=file_source.RESCAN_SECONDS * 5, what="the copy's lines read")
    assert tail.metric("zenmux_exporter_ids_duplicate_total") == 0


async def test_a_log_created_after_the_scan_that_found_none_is_read_at_once(tmp_path: Path) -> None:
    """The log renamed away and created again later (logrotate's `nocreate`, the application reopening its log
    when told): the scan after the renamed file was read found no log. Once the log is there it is read at the
    next poll, not when files left for later are due (an empty rotated log had made that a minute away)."""
    (tmp_path / "app.log").touch()
    tail = await Tail.open(tmp_path)
    Logrotate(tail.log).rotate("rename", "")  # the log was empty: an empty plain file, left for later at every scan
    append_lines(tail.log, lines("read", 5))
    await tail.drain()
    await rescan_until_the_wait_is_long(tail)
    tail.log.rename(tmp_path / "app.log.old")  # no log until the application creates it
    tail.source._rescan_at = 0.0  # a look again comes meanwhile: it finds no log
    await tail.drain()
    assert tail.source._rescan_at is not None and tail.source._rescan_at - time.monotonic() > 30
    append_lines(tail.log, lines("new", 3))
    await tail.drain()
    ids = [json.loads(line)["generation_id"] for line in lines("read", 5) + lines("new", 3)]
    assert await statuses(tail, ids) == [0] * len(ids)
