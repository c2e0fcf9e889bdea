"""The durable state: dedupe, exactly-once settlement with the ledger, the bounded dedupe memory, positions."""

from __future__ import annotations

from pathlib import Path

from exporter.contribution import Contribution, Increment, LabelLimiter, LedgerShape
from exporter.ids import Sighting
from exporter.ledger import Ledger
from exporter.state import ABANDONED, DONE, PENDING, Abandon, FilePosition, Resolved, Retry, StateStore


def ledger() -> Ledger:
    return Ledger(LedgerShape(()), LabelLimiter(10, 10, 64))


def one_generation(cost: float) -> Contribution:
    labels = ("m", "chat.completions")
    return Contribution(
        (Increment("zenmux_generations", (*labels, "true", "stop"), 1.0), Increment("zenmux_cost_usd", labels, cost)),
        {},
    )


def test_enqueue_deduplicates_within_and_across_batches(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "s.db", max_pending=100)
    first = state.enqueue("src", [Sighting("a"), Sighting("b"), Sighting("a")], now=0, due=1)
    second = state.enqueue("src", [Sighting("b"), Sighting("c")], now=0, due=1)
    assert (first.accepted, first.duplicates) == (2, 1)
    assert (second.accepted, second.duplicates) == (1, 1)
    assert state.pending == 3


def test_an_id_seen_again_after_it_was_resolved_is_a_duplicate(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "s.db", max_pending=100)
    chat, search = (("feature", "chat"),), (("feature", "search"),)
    state.enqueue("src", [Sighting("done", chat), Sighting("gone", search)], now=0, due=0)
    state.settle([Resolved("done", one_generation(0.5)), Abandon("gone", "not_ready")], ledger(), now=1)
    # A file read again after a crash: finished ids, new ids and repeats, under several label sets.
    again = [Sighting("done", chat), Sighting("new1", chat), Sighting("gone", search), Sighting("new2", search),
             Sighting("new1", chat), Sighting("new3")]
    result = state.enqueue("src", again, now=2, due=3)
    assert (result.accepted, result.duplicates, result.rejected) == (3, 3, 0)
    assert state.pending == 3
    assert sorted((p.id, p.labels) for p in state.due(now=3, limit=10, exclude=set())) == [
        ("new1", chat), ("new2", search), ("new3", ())]
    assert (state.status("done"), state.status("gone"), state.status("new2")) == (DONE, ABANDONED, PENDING)
    # Seen once more: now they are pending, so the in-memory half of the dedupe answers.
    assert state.enqueue("src", again, now=4, due=5).duplicates == len(again)


def test_queue_bound_rejects_the_overflow(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "s.db", max_pending=2)
    result = state.enqueue("src", [Sighting(f"id{i}") for i in range(5)], now=0, due=1)
    assert (result.accepted, result.rejected) == (2, 3)


def test_a_result_is_counted_once_even_if_settled_twice(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "s.db", max_pending=100)
    book = ledger()
    state.enqueue("src", [Sighting("a")], now=0, due=0)
    applied = state.settle([Resolved("a", one_generation(0.5)), Resolved("a", one_generation(0.5))], book, now=1)
    assert len(applied) == 1
    assert state.settle([Resolved("a", one_generation(0.5))], book, now=2) == []
    assert book.value("zenmux_cost_usd") == 0.5
    assert state.pending == 0
    # The ledger is persisted with the settlement: a new process sees the same value.
    restored = ledger()
    restored.load(StateStore(tmp_path / "s.db", max_pending=100).ledger_rows())
    assert restored.value("zenmux_cost_usd") == 0.5 and restored.value("zenmux_generations") == 1


def test_retry_and_abandon(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "s.db", max_pending=100)
    book = ledger()
    state.enqueue("src", [Sighting("a"), Sighting("b")], now=0, due=0)
    state.settle([Retry("a", due=50, attempts=1), Abandon("b", "not_ready")], book, now=1)
    assert [p.id for p in state.due(now=10, limit=10, exclude=set())] == []
    due = state.due(now=50, limit=10, exclude=set())
    assert [(p.id, p.attempts) for p in due] == [("a", 1)]
    assert state.due(now=50, limit=10, exclude={"a"}) == []
    assert state.status("b") == 2 and state.pending == 1
    assert book.value("zenmux_generations") == 0


def test_resolved_ids_are_forgotten_after_the_dedupe_window(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "s.db", max_pending=100)
    state.enqueue("src", [Sighting("old"), Sighting("waiting")], now=0, due=0)
    state.settle([Resolved("old", one_generation(0.1))], ledger(), now=10)
    assert state.forget_finished(before=5) == 0
    assert state.forget_finished(before=11) == 1
    assert state.status("old") is None and state.status("waiting") == 0


def test_labels_and_positions_round_trip(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "s.db", max_pending=100)
    position = FilePosition(device=1, inode=2, offset=300, fingerprint=b"\x01\x02")
    state.enqueue("src", [Sighting("a", (("feature", "chat"),))], now=0, due=0, position=position)
    assert state.position("src") == position
    assert state.due(now=0, limit=1, exclude=set())[0].labels == (("feature", "chat"),)
    assert (tmp_path / "s.db").stat().st_mode & 0o777 == 0o600
