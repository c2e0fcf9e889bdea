"""Forgetting finished ids: at most one batch per call, and housekeeping lets the event loop run between
batches."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import exporter.app
from exporter.contribution import LabelLimiter, LedgerShape
from exporter.ids import Sighting
from exporter.ledger import Ledger
from exporter.state import StateStore
from exporter.store import Abandon, Store
from tests.pg import OpenState
from tests.support import make_config

KEY = "sk-ai-v1-0123456789abcdef-secret"


async def fill_finished(state: Store, count: int, at: float) -> None:
    ids = [f"old{i}" for i in range(count)]
    await state.enqueue("src", [Sighting(i) for i in ids], now=0, due=0)
    await state.settle(
        [Abandon(i, "not_ready") for i in ids], Ledger(LedgerShape(()), LabelLimiter(10, 10, 64)), now=at
    )


async def test_forget_finished_deletes_at_most_one_batch(open_state: OpenState) -> None:
    state = await open_state()
    await fill_finished(state, 7, at=10)
    assert await state.forget_finished(before=11, limit=3) == 3
    assert await state.forget_finished(before=11, limit=3) == 3
    assert await state.forget_finished(before=11, limit=3) == 1
    assert await state.forget_finished(before=11, limit=3) == 0


async def test_housekeeping_forgets_in_batches_yielding_between_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not started: no housekeeping task of its own forgets alongside.
    running = exporter.app.Exporter(make_config(tmp_path, "http://zenmux.test"), api_key=KEY)
    running.state = StateStore(tmp_path / "s.db", max_pending=100)
    await fill_finished(running.state, 7, at=10)
    monkeypatch.setattr(exporter.app, "FORGET_BATCH", 3)
    calls: list[tuple[int, int]] = []
    ticks = 0
    forget = running.state.forget_finished

    async def counting(before: float, limit: int = 10_000) -> int:
        calls.append((limit, ticks))
        return await forget(before, limit)

    async def ticker() -> None:  # stands for the rest of the event loop: UDP, lookups, scrapes
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    monkeypatch.setattr(running.state, "forget_finished", counting)
    other = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    try:
        assert await running._forget(before=11) == 7
    finally:
        other.cancel()
    assert [limit for limit, _ in calls] == [3, 3, 3]
    assert calls[0][1] < calls[1][1] < calls[2][1], "the event loop ran between batches"
    assert await running.state.status("old0") is None
    await running.state.close()
