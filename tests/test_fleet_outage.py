"""Fleet processes and a database that is not there: an ingest sidecar starts without it (the app pod must
not wait for the database), reads on when it is back, and a database that hangs does not hold its shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import httpx
import psycopg
import pytest
from prometheus_client import CollectorRegistry

from exporter.app import INGEST_COUNT_SECONDS, Exporter
from exporter.clock import ManualClock
from exporter.config import FileSourceConfig, parse_config
from exporter.ids import Sighting, lines_parser_for
from exporter.ingest import Ingest
from exporter.pgstate import PostgresStore
from exporter.sources.file import FileSource
from exporter.store import StateError
from exporter.telemetry import SelfMetrics
from tests.pg import Cluster
from tests.support import (
    FakeApi,
    StartExporter,
    append_lines,
    fleet_data,
    json_line,
    samples,
    scrape,
    send_udp,
    value,
    wait_until,
)
from tests.tailing import Logrotate

# Only resolvers and exposers report the queue and the lookups; an ingest process exposes what it reads.
RESOLVER_ONLY = (
    "zenmux_exporter_pending_ids",
    "zenmux_exporter_oldest_pending_age_seconds",
    "zenmux_exporter_lookups_total",
    "zenmux_exporter_lookup_duration_seconds_count",
    "zenmux_exporter_inflight_lookups",
    "zenmux_exporter_abandoned_ids_total",
    "zenmux_exporter_api_auth_failing",
    "zenmux_exporter_lookup_concurrency_limit",
    "zenmux_exporter_give_up_after_seconds",
)


async def probe(port: int, path: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(f"http://127.0.0.1:{port}{path}")


def queued(pg_url: str) -> set[str]:
    """Ids in the shared state, pending or finished (none before a process created the schema)."""
    with psycopg.connect(pg_url) as db:
        try:
            return {row[0] for row in db.execute("SELECT id FROM queue UNION SELECT id FROM finished")}
        except psycopg.errors.UndefinedTable:
            return set()


async def test_an_ingest_sidecar_starts_without_its_database_and_loses_nothing(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter, pg_url: str, postgres: Cluster
) -> None:
    written = [fake_api.create() for _ in range(20)]
    append_lines(tmp_path / "app.log", [json_line(i) for i in written[:10]])
    data = fleet_data(tmp_path, fake_api.url, pg_url, ["ingest"])
    postgres.stop("immediate")
    try:
        ingest = await start_exporter(parse_config(data, "ingest"))  # no StateError: it serves, not ready
        port = ingest.metrics_port
        assert (await probe(port, "/healthz")).status_code == 200
        ready = await probe(port, "/readyz")
        assert ready.status_code == 503 and f"127.0.0.1:{postgres.port}" in ready.text
        append_lines(tmp_path / "app.log", [json_line(i) for i in written[10:15]])
        send_udp(ingest.udp_sources[0].port, written[15:])
        async def retried() -> bool:
            return value(await scrape(port), "zenmux_exporter_state_errors_total") > 0

        await wait_until(retried, timeout=30, what="the UDP ids held and their write retried")
        exposed = {name for name, _labels, _value in samples(await scrape(port))}
        assert "zenmux_exporter_max_pending_ids" in exposed  # the bound it holds is its own
        assert exposed.isdisjoint(RESOLVER_ONLY), exposed & set(RESOLVER_ONLY)
    finally:
        postgres.start()
    await wait_until(lambda: queued(pg_url) == set(written), timeout=60, what="every id queued, the database back")
    await wait_until(lambda: _ready(port), timeout=30, what="/readyz ready again")


async def _ready(port: int) -> bool:
    return (await probe(port, "/readyz")).status_code == 200


async def test_resolvers_and_exposers_start_without_the_database_too(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter, pg_url: str, postgres: Cluster
) -> None:
    ids = [fake_api.create() for _ in range(5)]
    postgres.stop("immediate")
    try:
        data = fleet_data(tmp_path, fake_api.url, pg_url, ["resolve", "expose"])
        both = await start_exporter(parse_config(data, "resolver"), api_key=data["zenmux"]["api_key"])
        assert (await probe(both.metrics_port, "/healthz")).status_code == 200
        assert (await probe(both.metrics_port, "/readyz")).status_code == 503
        assert both.exposer is not None and not both.exposer.leading  # nothing read: it must not serve zeros
        assert value(await scrape(both.metrics_port), "zenmux_generations_total") == 0
    finally:
        postgres.start()
    ingest = await start_exporter(parse_config(fleet_data(tmp_path, fake_api.url, pg_url, ["ingest"]), "ingest"))
    send_udp(ingest.udp_sources[0].port, ids)

    async def counted() -> bool:
        return value(await scrape(both.metrics_port), "zenmux_generations_total") == len(ids)

    await wait_until(counted, timeout=60, what="the ids counted once the database is back")


async def test_a_newer_schema_still_stops_the_start(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter, pg_url: str
) -> None:
    data = fleet_data(tmp_path, fake_api.url, pg_url, ["ingest"])
    await start_exporter(parse_config(data, "first"))  # creates the schema
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("INSERT INTO schema_version VALUES (999)")
    data["state"]["instance"] = "second"
    with pytest.raises(StateError, match="schema version 999"):
        await Exporter(parse_config(data, "second"), api_key="").start()


async def test_a_hanging_database_does_not_hold_a_fleet_sidecars_shutdown_past_drain_seconds(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter, pg_url: str
) -> None:
    first = [fake_api.create() for _ in range(3)]
    append_lines(tmp_path / "app.log", [json_line(i) for i in first])
    data = fleet_data(tmp_path, fake_api.url, pg_url, ["ingest"])
    data["state"]["instance"] = "sidecar"
    ingest = await start_exporter(parse_config(data, "ingest"))
    await wait_until(lambda: queued(pg_url) == set(first), timeout=30, what="the first ids queued")
    with psycopg.connect(pg_url, autocommit=True) as db:
        row = db.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'zenmux-exporter sidecar'"
        ).fetchone()
    assert row is not None
    backend = int(row[0])
    later = [fake_api.create() for _ in range(3)]
    os.kill(backend, signal.SIGSTOP)  # its next statement waits 30 s for the statement timeout
    try:
        append_lines(tmp_path / "app.log", [json_line(i) for i in later])
        # The guard only keeps a regression from hanging the suite: the bound itself is the 0.2 s given.
        report = await asyncio.wait_for(ingest.stop(drain_seconds=0.2), 25)
        assert ingest.stopped and report.left_pending >= 0
    finally:
        os.kill(backend, signal.SIGCONT)
    # Cut short, the read-out saved nothing it did not also queue: the next start reads on and loses nothing.
    await start_exporter(parse_config(data, "ingest"))
    await wait_until(lambda: queued(pg_url) == set(first + later), timeout=30, what="every id queued once")


async def test_an_ingest_process_counts_the_shared_queue_seldom_and_adds_its_own_inserts(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter, pg_url: str
) -> None:
    clock = ManualClock()
    data = fleet_data(tmp_path, fake_api.url, pg_url, ["ingest"])
    ingest = await start_exporter(parse_config(data, "ingest"), clock=clock)
    other = await PostgresStore.open(pg_url, password=None, instance="other-sidecar", max_pending=100,
                                     lease_seconds=5)
    try:
        await other.enqueue("udp", [Sighting(f"gen-{i}", ()) for i in range(3)], clock.time(), clock.time())
        await ingest.housekeep()
        assert ingest.state.pending == 0  # another sidecar's inserts are not seen before the next count...
        send_udp(ingest.udp_sources[0].port, ["gen-own"])
        await wait_until(lambda: ingest.state.pending == 1, what="its own insert added to its estimate")
        clock.advance(INGEST_COUNT_SECONDS)
        await ingest.housekeep()
        assert ingest.state.pending == 4  # ... which comes INGEST_COUNT_SECONDS after the last
    finally:
        await other.close()


async def test_a_log_renamed_while_the_database_is_away_is_finished_from_its_saved_position(
    tmp_path: Path, pg_url: str, postgres: Cluster
) -> None:
    """A write fails, and so does reading the saved position back: the source must not take the file now at
    the path for a new one (offset 0), or the renamed file's unread tail would be skipped."""
    state = await PostgresStore.open(pg_url, password=None, instance="pod-a", max_pending=1000, lease_seconds=60)
    log_path = tmp_path / "app.log"
    config = FileSourceConfig(name="app", path=str(log_path), start_at="beginning")
    metrics = SelfMetrics(CollectorRegistry())
    ingest = Ingest(state, metrics, ManualClock(), billing_delay_seconds=0)
    source = FileSource(config, lines_parser_for(config), ingest, state, metrics)
    append_lines(log_path, [json_line(f"read{i}") for i in range(10)])
    await source.open_initial()
    while await source.poll():
        pass
    postgres.stop("immediate")
    try:
        append_lines(log_path, [json_line(f"unread{i}") for i in range(5)])  # then logrotate renames the log
        log_path.rename(tmp_path / "app.log.1")
        append_lines(log_path, [json_line(f"new{i}") for i in range(3)])
        stop = asyncio.Event()
        stop.set()  # no pause between the failure and the retry
        with pytest.raises(StateError) as failed:
            await source.poll()
        await source._recover(stop, failed.value)  # reading the saved position fails too: still down
        with pytest.raises(StateError):
            await source.poll()  # and never reads the new file from byte 0 meanwhile
    finally:
        postgres.start()

    async def settled() -> bool:
        try:
            while await source.poll():
                pass
        except StateError:
            return False  # the store's reconnect backoff
        return all([await state.status(g) is not None for g in [*(f"unread{i}" for i in range(5)), "new2"]])

    await wait_until(settled, timeout=60, what="the renamed file's tail and the new file queued")
    source.close()
    await state.close()


@pytest.mark.parametrize("started_without_it", [False, True])
async def test_an_ingest_whose_database_is_away_across_several_rotations_reads_every_generation_once(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter, pg_url: str, postgres: Cluster,
    started_without_it: bool,
) -> None:
    """The database is down while the log rotates again and again, every way: the ingest reads nothing
    meanwhile (it could not save where it is), and once the database is back, every generation exactly once."""
    log = tmp_path / "app.log"
    logrotate = Logrotate(log)
    written = [fake_api.create() for _ in range(10)]
    append_lines(log, [json_line(i) for i in written])
    data = fleet_data(tmp_path, fake_api.url, pg_url, ["ingest"])
    data["sources"][0]["poll_interval_seconds"] = 0.02
    ingest = None
    if not started_without_it:
        ingest = await start_exporter(parse_config(data, "ingest"))
        await wait_until(lambda: queued(pg_url) == set(written), timeout=30, what="the first ids queued")
    postgres.stop("immediate")
    try:
        if ingest is None:
            ingest = await start_exporter(parse_config(data, "ingest"))  # it has read nothing, and cannot yet
        for how, compression in (("rename", "compress"), ("copytruncate", ""), ("rename", "delaycompress"),
                                 ("copytruncate", "delaycompress"), ("rename", "")):
            ids = [fake_api.create() for _ in range(7)]
            append_lines(log, [json_line(i) for i in ids])
            written += ids
            logrotate.rotate(how, compression)
        live = [fake_api.create() for _ in range(3)]
        append_lines(log, [json_line(i) for i in live])
        written += live
    finally:
        postgres.start()
    await wait_until(lambda: queued(pg_url) == set(written), timeout=60, what="every generation queued")
    text = await scrape(ingest.metrics_port)
    assert value(text, "zenmux_exporter_ids_received_total", source="app-log") == len(written)
    assert value(text, "zenmux_exporter_ids_duplicate_total", source="app-log") == 0  # none read twice
