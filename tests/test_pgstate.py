"""The PostgreSQL backend's fleet behaviour on a real server: claims under a lease, one count per id across
replicas, the ledger followed incrementally, one rate limit, one leader, migrations, an unreachable server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from exporter.contribution import Contribution, Increment, LabelLimiter, LedgerShape
from exporter.fleet import LEADER_LEASE_SECONDS, Exposer
from exporter.ids import Sighting
from exporter.ledger import Ledger
from exporter.pgstate import SCHEMA, SCHEMA_VERSION, PostgresStore, process_identity
from exporter.store import DONE, Abandon, Checkpoint, FileHistory, PendingId, Resolved, Retry, StateError
from tests.pg import Cluster
from tests.support import FakeTime, one_generation, wait_until

OpenStore = Callable[..., Awaitable[PostgresStore]]


@pytest.fixture
async def open_store(pg_url: str) -> AsyncIterator[OpenStore]:
    opened: list[PostgresStore] = []

    async def open_store(
        instance: str, *, lease_seconds: float = 60, url: str = pg_url, **bounds: float
    ) -> PostgresStore:
        store = await PostgresStore.open(
            url, password=None, instance=instance, max_pending=1000, lease_seconds=lease_seconds, **bounds
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
    a, b = await open_store("resolver-a", lease_seconds=1), await open_store("resolver-b", lease_seconds=30)
    await a.enqueue("src", [Sighting(f"id{i}") for i in range(10)], now=0, due=0)
    first = await a.due(now=1, limit=6, exclude=set())
    second = await b.due(now=1, limit=6, exclude=set())
    assert len(first) == 6 and len(second) == 4
    assert not {p.id for p in first} & {p.id for p in second}
    in_flight = {p.id for p in second}  # what b's resolver passes: its own ids in flight
    assert await b.due(now=2, limit=10, exclude=in_flight) == []  # all claimed
    # a dies holding its claims: once the lease ran out (on the database's clock) they are b's.
    taken_over: list[PendingId] = []

    async def b_takes_over() -> bool:
        taken_over.extend(await b.due(now=3, limit=10, exclude=in_flight))
        return bool(taken_over)

    await wait_until(b_takes_over, timeout=10, what="a's lease to run out")
    assert {p.id for p in taken_over} == {p.id for p in first}
    # a comes back with a retry for an id b now holds: b's claim stands.
    assert await a.settle([Retry(first[0].id, due=100, attempts=1)], ledger(), now=32) == []
    # b restarts under the same name (nothing in flight): its claims are its own again at once.
    await b.close()
    again = await open_store("resolver-b", lease_seconds=30)
    assert len(await again.due(now=33, limit=20, exclude=set())) == 10


async def test_a_skewed_process_clock_neither_takes_over_live_leases_nor_sees_ids_due_early(
    open_store: OpenStore,
) -> None:
    """Leases and due times are compared on the database's clock: a resolver whose clock runs an hour ahead
    (or whose caller passes that time) claims nothing another holds, nor an id not yet due."""
    a, skewed = await open_store("resolver-a", lease_seconds=60), await open_store("resolver-b", lease_seconds=60)
    now = time.time()
    await a.enqueue("src", [Sighting("held")], now=now, due=now)
    await a.enqueue("src", [Sighting("later")], now=now, due=now + 600)
    assert [p.id for p in await a.due(now=now, limit=10, exclude=set())] == ["held"]
    ahead = now + 3600
    assert await skewed.due(now=ahead, limit=10, exclude=set()) == []
    # What is left is due in ~600 s, told on the caller's clock (skewed or not).
    assert await skewed.next_due(ahead, set()) == pytest.approx(ahead + 600, abs=5)
    # A retry's delay is kept whatever the caller's clock says: the id is not due at once on the database's.
    behind = now - 3600
    assert await a.settle([Retry("held", due=behind + 600, attempts=1)], ledger(), now=behind) != []
    assert await skewed.due(now=ahead, limit=10, exclude=set()) == []
    oldest = await a.oldest_pending()
    assert oldest is not None and oldest == pytest.approx(now, abs=5)


async def test_a_stale_resolvers_result_does_not_overwrite_the_lease_holders(open_store: OpenStore) -> None:
    """A resolver paused past its lease comes back with "abandoned, no cost" for an id another replica has
    claimed since: the holder's result with cost is the one counted."""
    stale, holder = await open_store("stale", lease_seconds=1), await open_store("holder", lease_seconds=60)
    exposer = await open_store("exposer")
    await stale.enqueue("src", [Sighting("x")], now=0, due=0)
    assert [p.id for p in await stale.due(now=0, limit=1, exclude=set())] == ["x"]
    # The stale resolver is held (as by SIGSTOP) while its lease runs out and the holder claims the id.
    claimed: list[PendingId] = []

    async def holder_claims() -> bool:
        claimed.extend(await holder.due(now=0, limit=1, exclude=set()))
        return bool(claimed)

    await wait_until(holder_claims, timeout=10, what="the stale lease to run out")
    assert await stale.settle([Abandon("x", "gave_up")], ledger(), now=0) == []
    assert len(await holder.settle([Resolved("x", one_generation(2.0))], ledger(), now=0)) == 1
    book = ledger()
    book.load(await exposer.ledger_rows())
    assert book.value("zenmux_cost_usd") == 2.0 and book.value("zenmux_generations") == 1
    assert await exposer.status("x") == DONE


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


async def test_histograms_and_counters_add_up_in_the_shared_ledger(open_store: OpenStore) -> None:
    """Settlements of two replicas, in three batches, leave the ledger the in-memory Ledger computes from the
    same contributions: counters summed, histogram buckets added element by element, sums summed."""
    exposer, a, b = await open_store("exposer"), await open_store("a"), await open_store("b")
    labels = ("m", "chat.completions")

    def generation(cost: float, tokens: float) -> Contribution:
        return Contribution((
            Increment("zenmux_cost_usd", labels, cost),
            Increment("zenmux_generation_cost_usd", labels, cost),
            Increment("zenmux_generation_tokens", (*labels, "prompt"), tokens),
            Increment("zenmux_generation_tokens", (*labels, "completion"), tokens / 2),
        ), {})

    # Costs sum exactly in binary: the database adds batch sums, the Ledger one value at a time.
    batches = [(a, [generation(0.0625, 10), generation(0.25, 300)]), (b, [generation(0.0625, 5000)]),
               (a, [generation(7.0, 10), generation(0.5, 1)])]
    expected = ledger()
    overlay = expected.overlay()
    serial = 0
    for store, items in batches:
        ids = [f"id{serial + i}" for i in range(len(items))]
        serial += len(items)
        await store.enqueue("src", [Sighting(i) for i in ids], now=0, due=0)
        await store.settle([Resolved(i, item) for i, item in zip(ids, items, strict=True)], ledger(), now=1)
        for item in items:
            expected.add(overlay, item)
    stored = {(metric, labels): json.loads(value) for metric, labels, value in await exposer.ledger_rows()}
    assert stored == {(metric, labels): json.loads(value) for metric, labels, value in overlay.rows()}
    assert len(stored) == 4


# A resolver process frozen (SIGSTOP) inside a settle, with the ledger rows every settle updates locked.
FROZEN_IN_A_SETTLE = """
import asyncio, os, signal, sys
from exporter.pgstate import PostgresStore

async def main() -> None:
    store = PostgresStore(sys.argv[1], password=None, instance="frozen", max_pending=10, lease_seconds=60,
                          lock_timeout=0.5, idle_in_transaction_timeout=1.0)

    async def work(db):
        async with db.transaction():
            await db.execute("UPDATE ledger SET changed = pg_current_xact_id()")
            os.kill(os.getpid(), signal.SIGSTOP)

    await store._call("settle", work)

asyncio.run(main())
"""


def stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


async def test_a_resolver_frozen_inside_a_settle_stalls_the_others_at_most_the_configured_bound(
    open_store: OpenStore, pg_url: str
) -> None:
    """Its session is ended by the server after state.idle_in_transaction_timeout_seconds, which frees the
    rows; meanwhile the others wait at most state.lock_timeout_seconds per try (without the bounds they would
    wait until the client gives up, and again at each try, for as long as the process stays frozen)."""
    resolver = await open_store("resolver", lock_timeout=0.5, idle_in_transaction_timeout=1.0)
    await resolver.enqueue("src", [Sighting("x"), Sighting("y")], now=0, due=0)
    await resolver.settle([Resolved("x", one_generation(1.0))], ledger(), now=0)  # the ledger rows exist
    frozen = subprocess.Popen([sys.executable, "-c", FROZEN_IN_A_SETTLE, pg_url])
    try:
        await wait_until(lambda: stopped(frozen.pid), what="the resolver frozen inside its settle")
        errors: list[str] = []

        async def settle_until_applied() -> None:
            while True:
                try:
                    if await resolver.settle([Resolved("y", one_generation(1.0))], ledger(), now=1):
                        return
                except StateError as err:  # counted and retried, as the resolver does
                    errors.append(str(err))

        await asyncio.wait_for(settle_until_applied(), 20)
        assert stopped(frozen.pid)  # still frozen: the server ended its session and freed its rows
        assert errors and all("lock timeout" in error for error in errors)
    finally:
        frozen.kill()
        frozen.wait()
    book = ledger()
    book.load(await resolver.ledger_rows())
    assert book.value("zenmux_cost_usd") == 2.0 and book.value("zenmux_generations") == 2


async def test_a_settlement_committed_while_the_exposer_reads_is_read_next_time(open_store: OpenStore) -> None:
    """The exposer's next cursor comes from the snapshot that read the rows: a settlement that commits right
    after that snapshot (here: as soon as the exposer's statement returns) is read on the next call, not
    passed over by a newer snapshot's horizon (the series would stay short until it changed again)."""
    exposer, resolver = await open_store("exposer"), await open_store("resolver")
    await resolver.enqueue("src", [Sighting("x")], now=0, due=0)
    assert await exposer.ledger_changes() == []
    db = exposer._db
    assert db is not None
    execute = db.execute
    settled: list[object] = []

    async def execute_then_settle(*args: Any, **kwargs: Any) -> Any:
        cursor = await execute(*args, **kwargs)
        if not settled:  # once, between the exposer's statement and whatever the exposer does next
            settled.extend(await resolver.settle([Resolved("x", one_generation(3.0))], ledger(), now=1))
        return cursor

    db.execute = execute_then_settle  # type: ignore[method-assign]
    book = ledger()
    book.load(await exposer.ledger_changes())
    assert settled and book.value("zenmux_cost_usd") == 0.0  # committed after the read
    book.load(await exposer.ledger_changes())
    assert book.value("zenmux_cost_usd") == 3.0 and book.value("zenmux_generations") == 1


async def test_label_values_are_admitted_for_the_fleet_up_to_the_cap(open_store: OpenStore) -> None:
    """Resolvers asking at once for different new models never name more than the cap between them, and each
    gets the same answer for the same value."""
    stores = [await open_store(f"resolver-{i}") for i in range(4)]
    answers = await asyncio.gather(*(
        store.admit_labels([("model", f"m{i}", 2), ("model", f"m{i + 1}", 2), ("protocol", "chat", 5)])
        for i, store in enumerate(stores)
    ))
    named = {value for answer in answers for label, value in answer if label == "model"}
    assert len(named) == 2 and all(("protocol", "chat") in answer for answer in answers)
    for i, answer in enumerate(answers):
        assert {v for label, v in answer if label == "model"} == named & {f"m{i}", f"m{i + 1}"}
    again = await stores[0].admit_labels([("model", value, 2) for value in ["m0", "m1", "m2", "m3", "m4"]])
    assert {value for _, value in again} == named


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
    assert await a.try_lead(60) is True
    assert await b.try_lead(60) is False
    assert await a.try_lead(60) is True and await b.try_lead(60) is False
    await a.close()  # a leader that stops hands over at once
    assert await b.try_lead(60) is True


async def test_a_leader_that_stops_renewing_loses_the_lead_and_does_not_take_it_back(open_store: OpenStore) -> None:
    """The lead is a lease on the database's clock: a leader frozen (or cut off) past it is replaced, and when
    it comes back it follows; at no instant do two hold it."""
    a, b = await open_store("a"), await open_store("b")
    assert await a.try_lead(1) is True
    assert await b.try_lead(1) is False  # a's lease is live
    await wait_until(lambda: b.try_lead(60), timeout=10, what="a's lease to run out")
    assert await a.try_lead(1) is False  # back from its pause: b leads
    async with await psycopg.AsyncConnection.connect(store_url(a), autocommit=True) as db:
        rows = await (await db.execute("SELECT holder FROM leader")).fetchall()
    assert rows == [("b",)]


async def test_an_exposer_stops_leading_by_its_own_clock_when_its_lease_ran_out(open_store: OpenStore) -> None:
    """Frozen past its lease, a leader must not serve the fleet's series when it wakes, before it asks again."""
    clock = FakeTime()
    exposer = Exposer(await open_store("a"), ledger(), monotonic=clock.monotonic)
    stop = asyncio.Event()
    running = asyncio.create_task(exposer.run(stop))
    try:
        await wait_until(lambda: exposer.leading, what="the lead")
        clock.now += LEADER_LEASE_SECONDS  # frozen that long (its loop has not run meanwhile)
        assert not exposer.leading
    finally:
        stop.set()
        await running


async def test_a_version_1_database_is_migrated_in_place(open_store: OpenStore, pg_url: str) -> None:
    await open_store("a")
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as db:  # back to version 1
        await db.execute("DROP TABLE leader, label_values, checkpoints, file_horizons, instances")
        await db.execute("DROP FUNCTION zenmux_now() CASCADE")
        await db.execute(SCHEMA[SCHEMA.index("CREATE TABLE positions") : SCHEMA.index("CREATE TABLE ledger")])
        await db.execute("DELETE FROM schema_version")
        await db.execute("INSERT INTO schema_version VALUES (1)")
    b = await open_store("b")
    assert await b.try_lead(60) is True
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as db:
        row = await (await db.execute("SELECT max(version) FROM schema_version")).fetchone()
    assert row == (SCHEMA_VERSION,)


async def test_a_version_3_database_is_migrated_in_place_to_hot_updates(open_store: OpenStore, pg_url: str) -> None:
    """Schema 4 drops the index on the ledger's `changed` column and leaves the ledger's and the queue's pages half
    empty (HOT updates); a version 3 database keeps its ledger, and an exposer still reads only what changed since
    its last read."""
    a = await open_store("a")
    await a.enqueue("src", [Sighting("x"), Sighting("y")], now=0, due=0)
    await a.settle([Resolved("x", one_generation(1.0))], ledger(), now=1)
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as db:  # back to version 3
        await db.execute("CREATE INDEX ledger_by_change ON ledger (changed)")
        await db.execute("ALTER TABLE ledger RESET (fillfactor)")
        await db.execute("ALTER TABLE queue SET (fillfactor = 80)")
        await db.execute("DELETE FROM schema_version")
        await db.execute("INSERT INTO schema_version VALUES (3)")
    exposer = await open_store("exposer")
    book = ledger()
    book.load(await exposer.ledger_changes())
    assert book.value("zenmux_cost_usd") == 1.0 and book.value("zenmux_generations") == 1
    assert await exposer.ledger_changes() == []  # nothing changed since
    await a.settle([Resolved("y", one_generation(2.0))], ledger(), now=2)
    changed = await exposer.ledger_changes()
    assert {metric for metric, _, _ in changed} >= {"zenmux_cost_usd", "zenmux_generations"}
    book.load(changed)
    assert book.value("zenmux_cost_usd") == 3.0 and book.value("zenmux_generations") == 2
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as db:
        indexes = await (await db.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'ledger'")).fetchall()
        ledger_options = await (await db.execute("SELECT reloptions FROM pg_class WHERE relname = 'ledger'")).fetchone()
        queue_options = await (await db.execute("SELECT reloptions FROM pg_class WHERE relname = 'queue'")).fetchone()
        version = await (await db.execute("SELECT max(version) FROM schema_version")).fetchone()
    assert indexes == [("ledger_pkey",)] and ledger_options == (["fillfactor=50"],) and version == (SCHEMA_VERSION,)
    assert queue_options is not None and "fillfactor=50" in queue_options[0]


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
