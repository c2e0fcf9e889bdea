"""The PostgreSQL state backend (fleet mode): queue, dedupe memory, file checkpoints, ledger; shared by processes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict

from exporter.contribution import DAILY_METRICS, LabelValues
from exporter.coordination import Coordination, SharedCoordination
from exporter.ids import Labels, Sighting
from exporter.ledger import Ledger, Overlay, number_json
from exporter.store import (
    ABANDONED,
    DONE,
    PENDING,
    Abandon,
    Checkpoint,
    Enqueued,
    FileHistory,
    Grant,
    LedgerRow,
    PendingId,
    Resolved,
    Retry,
    Settlement,
    StateDump,
    StateError,
    cannot,
    checkpoint_from_row,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 4
# Taken (in the migrating transaction) by whoever migrates, so replicas starting together migrate once.
MIGRATE_LOCK = 0x7A6D7801
CONNECT_TIMEOUT_SECONDS = 5
# The server-side bounds every connection sets (state.statement_timeout_seconds, state.lock_timeout_seconds,
# state.idle_in_transaction_timeout_seconds): a process frozen inside a transaction (SIGSTOP, a stalled node)
# loses its session, and its locks, after the last; whoever waits on a lock gives up after the second.
STATEMENT_TIMEOUT_SECONDS = 30.0
LOCK_TIMEOUT_SECONDS = 2.0
IDLE_IN_TRANSACTION_TIMEOUT_SECONDS = 5.0
# A client gives up on a round trip this long after the server would have (a lost server, a partition).
CLIENT_TIMEOUT_MARGIN_SECONDS = 5.0
RECONNECT_INITIAL_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 30.0

# The queue is keyed by id: the dedupe of pending ids is its primary key (no per-process memory, which many
# ingesters could not share). A claim sets claimed_by and lease_until; an id whose lease ran out is due again.
# The queue is the hot table (every id is inserted, claimed and deleted once): autovacuum runs on it after 1 %
# of its rows changed instead of 20 %, without cost delay, and pages keep room for HOT updates of claims
# (version 4: half of each page).
# Ledger rows carry the transaction that changed them last (xid8): an exposer reads the rows changed since its
# previous read's snapshot horizon, so a settlement committed late is never missed. (Version 4 drops the index
# on `changed` below: see MIGRATIONS[4].)
SCHEMA = """
CREATE TABLE queue (
    id text PRIMARY KEY,
    source text NOT NULL,
    labels text NOT NULL,
    first_seen float8 NOT NULL,
    due float8 NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    claimed_by text,
    lease_until float8 NOT NULL DEFAULT 0
) WITH (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000,
        autovacuum_vacuum_cost_delay = 0, autovacuum_analyze_scale_factor = 0.02);
CREATE INDEX queue_by_due ON queue (due);
CREATE INDEX queue_by_first_seen ON queue (first_seen);
CREATE TABLE finished (
    id text PRIMARY KEY,
    status smallint NOT NULL,
    attempts integer NOT NULL,
    finished float8 NOT NULL
);
CREATE INDEX finished_by_age ON finished (finished);
CREATE TABLE positions (
    instance text NOT NULL,
    source text NOT NULL,
    device bigint NOT NULL,
    inode bigint NOT NULL,
    "offset" bigint NOT NULL,
    fingerprint bytea NOT NULL,
    PRIMARY KEY (instance, source)
);
CREATE TABLE ledger (
    metric text NOT NULL,
    labels text NOT NULL,
    counter float8,
    buckets float8[],
    total float8,
    changed xid8 NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (metric, labels)
);
CREATE INDEX ledger_by_change ON ledger (changed);
CREATE TABLE rate_limit (
    name text PRIMARY KEY,
    tokens float8 NOT NULL,
    refilled float8 NOT NULL,
    paused_until float8 NOT NULL
);
INSERT INTO rate_limit VALUES ('zenmux', 0, 0, 0);
CREATE VIEW generations (id, status, source, labels, first_seen, due, attempts, finished) AS
    SELECT id, 0::smallint, source, labels, first_seen, due, attempts, NULL FROM queue
    UNION ALL SELECT id, status, NULL, NULL, NULL, NULL, attempts, finished FROM finished;
"""
# Version 2: the database's clock as one function, and leadership as a lease row on it (River's leader table):
# at most one holder at any instant the database sees, through a transaction-mode pooler too (a session
# advisory lock is not: the pooler hands the session to others, and a dropped session leaves two leaders).
# label_values: the label values the fleet names (metrics.max_models and max_label_values hold per fleet).
# Version 3: one checkpoint per generation of a file source's log (and the source's horizon) instead of one
# position per source; a position becomes the source's first checkpoint, unfinished, with no horizon yet.
# instances: which live process holds each instance name.
# Version 4: the ledger's updates are HOT (heap-only: the new row version goes on the same page, no index entry
# is written): no index on `changed` (an exposer's read of the changes scans the ledger once a second: its rows
# are bounded by the fleet's label value caps) and pages half empty, room for each row's next version. Every
# settle updates a row per series it touches: WAL per settle fell from ~4.5 to ~2 records a row, and the upsert's
# server time by about half in a micro-benchmark (500 series). The queue's pages too are left half empty (80 %
# full before): ids enqueued together share pages and are claimed together, and at 80 % only 44 % of the claims
# in the fleet benchmark were HOT (the others wrote a row elsewhere and an entry in each of the queue's three
# indexes). Pages already full get their room as rows move (the queue turns over every billing delay).
MIGRATIONS = {
    2: """
CREATE FUNCTION zenmux_now() RETURNS float8 LANGUAGE sql STABLE PARALLEL SAFE
    AS 'SELECT extract(epoch FROM statement_timestamp())::float8';
CREATE TABLE leader (
    name text PRIMARY KEY,
    holder text NOT NULL,
    expires float8 NOT NULL
);
CREATE TABLE label_values (
    label text NOT NULL,
    value text NOT NULL,
    PRIMARY KEY (label, value)
);
""",
    3: """
CREATE TABLE checkpoints (
    instance text NOT NULL,
    source text NOT NULL,
    generation bigint NOT NULL,
    head bytea NOT NULL,
    tail bytea NOT NULL,
    "offset" bigint NOT NULL,
    finished boolean NOT NULL,
    device bigint NOT NULL,
    inode bigint NOT NULL,
    mtime_ns bigint NOT NULL,
    PRIMARY KEY (instance, source, generation)
);
CREATE TABLE file_horizons (
    instance text NOT NULL,
    source text NOT NULL,
    horizon_ns bigint NOT NULL,
    PRIMARY KEY (instance, source)
);
CREATE TABLE instances (
    instance text PRIMARY KEY,
    owner text NOT NULL,
    host text NOT NULL,
    pidns bigint NOT NULL,
    pid integer NOT NULL,
    started bigint NOT NULL,
    seen timestamptz NOT NULL
);
INSERT INTO checkpoints
    SELECT instance, source, 1, substring(fingerprint FROM 1 FOR 18), substring(fingerprint FROM 19 FOR 18),
           "offset", false, device, inode, 0
    FROM positions;
DROP TABLE positions;
""",
    4: """
DROP INDEX IF EXISTS ledger_by_change;
ALTER TABLE ledger SET (fillfactor = 50);
ALTER TABLE queue SET (fillfactor = 50);
""",
}

# Lists of ids travel as JSON (json.dumps is C; psycopg dumps a list parameter element by element in Python,
# ~7 us an element: a claim's list of busy ids alone was ~5 % of the exporter's CPU). An object is keyed by id.
# zenmux_now() is the database's clock (one value for a whole statement): leases, due times and leadership are
# compared on it, never on a process's wall clock (a skewed replica would take over live leases, or see ids due
# early). A process hands the store delays; times it reads back come as ages, placed on its own clock.
ENQUEUE = """
INSERT INTO queue (id, source, labels, first_seen, due)
SELECT u.key, %(source)s, u.value, t.now, t.now + %(delay)s
FROM jsonb_each_text(%(fresh)s::jsonb) AS u, (SELECT zenmux_now() AS now) t
WHERE NOT EXISTS (SELECT 1 FROM finished f WHERE f.id = u.key)
ON CONFLICT (id) DO NOTHING
"""
# An instance name is held by one live process: it renews its row every HOUSEKEEPING round; another process may
# take the name over once the row is INSTANCE_TTL_SECONDS old (database clock), or at once when the holder is a
# process of this host's PID namespace that is gone (a restart after kill -9).
HOLD_INSTANCE = """
INSERT INTO instances AS i (instance, owner, host, pidns, pid, started, seen)
VALUES (%(instance)s, %(owner)s, %(host)s, %(pidns)s, %(pid)s, %(started)s, clock_timestamp())
ON CONFLICT (instance) DO UPDATE SET owner = excluded.owner, host = excluded.host, pidns = excluded.pidns,
    pid = excluded.pid, started = excluded.started, seen = excluded.seen
WHERE i.owner = excluded.owner OR i.owner = %(gone)s
    OR i.seen < clock_timestamp() - make_interval(secs => %(ttl)s)
RETURNING owner
"""
INSTANCE_TTL_SECONDS = 30.0
# Releasing the name at close is a courtesy to the next process: a database that hangs must not hold a shutdown.
RELEASE_TIMEOUT_SECONDS = 1.0
SAVE_CHECKPOINT = """
INSERT INTO checkpoints (instance, source, generation, head, tail, "offset", finished, device, inode, mtime_ns)
VALUES (%(instance)s, %(source)s, %(generation)s, %(head)s, %(tail)s, %(offset)s, %(finished)s, %(device)s,
        %(inode)s, %(mtime_ns)s)
ON CONFLICT (instance, source, generation) DO UPDATE SET head = excluded.head, tail = excluded.tail,
    "offset" = excluded."offset", finished = excluded.finished, device = excluded.device, inode = excluded.inode,
    mtime_ns = excluded.mtime_ns
"""
# Ids and checkpoint in one statement: one round trip, one transaction.
ENQUEUE_WITH_CHECKPOINT = f"WITH saved AS ({SAVE_CHECKPOINT}) {ENQUEUE}"
CLAIM = """
UPDATE queue q SET claimed_by = %(me)s, lease_until = zenmux_now() + %(lease)s
FROM (SELECT id FROM queue WHERE due <= zenmux_now() AND (lease_until <= zenmux_now() OR claimed_by = %(me)s)
      AND id NOT IN (SELECT jsonb_array_elements_text(%(exclude)s::jsonb))
      ORDER BY due LIMIT %(limit)s FOR UPDATE SKIP LOCKED) c
WHERE q.id = c.id
RETURNING q.id, q.source, q.labels, zenmux_now() - q.first_seen, q.attempts, q.due
"""
NEXT_DUE = """
SELECT due - zenmux_now() FROM queue WHERE (lease_until <= zenmux_now() OR claimed_by = %(me)s)
AND id NOT IN (SELECT jsonb_array_elements_text(%(exclude)s::jsonb)) ORDER BY due LIMIT 1
"""
# Deltas are added in the database (rows locked in key order, so two settlements never deadlock each other).
# One JSON document: psycopg dumps a list parameter element by element in Python (~30 ms for a batch's ~900 rows
# as typed columns, 10x the JSON); the bucket sum (a subquery) runs for histograms only.
ADD_TO_LEDGER = """
INSERT INTO ledger AS l (metric, labels, counter, buckets, total)
SELECT r.metric, r.labels, r.counter, r.buckets, r.total
FROM jsonb_to_recordset(%s::jsonb) AS r(metric text, labels text, counter float8, buckets float8[], total float8)
ORDER BY r.metric, r.labels
ON CONFLICT (metric, labels) DO UPDATE SET
    counter = l.counter + excluded.counter,
    buckets = CASE WHEN excluded.buckets IS NOT NULL THEN (SELECT array_agg(a + b ORDER BY i)
               FROM unnest(l.buckets, excluded.buckets) WITH ORDINALITY AS t(a, b, i)) END,
    total = l.total + excluded.total,
    changed = pg_current_xact_id()
"""
# Ended ids leave the queue and enter finished in one statement; the rows say which ids are newly finished
# (those count) and how many left the queue (the second column, on every row; a lone NULL id when none is new).
# Fenced by the lease: an id another replica holds a live claim on is that replica's to settle (a resolver
# paused past its lease must not end it, say "abandoned, no cost" over the holder's result with cost).
END = """
WITH gone AS (DELETE FROM queue WHERE id = ANY(ARRAY(SELECT jsonb_object_keys(%(ended)s::jsonb)))
              AND (claimed_by = %(me)s OR claimed_by IS NULL OR lease_until <= zenmux_now()) RETURNING id, attempts),
ended AS (
    INSERT INTO finished (id, status, attempts, finished)
    SELECT g.id, u.value::int2, g.attempts + 1, %(now)s
    FROM gone g JOIN jsonb_each_text(%(ended)s::jsonb) AS u ON u.key = g.id
    ON CONFLICT (id) DO NOTHING RETURNING id
)
SELECT e.id, (SELECT count(*) FROM gone) FROM (SELECT NULL::text AS id UNION ALL SELECT id FROM ended) e
"""
RETRY = """
UPDATE queue SET due = zenmux_now() + u.delay, attempts = u.attempts, claimed_by = NULL, lease_until = 0
FROM unnest(%(ids)s::text[], %(delay)s::float8[], %(attempts)s::int4[]) AS u(id, delay, attempts)
WHERE queue.id = u.id AND (queue.claimed_by = %(me)s OR queue.claimed_by IS NULL OR queue.lease_until <= zenmux_now())
RETURNING queue.id
"""
TAKE_TOKENS = """
UPDATE rate_limit SET tokens = least(%(burst)s, tokens + greatest(t.now - refilled, 0) * %(rate)s) - %(wanted)s,
    refilled = greatest(t.now, refilled)
FROM (SELECT extract(epoch FROM clock_timestamp())::float8 AS now) t
WHERE name = 'zenmux'
RETURNING tokens, greatest(paused_until - t.now, 0)
"""
PAUSE = """
UPDATE rate_limit SET paused_until = greatest(paused_until, extract(epoch FROM clock_timestamp()) + %s)
WHERE name = 'zenmux'
"""
# The next cursor comes from the snapshot that read the rows, in the same statement (with no row changed, one
# row of NULLs carries it): a second statement's newer snapshot could pass a settlement committed in between.
# Names the values wanted while their label has room (each label's admissions one at a time: a transaction
# lock per label, taken in order), and answers every wanted value that is named, now or before. The final
# SELECT does not see the rows this statement inserts (one snapshot): both are returned.
LOCK_LABELS = "SELECT pg_advisory_xact_lock(hashtext('zenmux-label:' || l)) FROM unnest(%s::text[]) l ORDER BY l"
ADMIT_LABELS = """
WITH wanted AS (SELECT * FROM unnest(%(labels)s::text[], %(values)s::text[], %(caps)s::int8[]) AS w(label, value, cap)),
fresh AS (
    SELECT w.label, w.value, w.cap, row_number() OVER (PARTITION BY w.label ORDER BY w.value) AS n FROM wanted w
    WHERE NOT EXISTS (SELECT 1 FROM label_values v WHERE v.label = w.label AND v.value = w.value)
),
used AS (SELECT label, count(*) AS n FROM label_values WHERE label = ANY(%(labels)s::text[]) GROUP BY label),
added AS (
    INSERT INTO label_values SELECT f.label, f.value FROM fresh f LEFT JOIN used u ON u.label = f.label
    WHERE coalesce(u.n, 0) + f.n <= f.cap ON CONFLICT DO NOTHING RETURNING label, value
)
SELECT label, value FROM added
UNION SELECT w.label, w.value FROM wanted w JOIN label_values v ON v.label = w.label AND v.value = w.value
"""
# Takes the lead, or renews it, unless another holds a lease that has not run out.
LEAD = """
INSERT INTO leader AS l (name, holder, expires) VALUES ('exposers', %(me)s, zenmux_now() + %(lease)s)
ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires = excluded.expires
WHERE l.holder = excluded.holder OR l.expires <= zenmux_now()
RETURNING holder
"""
STEP_DOWN = "DELETE FROM leader WHERE name = 'exposers' AND holder = %s"
LEDGER_CHANGES = """
SELECT h.horizon, l.metric, l.labels, l.counter, l.buckets, l.total
FROM (SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS horizon) h
LEFT JOIN ledger l ON l.changed >= %s::xid8
"""


@lru_cache(maxsize=4096)
def _labels_text(labels: Labels) -> str:
    return json.dumps(labels) if labels else ""


@lru_cache(maxsize=4096)
def _labels_value(text: str) -> Labels:
    return tuple((str(k), str(v)) for k, v in json.loads(text)) if text else ()


@lru_cache(maxsize=65536)  # the same series are written with every batch that touches them
def _series_json(metric: str, labels: LabelValues) -> str:
    """The head of a series' object in ADD_TO_LEDGER's document, as json.dumps writes it."""
    return f'{{"metric": {json.dumps(metric)}, "labels": {json.dumps(json.dumps(labels))}'


def _ledger_document(overlay: Overlay) -> str:
    """ADD_TO_LEDGER's document for a batch's increments, "" for none: the text json.dumps makes of a list of
    {"metric", "labels", "counter", "buckets", "total"} objects, put together from cached pieces (~500 series
    a batch: building the objects and dumping them was ~2 ms a batch)."""
    rows = [
        f'{_series_json(metric, labels)}, "counter": {number_json(value)}, "buckets": null, "total": null}}'
        for (metric, labels), value in itertools.chain(overlay.counters.items(), overlay.daily.items())
    ]
    rows += [
        f'{_series_json(metric, labels)}, "counter": null, "buckets": [{", ".join(map(repr, hist.buckets))}], '
        f'"total": {number_json(hist.sum)}}}'
        for (metric, labels), hist in overlay.histograms.items()
    ]
    return f"[{', '.join(rows)}]" if rows else ""


def _row(
    metric: str, labels: str, counter: float | None, buckets: list[float] | None, total: float | None
) -> LedgerRow:
    value = json.dumps(counter) if buckets is None else json.dumps({"b": buckets, "s": total})
    return metric, labels, value


class PostgresStore:
    """The Store on PostgreSQL (psycopg 3, async): every process of a fleet opens one on the same database.

    One connection serves the process's calls one at a time (an asyncio lock: a transaction is never
    interleaved with another task's statements); the leading exposer holds a second one for its lock. A lost
    connection is opened again on the next call, no sooner than an exponential backoff allows; meanwhile calls
    fail fast with a StateError naming the server and database (never the password)."""

    shared = True

    def __init__(
        self,
        url: str,
        *,
        password: str | None,
        instance: str,
        max_pending: int,
        lease_seconds: float,
        statement_timeout: float = STATEMENT_TIMEOUT_SECONDS,
        lock_timeout: float = LOCK_TIMEOUT_SECONDS,
        idle_in_transaction_timeout: float = IDLE_IN_TRANSACTION_TIMEOUT_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.max_pending = max_pending
        self.instance = instance
        self.problem: str | None = None
        self._url = url
        self._password = password
        self._lease = lease_seconds
        self._bounds = {
            "statement_timeout": f"{round(statement_timeout * 1000)}ms",
            "lock_timeout": f"{round(lock_timeout * 1000)}ms",
            "idle_in_transaction_session_timeout": f"{round(idle_in_transaction_timeout * 1000)}ms",
        }
        self._client_timeout = statement_timeout + CLIENT_TIMEOUT_MARGIN_SECONDS
        self._monotonic = monotonic
        self._wall = wall
        self._secrets = [str(s) for s in (password, conninfo_to_dict(url).get("password")) if s]
        self._db: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()
        self._reconnect_at = 0.0
        self._reconnect_wait = RECONNECT_INITIAL_SECONDS
        self._counted = 0  # pending ids at the last count, plus what this process added and removed since
        self._cursor = "0"  # the ledger's change horizon (an xid8) for ledger_changes
        self._migrated = False  # the schema is checked (created, migrated) on the first connection
        self._me = process_identity()
        info = conninfo_to_dict(url)
        self._where = (
            f"postgresql {info.get('user') or '(default user)'}@{info.get('host') or '(local socket)'}:"
            f"{info.get('port') or 5432}/{info.get('dbname') or '(default database)'}"
        )

    @property
    def description(self) -> str:
        return self._where

    @property
    def pending(self) -> int:
        return max(self._counted, 0)

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        password: str | None,
        instance: str,
        max_pending: int,
        lease_seconds: float,
        statement_timeout: float = STATEMENT_TIMEOUT_SECONDS,
        lock_timeout: float = LOCK_TIMEOUT_SECONDS,
        idle_in_transaction_timeout: float = IDLE_IN_TRANSACTION_TIMEOUT_SECONDS,
    ) -> PostgresStore:
        """Connects, creates or migrates the schema and counts the queue; raises StateError if it cannot."""
        store = cls(
            url,
            password=password,
            instance=instance,
            max_pending=max_pending,
            lease_seconds=lease_seconds,
            statement_timeout=statement_timeout,
            lock_timeout=lock_timeout,
            idle_in_transaction_timeout=idle_in_transaction_timeout,
        )
        await store.refresh()
        return store

    # --- connections and errors ---------------------------------------------------------------------------

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        db = await psycopg.AsyncConnection.connect(
            self._url,
            password=self._password,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            application_name=f"zenmux-exporter {self.instance}"[:63],
            # A peer that vanished without closing (a partition) is noticed in ~30 s, not hours.
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        )
        # Set per session, not as startup options (which poolers refuse); behind a transaction-mode pooler the
        # role's own settings (ALTER ROLE ... SET) are what holds: docs/fleet.md says so.
        try:
            await asyncio.wait_for(
                db.execute(
                    "SELECT set_config('statement_timeout', %(statement_timeout)s, false), "
                    "set_config('lock_timeout', %(lock_timeout)s, false), "
                    "set_config('idle_in_transaction_session_timeout', %(idle_in_transaction_session_timeout)s, false)",
                    self._bounds,
                ),
                self._client_timeout,
            )
        except BaseException:
            with contextlib.suppress(psycopg.Error, OSError):
                await db.close()
            raise
        return db

    def _error(self, operation: str, err: BaseException) -> StateError:
        detail = " ".join((str(err).strip() or type(err).__name__).split())  # libpq's hint lines: one log line
        for secret in self._secrets:
            detail = detail.replace(secret, "<redacted>")
        repeated = self.problem is not None and self.problem.endswith(detail)
        self.problem = f"{self._where}: {cannot(operation)}: {detail}"
        if not repeated:  # one line per outage, whichever call meets it first; "connected again" ends it
            log.warning("%s; retrying with backoff (/readyz not ready meanwhile)", self.problem)
        return StateError(self.problem, operation, reported=True)

    async def _call(self, operation: str, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        """Runs `work` on the connection, alone; any failure leaves as a StateError (the transaction, if any,
        rolled back), and a broken connection is dropped for the next call to open again."""
        async with self._lock:
            db = self._db
            try:
                if db is None or db.closed:
                    if self._monotonic() < self._reconnect_at:
                        raise StateError(self.problem or f"{self._where}: not connected", operation, reported=True)
                    try:
                        db = self._db = await self._connect()
                        if not self._migrated:  # the first connection creates or checks the schema
                            await asyncio.wait_for(self._migrate(db), self._client_timeout)
                            self._migrated = True
                        await asyncio.wait_for(self._hold_instance(db), STATEMENT_TIMEOUT_SECONDS)
                    except BaseException as err:
                        self._reconnect_at = self._monotonic() + self._reconnect_wait
                        self._reconnect_wait = min(self._reconnect_wait * 2, RECONNECT_MAX_SECONDS)
                        if isinstance(err, StateError):  # a newer schema, or the instance held by another
                            self.problem = str(err)
                        await self._drop()  # an unchecked schema is checked again on the next connection
                        raise
                    if self.problem is not None:
                        log.info("%s: connected again", self._where)
                    self._reconnect_wait = RECONNECT_INITIAL_SECONDS
                result = await asyncio.wait_for(work(db), self._client_timeout)
            except StateError:
                raise
            except (psycopg.Error, OSError, TimeoutError) as err:
                if db is not None and (db.broken or isinstance(err, TimeoutError | psycopg.OperationalError)):
                    await self._drop()
                raise self._error(operation, err) from None
            except asyncio.CancelledError:
                await self._drop()  # cancelled mid-statement: the connection's state is unknown
                raise
        self.problem = None
        return result

    async def _hold_instance(self, db: psycopg.AsyncConnection[Any]) -> None:
        """Takes this process's instance name, or raises StateError("instance") while another live process
        holds it: two processes under one name would read each log twice and settle each other's claims."""
        row = await (await db.execute(
            "SELECT owner, host, pidns, pid, started, extract(epoch FROM clock_timestamp() - seen) FROM instances "
            "WHERE instance = %s",
            (self.instance,),
        )).fetchone()
        gone = ""
        if row is not None and row[0] != self._me.owner and self._me.sees_gone(row[1], row[2], row[3], row[4]):
            gone = row[0]
        params = {"instance": self.instance, "gone": gone, "ttl": INSTANCE_TTL_SECONDS, **self._me.params()}
        if await (await db.execute(HOLD_INSTANCE, params)).fetchone() is None:
            assert row is not None
            problem = (
                f"{self._where}: state.instance {self.instance!r} is held by another live process (host {row[1]}, "
                f"pid {row[3]}): two processes with one instance name would share file checkpoints and claims. "
                "Give each process its own state.instance (the default, $HOSTNAME, is a pod's name); this one "
                f"waits until that one has not been heard from for {INSTANCE_TTL_SECONDS:.0f} s"
            )
            if self.problem != problem:  # said once, not at every retry
                log.error("%s", problem)
            raise StateError(problem, "instance", reported=True)

    async def keep_instance(self) -> None:
        """Renews this process's hold on its instance name; raises StateError if another process took it over
        (this one was frozen, or its database away, for longer than the hold lasts): then this process stops
        writing under the name until it can take it back."""

        async def work(db: psycopg.AsyncConnection[Any]) -> None:
            cursor = await db.execute(
                "UPDATE instances SET seen = clock_timestamp() WHERE instance = %s AND owner = %s",
                (self.instance, self._me.owner),
            )
            if cursor.rowcount != 1:
                await self._drop()  # the next call takes the name again, or says who holds it
                self.problem = (
                    f"{self._where}: state.instance {self.instance!r} was taken over by another process while this "
                    "one was not heard from; this one stops writing under it"
                )
                log.error("%s", self.problem)
                raise StateError(self.problem, "instance", reported=True)

        await self._call("instance", work)

    async def _drop(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await db.close()

    async def close(self) -> None:
        async with self._lock:
            db = self._db
            if db is not None and not db.closed:
                # A leader that stops hands over now, not when its lease runs out (a no-op for the others), and
                # the instance name is free for the next process at once.
                with contextlib.suppress(psycopg.Error, OSError, TimeoutError):
                    await asyncio.wait_for(db.execute(STEP_DOWN, (self.instance,)), RELEASE_TIMEOUT_SECONDS)
                    await asyncio.wait_for(db.execute(
                        "DELETE FROM instances WHERE instance = %s AND owner = %s", (self.instance, self._me.owner)
                    ), RELEASE_TIMEOUT_SECONDS)
            await self._drop()

    async def _migrate(self, db: psycopg.AsyncConnection[Any]) -> None:
        async with db.transaction():
            await db.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
            row = await (await db.execute("SELECT max(version) FROM schema_version")).fetchone()
            version = None if row is None else row[0]
            if version is None:
                await db.execute(SCHEMA)
                for step in sorted(MIGRATIONS):
                    await db.execute(MIGRATIONS[step])
                await db.execute("INSERT INTO schema_version VALUES (%s)", (SCHEMA_VERSION,))
                log.info("%s: created the state schema (version %d)", self._where, SCHEMA_VERSION)
            elif version < SCHEMA_VERSION:  # in this same transaction: DDL is transactional
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    await db.execute(MIGRATIONS[step])
                await db.execute("INSERT INTO schema_version VALUES (%s)", (SCHEMA_VERSION,))
                log.info("%s: migrated the state schema from version %d to %d", self._where, version, SCHEMA_VERSION)
            elif version > SCHEMA_VERSION:
                raise StateError(
                    f"{self._where}: schema version {version}, this exporter reads {SCHEMA_VERSION}: "
                    "run the newer exporter (or restore the database it was made for)",
                    "schema",
                )

    # --- ingest -------------------------------------------------------------------------------------------

    async def enqueue(
        self,
        source: str,
        sightings: Sequence[Sighting],
        now: float,
        due: float,
        checkpoint: Checkpoint | None = None,
        *,
        bounded: bool = True,
    ) -> Enqueued:
        room = max(self.max_pending - self.pending, 0) if bounded else len(sightings)
        admitted = sightings[:room]
        fresh: dict[str, Labels] = {}
        for sighting in admitted:
            fresh.setdefault(sighting.id, sighting.labels)
        params: dict[str, Any] = {
            "source": source,
            "delay": due - now,
            "fresh": json.dumps({i: _labels_text(labels) for i, labels in fresh.items()}),
        }
        if checkpoint is not None:
            params.update(self._checkpoint_params(source, checkpoint))

        async def work(db: psycopg.AsyncConnection[Any]) -> int:
            if not fresh and checkpoint is None:
                return 0
            cursor = await db.execute(ENQUEUE if checkpoint is None else ENQUEUE_WITH_CHECKPOINT, params)
            return max(cursor.rowcount, 0)

        accepted = await self._call("enqueue", work)
        self._counted += accepted
        return Enqueued(accepted, len(admitted) - accepted, len(sightings) - len(admitted))

    def _checkpoint_params(self, source: str, checkpoint: Checkpoint) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "source": source,
            "generation": checkpoint.generation,
            "head": checkpoint.head,
            "tail": checkpoint.tail,
            "offset": checkpoint.offset,
            "finished": checkpoint.finished,
            "device": checkpoint.device,
            "inode": checkpoint.inode,
            "mtime_ns": checkpoint.mtime_ns,
        }

    async def file_history(self, source: str) -> FileHistory:
        async def work(db: psycopg.AsyncConnection[Any]) -> tuple[list[tuple[Any, ...]], tuple[Any, ...] | None]:
            async with db.transaction():
                rows = await (await db.execute(
                    'SELECT generation, head, tail, "offset", finished, device, inode, mtime_ns FROM checkpoints '
                    "WHERE instance = %s AND source = %s ORDER BY generation",
                    (self.instance, source),
                )).fetchall()
                horizon = await (await db.execute(
                    "SELECT horizon_ns FROM file_horizons WHERE instance = %s AND source = %s", (self.instance, source)
                )).fetchone()
            return rows, horizon

        rows, horizon = await self._call("position", work)
        return FileHistory(None if horizon is None else int(horizon[0]), tuple(map(checkpoint_from_row, rows)))

    async def save_checkpoint(self, source: str, checkpoint: Checkpoint) -> None:
        async def work(db: psycopg.AsyncConnection[Any]) -> None:
            await db.execute(SAVE_CHECKPOINT, self._checkpoint_params(source, checkpoint))

        await self._call("position", work)

    async def forget_checkpoints(self, source: str, generations: Sequence[int], horizon_ns: int) -> None:
        async def work(db: psycopg.AsyncConnection[Any]) -> None:
            async with db.transaction():
                await self._forget_checkpoints(db, self.instance, source, generations, horizon_ns)

        await self._call("position", work)

    @staticmethod
    async def _forget_checkpoints(
        db: psycopg.AsyncConnection[Any], instance: str, source: str, generations: Sequence[int], horizon_ns: int
    ) -> None:
        await db.execute(
            "DELETE FROM checkpoints WHERE instance = %s AND source = %s AND generation = ANY(%s::bigint[])",
            (instance, source, list(generations)),
        )
        await db.execute(
            "INSERT INTO file_horizons VALUES (%s, %s, %s) ON CONFLICT (instance, source) "
            "DO UPDATE SET horizon_ns = greatest(file_horizons.horizon_ns, excluded.horizon_ns)",
            (instance, source, horizon_ns),
        )

    # --- resolving ----------------------------------------------------------------------------------------

    async def due(self, now: float, limit: int, exclude: set[str]) -> list[PendingId]:
        """Claims up to `limit` due ids for this instance until now + lease_seconds."""
        if limit <= 0:
            return []
        params = {"me": self.instance, "lease": self._lease, "exclude": json.dumps(list(exclude)), "limit": limit}

        async def work(db: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
            return await (await db.execute(CLAIM, params)).fetchall()

        rows = await self._call("due", work)
        rows.sort(key=lambda row: row[5])
        # first_seen comes back as an age: placed on the caller's clock, which judges the give-up horizon.
        return [PendingId(row[0], row[1], _labels_value(row[2]), now - row[3], row[4]) for row in rows]

    async def next_due(self, now: float, exclude: set[str]) -> float | None:
        async def work(db: psycopg.AsyncConnection[Any]) -> float | None:
            # Walks the due index past the claimed rows (at most the fleet's lookups in flight).
            cursor = await db.execute(NEXT_DUE, {"me": self.instance, "exclude": json.dumps(list(exclude))})
            row = await cursor.fetchone()
            return None if row is None or row[0] is None else now + float(row[0])

        return await self._call("due", work)

    async def oldest_pending(self) -> float | None:
        async def work(db: psycopg.AsyncConnection[Any]) -> float | None:
            row = await (await db.execute("SELECT zenmux_now() - min(first_seen) FROM queue")).fetchone()
            return None if row is None or row[0] is None else self._wall() - float(row[0])

        return await self._call("oldest", work)

    async def settle(self, settlements: Sequence[Settlement], ledger: Ledger, now: float) -> list[Settlement]:
        """Dequeue, finished and ledger in one transaction. An id counts when its row leaves the queue AND its
        finished row is new: an id enqueued again in the instant it was settled elsewhere counts once."""
        ending: dict[str, Resolved | Abandon] = {}
        retries: dict[str, Retry] = {}
        for item in settlements:
            if isinstance(item, Retry):
                retries.setdefault(item.id, item)
            else:
                ending.setdefault(item.id, item)  # two results for one id: the first counts
        for generation_id in ending:
            retries.pop(generation_id, None)  # an id that ends is not retried

        async def work(db: psycopg.AsyncConnection[Any]) -> tuple[list[Settlement], int]:
            applied: list[Settlement] = []
            removed = 0
            retried: psycopg.AsyncCursor[Any] | None = None
            # Pipelined: BEGIN and the statements whose results are not read go out with the next that is. The
            # ledger rows (which every resolver updates) are locked last: their update and the COMMIT go out
            # together, so no round trip, and no pause of this process, falls while they are held.
            async with db.pipeline(), db.transaction():
                ledger_document = ""
                if ending:
                    statuses = {i: DONE if isinstance(e, Resolved) else ABANDONED for i, e in ending.items()}
                    cursor = await db.execute(
                        END, {"ended": json.dumps(statuses), "now": now, "me": self.instance}
                    )
                    rows = await cursor.fetchall()
                    removed = int(rows[0][1]) if rows else 0
                    new = {row[0] for row in rows if row[0] is not None}
                    deltas = Ledger(ledger.shape, ledger.limiter)  # empty: its overlay holds increments
                    overlay = deltas.overlay()
                    for generation_id, ended in ending.items():
                        if generation_id in new:
                            applied.append(ended)
                            if ended.contribution is not None:
                                deltas.add(overlay, ended.contribution)
                    ledger_document = _ledger_document(overlay)
                if retries:
                    ids = list(retries)
                    retried = await db.execute(
                        RETRY,
                        {
                            "ids": ids,
                            "delay": [retries[i].due - now for i in ids],
                            "attempts": [retries[i].attempts for i in ids],
                            "me": self.instance,
                        },
                    )
                if ledger_document:
                    await db.execute(ADD_TO_LEDGER, (ledger_document,))
            if retried is not None:  # read once committed: reading it inside would hold the ledger rows a round trip
                applied.extend(retries[row[0]] for row in await retried.fetchall())
            return applied, removed

        applied, removed = await self._call("settle", work)
        self._counted -= removed
        return applied

    async def load(self, dump: StateDump, *, force: bool) -> None:
        """Imports a sidecar's state in one transaction: its queue and finished ids (those already known are
        kept as they are), its file checkpoints (as this instance's) and its ledger. Into a database whose ledger
        is not empty only with `force`: the values are then ADDED (several sidecars' states merge into one)."""

        async def work(db: psycopg.AsyncConnection[Any]) -> None:
            async with db.transaction():
                await db.execute("LOCK TABLE ledger IN EXCLUSIVE MODE")
                row = await (await db.execute("SELECT count(*) FROM ledger")).fetchone()
                if row is not None and row[0] and not force:
                    raise StateError(
                        f"{self._where}: the ledger already holds {row[0]} series; importing would add this "
                        "state's counters to them. Pass --force to merge (several sidecars into one fleet).",
                        "import",
                    )
                if dump.queue:
                    columns = list(zip(*dump.queue, strict=True))
                    await db.execute(
                        "INSERT INTO queue (id, source, labels, first_seen, due, attempts) SELECT * FROM "
                        "unnest(%s::text[], %s::text[], %s::text[], %s::float8[], %s::float8[], %s::int4[]) "
                        "ON CONFLICT (id) DO NOTHING",
                        [list(column) for column in columns],
                    )
                if dump.finished:
                    columns = list(zip(*dump.finished, strict=True))
                    await db.execute(
                        "INSERT INTO finished SELECT * FROM unnest(%s::text[], %s::int2[], %s::int4[], "
                        "%s::float8[]) ON CONFLICT (id) DO NOTHING",
                        [list(column) for column in columns],
                    )
                    await db.execute("DELETE FROM queue WHERE id IN (SELECT id FROM finished WHERE id = ANY(%s))",
                                     (list(columns[0]),))
                for source, history in dump.files.items():
                    await db.execute("DELETE FROM checkpoints WHERE instance = %s AND source = %s",
                                     (self.instance, source))
                    for checkpoint in history.checkpoints:
                        await db.execute(SAVE_CHECKPOINT, self._checkpoint_params(source, checkpoint))
                    if history.horizon_ns is not None:
                        await self._forget_checkpoints(db, self.instance, source, (), history.horizon_ns)
                rows: list[dict[str, Any]] = []
                for metric, labels, value_json in dump.ledger:
                    value = json.loads(value_json)
                    if isinstance(value, dict):
                        rows.append({"metric": metric, "labels": labels, "counter": None, "buckets": value["b"],
                                     "total": value["s"]})
                    else:
                        rows.append({"metric": metric, "labels": labels, "counter": value, "buckets": None,
                                     "total": None})
                if rows:
                    await db.execute(ADD_TO_LEDGER, (json.dumps(rows),))

        await self._call("import", work)
        await self.refresh()

    async def ledger_rows(self) -> list[LedgerRow]:
        async def work(db: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
            return await (await db.execute("SELECT metric, labels, counter, buckets, total FROM ledger")).fetchall()

        return [_row(*row) for row in await self._call("ledger", work)]

    async def ledger_changes(self) -> list[LedgerRow]:
        async def work(db: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
            return await (await db.execute(LEDGER_CHANGES, (self._cursor,))).fetchall()

        rows = await self._call("ledger", work)
        if rows:
            self._cursor = rows[0][0]
        return [_row(*row[1:]) for row in rows if row[1] is not None]

    async def drop_daily_outside(self, first: str, last: str) -> int:
        async def work(db: psycopg.AsyncConnection[Any]) -> int:
            cursor = await db.execute(
                "DELETE FROM ledger WHERE metric = ANY(%s) AND NOT ((labels::jsonb)->>0 BETWEEN %s AND %s)",
                (sorted(DAILY_METRICS), first, last),
            )
            return max(cursor.rowcount, 0)

        return await self._call("forget", work)

    async def forget_finished(self, before: float, limit: int = 10_000) -> int:
        async def work(db: psycopg.AsyncConnection[Any]) -> int:
            cursor = await db.execute(
                "DELETE FROM finished WHERE id IN (SELECT id FROM finished WHERE finished < %s LIMIT %s)",
                (before, limit),
            )
            return max(cursor.rowcount, 0)

        return await self._call("forget", work)

    async def status(self, generation_id: str) -> int | None:
        async def work(db: psycopg.AsyncConnection[Any]) -> int | None:
            cursor = await db.execute(
                "SELECT status FROM finished WHERE id = %s UNION ALL SELECT %s FROM queue WHERE id = %s",
                (generation_id, PENDING, generation_id),
            )
            row = await cursor.fetchone()
            return None if row is None else int(row[0])

        return await self._call("status", work)

    async def refresh(self) -> None:
        """Counts the queue (up to just past max_pending: the bound is all the count is needed for beyond the
        gauge, and a full count of a huge queue would cost every process a scan)."""

        async def work(db: psycopg.AsyncConnection[Any]) -> int:
            cursor = await db.execute("SELECT count(*) FROM (SELECT 1 FROM queue LIMIT %s) q", (self.max_pending + 1,))
            row = await cursor.fetchone()
            return 0 if row is None else int(row[0])

        self._counted = await self._call("count", work)

    # --- the fleet ----------------------------------------------------------------------------------------

    def coordination(self) -> Coordination:
        return SharedCoordination(self)

    async def admit_labels(self, wanted: Sequence[tuple[str, str, int]]) -> set[tuple[str, str]]:
        """Which of the (label, value, cap) wanted the fleet names: those named already, and new ones while
        their label holds fewer than `cap` values; the rest become "other" on every resolver."""
        if not wanted:
            return set()
        labels, values, caps = (list(column) for column in zip(*wanted, strict=True))

        async def work(db: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
            async with db.pipeline(), db.transaction():
                await db.execute(LOCK_LABELS, (sorted(set(labels)),))
                cursor = await db.execute(ADMIT_LABELS, {"labels": labels, "values": values, "caps": caps})
                return await cursor.fetchall()

        return {(str(row[0]), str(row[1])) for row in await self._call("labels", work)}

    async def take_tokens(self, wanted: int, rate: float, burst: float) -> Grant:
        async def work(db: psycopg.AsyncConnection[Any]) -> tuple[Any, ...] | None:
            cursor = await db.execute(TAKE_TOKENS, {"wanted": wanted, "rate": rate, "burst": burst})
            return await cursor.fetchone()

        row = await self._call("rate_limit", work)
        return Grant(float(wanted), 0.0) if row is None else Grant(float(row[0]), float(row[1]))

    async def pause(self, seconds: float) -> None:
        async def work(db: psycopg.AsyncConnection[Any]) -> None:
            await db.execute(PAUSE, (seconds,))

        await self._call("rate_limit", work)

    async def try_lead(self, lease_seconds: float) -> bool:
        """Takes or renews the exposers' lead for `lease_seconds` on the database's clock: one statement on the
        ordinary connection (a pooler may hand it any session). The caller stops leading, by its own clock,
        once that time has passed since it asked without a renewal."""

        async def work(db: psycopg.AsyncConnection[Any]) -> bool:
            cursor = await db.execute(LEAD, {"me": self.instance, "lease": lease_seconds})
            return await cursor.fetchone() is not None

        return await self._call("leader election", work)


@dataclass(frozen=True)
class ProcessIdentity:
    """Who holds an instance name: a random owner token, and where the process runs (to tell, on this host,
    that a former holder is gone without waiting for its hold to run out)."""

    owner: str
    host: str
    pidns: int
    pid: int
    started: int

    def params(self) -> dict[str, Any]:
        return {"owner": self.owner, "host": self.host, "pidns": self.pidns, "pid": self.pid, "started": self.started}

    def sees_gone(self, host: str, pidns: int, pid: int, started: int) -> bool:
        """Whether the process (host, pidns, pid, started) is known to be gone: it ran in this PID namespace of
        this host, and that pid is now free or another process's."""
        if (host, pidns) != (self.host, self.pidns) or not pidns:
            return False
        return _start_time(pid) != started  # (our own pid, started before us: this container's former life)


def process_identity() -> ProcessIdentity:
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pidns = 0  # no /proc: only the hold's age frees a name
    return ProcessIdentity(uuid.uuid4().hex, socket.gethostname(), pidns, os.getpid(), _start_time(os.getpid()))


def _start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), 0 if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0
