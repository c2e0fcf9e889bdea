"""The PostgreSQL backend's fleet behaviour on a real server: claims under a lease, one count per id across
replicas, the ledger followed incrementally, one rate limit, one leader, migrations, an unreachable server."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable

import psycopg
import pytest

from exporter.contribution import LabelLimiter, LedgerShape
from exporter.ids import Sighting
from exporter.ledger import Ledger
from exporter.pgstate import SCHEMA, SCHEMA_VERSION, PostgresStore, process_identity
from exporter.store import Checkpoint, FileHistory, Resolved, Retry, StateError
from tests.pg import Cluster
from tests.support import one_generation, wait_until

OpenStore = Callable[..., Awaitable[PostgresStore]]


@pytest.fixture
async def open_store(pg_url: str) -> AsyncIterator[OpenStore]:
    opened: list[PostgresStore] = []

    async def open_store(instance: str, *, lease_seconds: float = 60, url: str = pg_url) -> PostgresStore:
        store = await PostgresStore.open(
            url, password=None, instance=instance, max_pending=1000, lease_seconds=lease_seconds
        )
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        await store.close()


def ledger() -> Ledger:
    return Ledger(LedgerShape(()), LabelLimiter(10, 10, 64))


async def test_replicas_claim_disjoint_batches_and_a_dead_ones_claims_return_after_the_lease(
    open_store: OpenStore,
) -> None:
    a, b = await open_store("resolver-a", lease_seconds=30), await open_store("resolver-b", lease_seconds=30)
    await a.enqueue("src", [Sighting(f"id{i}") for i in range(10)], now=0, due=0)
    first = await a.due(now=1, limit=6, exclude=set())
    second = await b.due(now=1, limit=6, exclude=set())
    assert len(first) == 6 and len(second) == 4
    assert not {p.id for p in first} & {p.id for p in second}
    in_flight = {p.id for p in second}  # what b's resolver passes: its own ids in flight
    assert await b.due(now=2, limit=10, exclude=in_flight) == []  # all claimed
    # a dies holding its claims: once the lease ran out they are b's.
    assert await b.due(now=30, limit=10, exclude=in_flight) == []
    assert await b.next_due(30, in_flight) is None
    taken_over = await b.due(now=31.5, limit=10, exclude=in_flight)
    assert {p.id for p in taken_over} == {p.id for p in first}
    # a comes back with a retry for an id b now holds: b's claim stands.
    assert await a.settle([Retry(first[0].id, due=100, attempts=1)], ledger(), now=32) == []
    # b restarts under the same name (nothing in flight): its claims are its own again at once.
    await b.close()
    again = await open_store("resolver-b", lease_seconds=30)
    assert len(await again.due(now=33, limit=20, exclude=set())) == 10


async def test_two_replicas_settling_one_id_count_it_once(open_store: OpenStore) -> None:
    a, b = await open_store("a"), await open_store("b")
    await a.enqueue("src", [Sighting("x")], now=0, due=0)
    results = await asyncio.gather(
        a.settle([Resolved("x", one_generation(1.0))], ledger(), now=1),
        b.settle([Resolved("x", one_generation(1.0))], ledger(), now=1),
    )
    assert sorted(len(applied) for applied in results) == [0, 1]
    book = ledger()
    book.load(await a.ledger_rows())
    assert book.value("zenmux_cost_usd") == 1.0 and book.value("zenmux_generations") == 1


async def test_an_id_enqueued_again_after_it_left_the_queue_is_not_counted_again(open_store: OpenStore) -> None:
    store = await open_store("a")
    await store.enqueue("src", [Sighting("x")], now=0, due=0)
    await store.settle([Resolved("x", one_generation(1.0))], ledger(), now=1)
    async with await psycopg.AsyncConnection.connect(store_url(store), autocommit=True) as db:
        # What a race with an ingester could leave: the id in the queue again although it is finished.
        await db.execute("INSERT INTO queue (id, source, labels, first_seen, due) VALUES ('x', 's', '', 0, 0)")
    assert await store.settle([Resolved("x", one_generation(1.0))], ledger(), now=2) == []
    book = ledger()
    book.load(await store.ledger_rows())
    assert book.value("zenmux_generations") == 1


def store_url(store: PostgresStore) -> str:
    return store._url


async def test_an_exposer_follows_every_replicas_settlements_incrementally(open_store: OpenStore) -> None:
    exposer, a, b = await open_store("exposer"), await open_store("a"), await open_store("b")
    book = ledger()
    book.load(await exposer.ledger_changes())
    assert book.value("zenmux_generations") == 0
    await a.enqueue("src", [Sighting(f"id{i}") for i in range(4)], now=0, due=0)
    await a.settle([Resolved("id0", one_generation(0.5))], ledger(), now=1)
    await b.settle([Resolved("id1", one_generation(0.25)), Resolved("id2", one_generation(0.25))], ledger(), now=1)
    changed = await exposer.ledger_changes()
    assert changed
    book.load(changed)
    assert book.value("zenmux_generations") == 3 and book.value("zenmux_cost_usd") == 1.0
    await a.settle([Resolved("id3", one_generation(1.0))], ledger(), now=2)
    book.load(await exposer.ledger_changes())
    assert book.value("zenmux_generations") == 4 and book.value("zenmux_cost_usd") == 2.0


async def test_the_rate_limit_and_a_pause_are_shared(open_store: OpenStore) -> None:
    a, b = await open_store("a"), await open_store("b")
    first = await a.take_tokens(4, rate=1.0, burst=5.0)
    assert first.balance == pytest.approx(1.0, abs=0.1) and first.paused_seconds == 0
    second = await b.take_tokens(4, rate=1.0, burst=5.0)  # the same bucket: b is now in debt
    assert second.balance == pytest.approx(-3.0, abs=0.1)
    await a.pause(30)
    assert (await b.take_tokens(1, rate=1.0, burst=5.0)).paused_seconds == pytest.approx(30, abs=1)


async def test_one_exposer_leads_and_another_takes_over_when_it_goes(open_store: OpenStore) -> None:
    a, b = await open_store("a"), await open_store("b")
    assert await a.try_lead() is True
    assert await b.try_lead() is False
    assert await a.try_lead() is True and await b.try_lead() is False
    await a.close()  # the server releases the lock when it has ended a's session, a moment later
    await wait_until(b.try_lead, timeout=5, what="b to lead")
    assert await b.try_lead() is True


async def test_positions_of_the_first_schema_become_checkpoints(open_store: OpenStore, pg_url: str) -> None:
    """A database the previous release created (schema 1: one position per instance and source) is migrated in
    place: each position becomes its source's first checkpoint, unfinished, with no horizon yet."""
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute(SCHEMA)  # version 1's tables (MIGRATIONS[2] replaces positions)
        db.execute("CREATE TABLE schema_version (version integer NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (1)")
        db.execute(
            "INSERT INTO positions VALUES ('pod-a', 'app', 7, 8, 300, %s), ('pod-b', 'app', 7, 9, 50, %s)",
            (b"H" * 18 + b"T" * 18, b"h" * 18),
        )
    store = await open_store("pod-a")
    assert await store.file_history("app") == FileHistory(
        None, (Checkpoint(1, b"H" * 18, b"T" * 18, 300, False, device=7, inode=8, mtime_ns=0),)
    )
    other = await open_store("pod-b")
    assert (await other.file_history("app")).checkpoints[0].tail == b""  # a position saved before tails
    with psycopg.connect(pg_url) as db:
        assert db.execute("SELECT max(version) FROM schema_version").fetchone() == (SCHEMA_VERSION,)


async def test_one_instance_name_is_held_by_one_live_process(open_store: OpenStore, pg_url: str) -> None:
    first = await open_store("pod-a")
    # A second process given the same state.instance (constructed, not opened: opening would raise).
    second = PostgresStore(pg_url, password=None, instance="pod-a", max_pending=1000, lease_seconds=60)
    with pytest.raises(StateError, match=r"state\.instance 'pod-a' is held by another live process") as refused:
        await second.refresh()
    assert refused.value.operation == "instance" and "Give each process its own state.instance" in str(refused.value)
    assert second.problem is not None and "pod-a" in second.problem  # what /readyz says
    with pytest.raises(StateError):
        await second.enqueue("app", [Sighting("x")], now=0, due=0)  # it writes nothing under that name
    await first.keep_instance()
    # The holder stops being heard from (frozen, or its database away) for longer than the hold lasts: the
    # other takes the name over, and the former holder stops writing under it.
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("UPDATE instances SET seen = seen - interval '1 hour' WHERE instance = 'pod-a'")
    second._reconnect_at = 0.0  # (its backoff after the refusal)
    await second.refresh()
    with pytest.raises(StateError, match="taken over"):
        await first.keep_instance()
    await second.close()


async def test_a_name_whose_holder_died_on_this_host_is_taken_at_once(open_store: OpenStore, pg_url: str) -> None:
    done = subprocess.run(["true"], check=True)  # a process of this host and PID namespace, now gone
    assert done.returncode == 0
    me = process_identity()
    with psycopg.connect(pg_url, autocommit=True) as db:
        await open_store("pod-b")  # creates the schema
        db.execute("DELETE FROM instances")
        db.execute(
            "INSERT INTO instances VALUES ('pod-a', 'killed', %s, %s, %s, 12345, clock_timestamp())",
            (me.host, me.pidns, me.pid + 1_000_000),  # no such pid (pid_max is far lower)
        )
        db.execute(
            "INSERT INTO instances VALUES ('pod-c', 'elsewhere', 'other-host', 1, 1, 1, clock_timestamp())"
        )
    await open_store("pod-a")  # kill -9, restarted: no wait for the hold to run out
    with pytest.raises(StateError, match="held by another live process"):
        await open_store("pod-c")  # another host's: only its age frees it


async def test_a_newer_schema_is_refused(open_store: OpenStore, pg_url: str) -> None:
    await open_store("a")
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as db:
        await db.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(StateError, match="schema version"):
        await open_store("b")


async def test_an_unreachable_server_is_a_clear_error_without_the_password(postgres: Cluster) -> None:
    url = f"postgresql://zenmux:s3cret-pw@127.0.0.1:{postgres.port + 1}/fleetdb"
    with pytest.raises(StateError) as caught:
        await PostgresStore.open(url, password=None, instance="a", max_pending=10, lease_seconds=60)
    message = str(caught.value)
    assert f"127.0.0.1:{postgres.port + 1}/fleetdb" in message and "s3cret-pw" not in message


async def test_a_lost_server_fails_calls_fast_then_reconnects(open_store: OpenStore, postgres: Cluster) -> None:
    store = await open_store("a")
    await store.enqueue("src", [Sighting("before")], now=0, due=0)
    postgres.stop("immediate")  # a crash of the database
    try:
        with pytest.raises(StateError) as caught:
            await store.enqueue("src", [Sighting("during")], now=0, due=0)
        assert "127.0.0.1" in str(caught.value) and store.problem is not None
        with pytest.raises(StateError):  # within the backoff: no new connection attempt
            await store.status("before")
    finally:
        postgres.start()
    store._reconnect_at = 0.0  # the backoff's wait, skipped (its length is not under test)
    assert await store.status("before") == 0
    assert store.problem is None
