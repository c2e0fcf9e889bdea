"""The durable state, one suite for both backends (SQLite file, PostgreSQL database): dedupe, exactly-once
settlement with the ledger, the bounded dedupe memory, positions."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from exporter.contribution import LabelLimiter, LedgerShape
from exporter.ids import Sighting
from exporter.ledger import Ledger
from exporter.store import ABANDONED, DONE, PENDING, Abandon, FilePosition, PendingId, Resolved, Retry, Store
from tests.pg import OpenState
from tests.support import one_generation, wait_until


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


async def test_labels_and_positions_round_trip(open_state: OpenState, tmp_path: Path) -> None:
    state = await open_state()
    position = FilePosition(device=1, inode=2, offset=300, fingerprint=b"\x01\x02")
    await state.enqueue("src", [Sighting("a", (("feature", "chat"),))], now=0, due=0, position=position)
    assert await state.position("src") == position
    moved = FilePosition(device=1, inode=3, offset=0, fingerprint=b"")
    await state.save_position("src", moved)
    assert await state.position("src") == moved and await state.position("other") is None
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
