"""The durable state, one suite for both backends (SQLite file, PostgreSQL database): dedupe, exactly-once
settlement with the ledger, the bounded dedupe memory, file checkpoints."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import pytest

from exporter.contribution import LabelLimiter, LedgerShape
from exporter.ids import Sighting
from exporter.ledger import Ledger
from exporter.state import StateStore
from exporter.store import (
    ABANDONED,
    DONE,
    PENDING,
    Abandon,
    Checkpoint,
    FileHistory,
    PendingId,
    Resolved,
    Retry,
    StateError,
    Store,
)
from tests.pg import OpenState
from tests.support import damage_finished_table, one_generation, wait_until


def ledger() -> Ledger:
    return Ledger(LedgerShape(()), LabelLimiter(10, 10, 64))


async def persisted(state: Store) -> Ledger:
    """The ledger as the state holds it (what a new process, or a fleet's exposer, loads)."""
    book = ledger()
    book.load(await state.ledger_rows())
    return book


async def test_enqueue_deduplicates_within_and_across_batches(open_state: OpenState) -> None:
    state = await open_state()
    first = await state.enqueue("src", [Sighting("a"), Sighting("b"), Sighting("a")], now=0, due=1)
    second = await state.enqueue("src", [Sighting("b"), Sighting("c")], now=0, due=1)
    assert (first.accepted, first.duplicates) == (2, 1)
    assert (second.accepted, second.duplicates) == (1, 1)
    assert state.pending == 3


async def test_an_id_seen_again_after_it_was_resolved_is_a_duplicate(open_state: OpenState) -> None:
    state = await open_state()
    chat, search = (("feature", "chat"),), (("feature", "search"),)
    await state.enqueue("src", [Sighting("done", chat), Sighting("gone", search)], now=0, due=0)
    await state.settle([Resolved("done", one_generation(0.5)), Abandon("gone", "not_ready")], ledger(), now=1)
    # A file read again after a crash: finished ids, new ids and repeats, under several label sets.
    again = [Sighting("done", chat), Sighting("new1", chat), Sighting("gone", search), Sighting("new2", search),
             Sighting("new1", chat), Sighting("new3")]
    result = await state.enqueue("src", again, now=2, due=2)
    assert (result.accepted, result.duplicates, result.rejected) == (3, 3, 0)
    assert state.pending == 3
    assert sorted((p.id, p.labels) for p in await state.due(now=3, limit=10, exclude=set())) == [
        ("new1", chat), ("new2", search), ("new3", ())]
    assert (await state.status("done"), await state.status("gone"), await state.status("new2")) == (
        DONE, ABANDONED, PENDING)
    # Seen once more: now they are pending.
    assert (await state.enqueue("src", again, now=4, due=5)).duplicates == len(again)


async def test_queue_bound_rejects_the_overflow(open_state: OpenState) -> None:
    state = await open_state(max_pending=2)
    result = await state.enqueue("src", [Sighting(f"id{i}") for i in range(5)], now=0, due=1)
    assert (result.accepted, result.rejected) == (2, 3)


async def test_a_result_is_counted_once_even_if_settled_twice(open_state: OpenState) -> None:
    state = await open_state()
    book = ledger()
    await state.enqueue("src", [Sighting("a")], now=0, due=0)
    applied = await state.settle([Resolved("a", one_generation(0.5)), Resolved("a", one_generation(0.5))], book, now=1)
    assert len(applied) == 1
    assert await state.settle([Resolved("a", one_generation(0.5))], book, now=2) == []
    assert state.pending == 0
    # The ledger is persisted with the settlement: a new process sees the same value.
    restored = await persisted(await open_state())
    assert restored.value("zenmux_cost_usd") == 0.5 and restored.value("zenmux_generations") == 1
    if not state.shared:  # a local ledger is updated after the commit; a shared one is the database's
        assert book.value("zenmux_cost_usd") == 0.5


async def test_settlements_add_up_in_the_ledger(open_state: OpenState) -> None:
    state = await open_state()
    book = ledger()  # the process's own (SQLite adds to its values; PostgreSQL adds in the database)
    await state.enqueue("src", [Sighting(f"id{i}") for i in range(5)], now=0, due=0)
    for i in range(5):
        await state.settle([Resolved(f"id{i}", one_generation(0.25))], book, now=1)
    book = await persisted(state)
    assert book.value("zenmux_cost_usd") == 1.25 and book.value("zenmux_generations") == 5


async def test_retry_and_abandon(open_state: OpenState) -> None:
    state = await open_state()
    book = ledger()
    # The real clock: PostgreSQL holds due times on its own clock, which tests cannot move.
    start = time.time()
    await state.enqueue("src", [Sighting("a"), Sighting("b")], now=start, due=start)
    await state.settle([Retry("a", due=start + 1, attempts=1), Abandon("b", "not_ready")], book, now=start)
    assert [p.id for p in await state.due(now=start, limit=10, exclude=set())] == []
    assert await state.next_due(start, set()) == pytest.approx(start + 1, abs=0.5)
    due: list[PendingId] = []

    async def retried() -> bool:
        due.extend(await state.due(now=time.time(), limit=10, exclude=set()))
        return bool(due)

    await wait_until(retried, what="the retry to be due")
    assert [(p.id, p.attempts) for p in due] == [("a", 1)]
    assert await state.due(now=time.time(), limit=10, exclude={"a"}) == []
    assert await state.status("b") == ABANDONED and state.pending == 1
    assert (await persisted(state)).value("zenmux_generations") == 0


async def test_resolved_ids_are_forgotten_after_the_dedupe_window(open_state: OpenState) -> None:
    state = await open_state()
    await state.enqueue("src", [Sighting("old"), Sighting("waiting")], now=0, due=0)
    await state.settle([Resolved("old", one_generation(0.1))], ledger(), now=10)
    assert await state.forget_finished(before=5) == 0
    assert await state.forget_finished(before=11) == 1
    assert await state.status("old") is None and await state.status("waiting") == PENDING


async def test_forget_finished_deletes_at_most_one_batch(open_state: OpenState) -> None:
    state = await open_state()
    ids = [f"old{i}" for i in range(7)]
    await state.enqueue("src", [Sighting(i) for i in ids], now=0, due=0)
    await state.settle([Abandon(i, "not_ready") for i in ids], ledger(), now=10)
    assert [await state.forget_finished(before=11, limit=3) for _ in range(4)] == [3, 3, 1, 0]


async def test_labels_and_checkpoints_round_trip(open_state: OpenState, tmp_path: Path) -> None:
    state = await open_state()
    first = Checkpoint(1, b"\x01" * 18, b"\x02" * 18, 300, False, device=1, inode=2, mtime_ns=10**18)
    await state.enqueue("src", [Sighting("a", (("feature", "chat"),))], now=0, due=0, checkpoint=first)
    assert await state.file_history("src") == FileHistory(None, (first,))
    finished = dataclasses.replace(first, offset=400, finished=True, inode=3)
    second = Checkpoint(2, b"\x03" * 18, b"", 0, False, device=1, inode=4, mtime_ns=10**18 + 1)
    await state.save_checkpoint("src", finished)
    await state.save_checkpoint("src", second)
    assert await state.file_history("src") == FileHistory(None, (finished, second))
    assert await state.file_history("other") == FileHistory(None, ())
    await state.forget_checkpoints("src", [1], horizon_ns=5)
    await state.forget_checkpoints("src", [], horizon_ns=3)  # the horizon only rises
    assert await state.file_history("src") == FileHistory(5, (second,))
    assert (await state.due(now=0, limit=1, exclude=set()))[0].labels == (("feature", "chat"),)
    if not state.shared:
        assert (tmp_path / "s.db").stat().st_mode & 0o777 == 0o600


async def test_next_due_and_oldest_pending(open_state: OpenState) -> None:
    state = await open_state()
    assert await state.next_due(0, set()) is None and await state.oldest_pending() is None
    # The real clock: PostgreSQL holds times on its own clock, and answers on the caller's.
    start = time.time()
    await state.enqueue("src", [Sighting("a")], now=start, due=start + 4)
    await state.enqueue("src", [Sighting("b")], now=start, due=start + 6)
    assert await state.next_due(start, set()) == pytest.approx(start + 4, abs=0.5)
    assert await state.oldest_pending() == pytest.approx(start, abs=0.5)


async def test_one_state_file_is_used_by_one_process(tmp_path: Path) -> None:
    first = StateStore(tmp_path / "state.db", max_pending=10)
    with pytest.raises(StateError, match="used by another running exporter") as refused:
        StateStore(tmp_path / "state.db", max_pending=10)
    assert "state.path" in str(refused.value)
    await first.close()
    again = StateStore(tmp_path / "state.db", max_pending=10)  # free once the holder is gone
    await again.close()


async def test_a_reopened_state_counts_its_queue_at_once_and_dedupes_before_its_memory_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dedupe memory is read after opening (in chunks: several here); the pending count is exact at once, and
    enqueue, status and settle wait for the memory, so nothing pending is taken again or missed."""
    monkeypatch.setattr("exporter.state.LOAD_CHUNK", 7)
    first = StateStore(tmp_path / "state.db", max_pending=1000)
    await first.enqueue("src", [Sighting(f"id-{i}") for i in range(40)], now=0, due=100)
    await first.settle([Abandon("id-3", "not_ready")], ledger(), now=1)
    await first.close()
    state = StateStore(tmp_path / "state.db", max_pending=1000)
    assert state.pending == 39  # counted, not read
    again = await state.enqueue("src", [Sighting("id-39"), Sighting("id-0"), Sighting("id-3"), Sighting("new")],
                                now=2, due=100)
    assert (again.accepted, again.duplicates) == (1, 3)
    assert state.pending == 40
    assert await state.status("id-38") == PENDING
    # An id not handed out by `due` (not located yet) settles once.
    assert [s.id for s in await state.settle([Resolved("id-20", one_generation(0.1))], ledger(), now=3)] == ["id-20"]
    assert state.pending == 39
    await state.complete_open()  # nothing left to read
    assert (await state.enqueue("src", [Sighting("id-21"), Sighting("id-20")], now=4, due=100)).accepted == 0
    await state.close()


async def test_the_dedupe_memory_read_side_by_side_with_enqueue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("exporter.state.LOAD_CHUNK", 5)
    first = StateStore(tmp_path / "state.db", max_pending=1000)
    await first.enqueue("src", [Sighting(f"id-{i}") for i in range(60)], now=0, due=100)
    await first.close()
    state = StateStore(tmp_path / "state.db", max_pending=1000)
    opening = asyncio.ensure_future(state.complete_open())
    await asyncio.sleep(0)  # the first chunk is read
    result = await state.enqueue("src", [Sighting(f"id-{i}") for i in range(55, 65)], now=1, due=100)
    await opening
    assert (result.accepted, result.duplicates) == (5, 5)
    assert state.pending == 65
    await state.close()


async def test_a_large_damaged_file_is_reported_after_opening(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file too large to check at open is checked by complete_open: the same error as at open, and the store's
    problem says so from then on (a later successful call does not clear it)."""
    path = tmp_path / "state.db"
    first = StateStore(path, max_pending=1000)
    await first.enqueue("src", [Sighting(f"id-{i}") for i in range(30)], now=0, due=0)
    await first.settle([Abandon(f"id-{i}", "not_ready") for i in range(20)], ledger(), now=1)
    await first.close()
    damage_finished_table(path)
    monkeypatch.setattr("exporter.state.CHECK_AT_OPEN_BYTES", 0)
    state = StateStore(path, max_pending=1000)
    assert state.pending == 10 and state.problem is None
    with pytest.raises(StateError, match="not a usable state database") as caught:
        await state.complete_open()
    assert str(path) in str(caught.value) and "Move it aside" in str(caught.value)
    assert state.problem == str(caught.value)
    # A call that succeeds (the queue is intact) leaves the problem as it was.
    assert [s.id for s in await state.settle([Retry("id-25", 5, 1)], ledger(), now=2)] == ["id-25"]
    assert state.problem == str(caught.value)
    with pytest.raises(StateError, match="malformed"):  # the damaged table itself
        await state.enqueue("src", [Sighting("late")], now=2, due=100)
    assert state.problem == str(caught.value)
    await state.close()
    monkeypatch.setattr("exporter.state.CHECK_AT_OPEN_BYTES", 1 << 30)  # a small file: refused at open
    with pytest.raises(StateError, match="not a usable state database"):
        StateStore(path, max_pending=1000)
