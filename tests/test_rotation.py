"""The file source follows rotation and restarts: every id read exactly once."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

from exporter.app import Exporter
from tests.support import FakeApi, StartExporter, append_lines, json_line, make_config, scrape, value, wait_until


async def received(exporter: Exporter) -> float:
    return value(await scrape(exporter.metrics_port), "zenmux_exporter_ids_received_total", source="app-log")


async def wait_received(exporter: Exporter, count: int) -> None:
    async def reached() -> bool:
        return await received(exporter) >= count

    await wait_until(reached, what=f"{count} ids received")


async def wait_resolved(exporter: Exporter, count: int) -> str:
    async def reached() -> bool:
        return value(await scrape(exporter.metrics_port), "zenmux_generations_total") >= count

    await wait_until(reached, what=f"{count} generations resolved")
    return await scrape(exporter.metrics_port)


async def test_rename_and_create_rotation_loses_and_duplicates_nothing(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    log = tmp_path / "app.log"
    exporter = await start_exporter(make_config(tmp_path, fake_api.url))
    ids = [fake_api.create() for _ in range(60)]
    append_lines(log, [json_line(i) for i in ids[:20]])
    await wait_received(exporter, 20)
    # Lines written just before the rename are still unread when the new file appears.
    append_lines(log, [json_line(i) for i in ids[20:30]])
    os.rename(log, tmp_path / "app.log.1")
    with (tmp_path / "app.log.1").open("a") as old:
        old.write(json_line(ids[30]))  # the writer's last line, without newline, in the old file
    append_lines(log, [json_line(i) for i in ids[31:60]])
    text = await wait_resolved(exporter, 60)
    assert value(text, "zenmux_exporter_ids_received_total", source="app-log") == 60
    assert value(text, "zenmux_exporter_ids_duplicate_total") == 0
    assert value(text, "zenmux_generations_total") == 60
    assert value(text, "zenmux_exporter_file_rotations_total", kind="rename") == 1


async def test_copytruncate_rotation_loses_and_duplicates_nothing(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    log = tmp_path / "app.log"
    exporter = await start_exporter(make_config(tmp_path, fake_api.url))
    ids = [fake_api.create() for _ in range(40)]
    append_lines(log, [json_line(i) for i in ids[:25]])
    await wait_received(exporter, 25)
    shutil.copy(log, tmp_path / "app.log.1")
    with log.open("r+") as handle:
        handle.truncate(0)
    append_lines(log, [json_line(i) for i in ids[25:28]])  # shorter than before: a visible truncation
    await wait_received(exporter, 28)
    append_lines(log, [json_line(i) for i in ids[28:]])
    text = await wait_resolved(exporter, 40)
    assert value(text, "zenmux_exporter_ids_received_total") == 40
    assert value(text, "zenmux_exporter_ids_duplicate_total") == 0
    assert value(text, "zenmux_exporter_file_rotations_total", kind="truncate") == 1


async def test_restart_resumes_at_the_saved_position(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    log = tmp_path / "app.log"
    config = make_config(tmp_path, fake_api.url)
    ids = [fake_api.create() for _ in range(30)]
    exporter = await start_exporter(config)
    append_lines(log, [json_line(i) for i in ids[:10]])
    await wait_resolved(exporter, 10)
    await exporter.stop(drain_seconds=0)
    append_lines(log, [json_line(i) for i in ids[10:20]])  # written while the exporter is down
    exporter = await start_exporter(config)
    append_lines(log, [json_line(i) for i in ids[20:]])
    text = await wait_resolved(exporter, 30)
    # Counters continue from the ledger; the second process read only the 20 new lines.
    assert value(text, "zenmux_generations_total") == 30
    assert value(text, "zenmux_exporter_ids_received_total") == 20
    assert value(text, "zenmux_exporter_ids_duplicate_total") == 0


async def test_file_rotated_while_stopped_is_finished_first(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    log = tmp_path / "app.log"
    config = make_config(tmp_path, fake_api.url)
    ids = [fake_api.create() for _ in range(30)]
    exporter = await start_exporter(config)
    append_lines(log, [json_line(i) for i in ids[:10]])
    await wait_received(exporter, 10)
    await exporter.stop(drain_seconds=0)
    append_lines(log, [json_line(i) for i in ids[10:20]])
    os.rename(log, tmp_path / "app.log.1")
    append_lines(log, [json_line(i) for i in ids[20:]])
    exporter = await start_exporter(config)
    text = await wait_resolved(exporter, 30)
    assert value(text, "zenmux_generations_total") == 30
    assert value(text, "zenmux_exporter_ids_received_total") == 20
    assert value(text, "zenmux_exporter_ids_duplicate_total") == 0


async def test_start_at_end_skips_history_of_a_file_never_seen(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    log = tmp_path / "app.log"
    append_lines(log, [json_line(fake_api.create()) for _ in range(5)])
    config = make_config(
        tmp_path,
        fake_api.url,
        sources=[{"type": "file", "path": str(log), "start_at": "end", "poll_interval_seconds": 0.02}],
    )
    exporter = await start_exporter(config)
    new = fake_api.create()
    append_lines(log, [json_line(new)])
    text = await wait_resolved(exporter, 1)
    assert value(text, "zenmux_exporter_ids_received_total") == 1


async def test_copytruncate_and_compress_while_stopped_loses_and_duplicates_nothing(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    log = tmp_path / "app.log"
    config = make_config(tmp_path, fake_api.url)
    ids = [fake_api.create() for _ in range(30)]
    exporter = await start_exporter(config)
    append_lines(log, [json_line(i) for i in ids[:10]])
    await wait_received(exporter, 10)
    await exporter.stop(drain_seconds=0)
    append_lines(log, [json_line(i) for i in ids[10:20]])  # only in the copy after the rotation below
    # logrotate with copytruncate + compress (no delaycompress): copy, truncate, gzip the copy.
    with log.open("rb") as plain, gzip.open(tmp_path / "app.log.1.gz", "wb") as packed:
        shutil.copyfileobj(plain, packed)
    with log.open("r+b") as handle:
        handle.truncate(0)
    append_lines(log, [json_line(i) for i in ids[20:]])
    exporter = await start_exporter(config)
    text = await wait_resolved(exporter, 30)
    assert value(text, "zenmux_generations_total") == 30
    assert value(text, "zenmux_exporter_ids_received_total") == 20
    assert value(text, "zenmux_exporter_ids_duplicate_total") == 0
    assert value(text, "zenmux_exporter_file_rotations_total", kind="copytruncate_recovered") == 1
    assert value(text, "zenmux_exporter_file_recovered_lines_total") == 10
