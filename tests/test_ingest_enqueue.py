"""The enqueue path on a real SQLite state: dedupe keys, label sets and rejection counts, whichever way a batch
is split (one label set, several, rejections mixed in)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from exporter.clock import ManualClock
from exporter.ids import INVALID_ID, NO_ID, Sighting
from exporter.ingest import Ingest
from exporter.state import StateStore, fingerprint
from exporter.telemetry import SelfMetrics

CHAT = (("feature", "chat"),)
SEARCH = (("feature", "search"),)


def make(tmp_path: Path) -> tuple[StateStore, Ingest, CollectorRegistry]:
    state = StateStore(tmp_path / "state.db", max_pending=100)
    registry = CollectorRegistry()
    return state, Ingest(state, SelfMetrics(registry), ManualClock(), 60), registry


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, {"source": "s", **labels}) or 0.0


async def test_one_label_set_and_several_queue_the_same_rows(tmp_path: Path) -> None:
    state, ingest, registry = make(tmp_path)
    try:
        await ingest.submit("s", [Sighting("a1"), Sighting("a2"), NO_ID, Sighting("a1")])
        await ingest.submit("s", [Sighting("b1", CHAT), INVALID_ID, Sighting("b2", SEARCH), Sighting("b3", CHAT),
                                  Sighting("a2", SEARCH)])
        rows = [(row[0], row[2]) for row in (await state.dump()).queue]
        assert rows == [("a1", ""), ("a2", ""), ("b1", '[["feature", "chat"]]'), ("b3", '[["feature", "chat"]]'),
                        ("b2", '[["feature", "search"]]')]
        # The in-memory dedupe keys are fingerprint()'s: what start-up and settle compute for these ids.
        assert state._pending_ids == {fingerprint(i) for i in ("a1", "a2", "b1", "b2", "b3")}
        assert sample(registry, "zenmux_exporter_ids_received_total") == 7
        assert sample(registry, "zenmux_exporter_ids_duplicate_total") == 2
        assert sample(registry, "zenmux_exporter_ids_rejected_total", reason=NO_ID) == 1
        assert sample(registry, "zenmux_exporter_ids_rejected_total", reason=INVALID_ID) == 1
    finally:
        await state.close()


async def test_a_batch_of_rejections_only_queues_nothing(tmp_path: Path) -> None:
    state, ingest, registry = make(tmp_path)
    try:
        result = await ingest.submit("s", iter([NO_ID, NO_ID]))
        assert result.accepted == 0
        assert (await state.dump()).queue == []
        assert sample(registry, "zenmux_exporter_ids_rejected_total", reason=NO_ID) == 2
    finally:
        await state.close()
