"""The incremental ledger renderer yields exactly prometheus_client's bytes, in both formats, across updates."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client import exposition as text_format
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from exporter.contribution import LabelLimiter, LedgerShape, contribution
from exporter.endpoints import render
from exporter.exposition import LedgerExposition
from exporter.ledger import Ledger
from tests.exposition_oracle import NASTY, OM_ACCEPT, add, generation, reference


def test_cached_render_is_byte_for_byte_prometheus_client_across_updates() -> None:
    rng = random.Random(7)
    # Extra labels that sort before and after `le`, so bucket lines put `le` in the middle.
    ledger = Ledger(LedgerShape(("feature", "a_team", "zone")), LabelLimiter(1000, 1000, 30))
    exposition = LedgerExposition(ledger)
    assert exposition.render(openmetrics=False) == reference(ledger)[0]  # empty families
    start = 0
    for count in (50, 1, 0, 30, 200):
        add(ledger, rng, start, count)
        start += count
        text, om = reference(ledger)
        assert exposition.render(openmetrics=False) == text
        assert exposition.render(openmetrics=True) == om
        if rng.random() < 0.5:  # a format not scraped for a while catches up on every change
            add(ledger, rng, start, 5)
            start += 5
    assert b'\\"' in text and b"\\\\" in text and b"\\n" in text and "ünïcødé".encode() in text
    assert b" # {generation_id=" in om


def test_a_restored_ledger_renders_every_loaded_series() -> None:
    rng = random.Random(3)
    source = Ledger(LedgerShape(("feature",)), LabelLimiter(1000, 1000, 30))
    overlay = source.overlay()
    for i in range(40):
        item = contribution(generation(rng, i), {"feature": rng.choice(NASTY)}, source.shape, source.limiter, {})
        source.add(overlay, item)
    source.apply(overlay)
    restored = Ledger(LedgerShape(("feature",)), LabelLimiter(1000, 1000, 30))
    restored.load(overlay.rows())
    text, om = reference(restored)
    exposition = LedgerExposition(restored)
    assert exposition.render(openmetrics=False) == text
    assert exposition.render(openmetrics=True) == om


def test_endpoint_body_keeps_one_family_each_and_eof_last() -> None:
    rng = random.Random(11)
    ledger = Ledger(LedgerShape(("feature",)), LabelLimiter(1000, 1000, 30))
    add(ledger, rng, 0, 20, nasty_ids=False)  # the OpenMetrics parser rejects escapes in exemplar values
    own = CollectorRegistry()
    Counter("zenmux_exporter_things", "Self-metric.", registry=own).inc()
    exposition = LedgerExposition(ledger)
    body, content_type = render(own, OM_ACCEPT, exposition)
    assert content_type == openmetrics.CONTENT_TYPE_LATEST
    assert body.endswith(b"# EOF\n") and body.count(b"# EOF") == 1
    families = list(text_string_to_metric_families(body.decode()))  # type: ignore[no-untyped-call]
    names = [family.name for family in families]
    assert len(names) == len(set(names))
    assert "zenmux_exporter_things" in names and "zenmux_generation_tokens" in names
    text_body, _ = render(own, "text/plain", exposition)
    assert text_body == text_format.generate_latest(own) + reference(ledger)[0]


@pytest.mark.parametrize("extra", [("le",), ("bad-name",), ("feature", "feature")])
def test_label_names_it_cannot_render_exactly_are_refused(extra: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="cannot be rendered"):
        LedgerExposition(Ledger(LedgerShape(extra), LabelLimiter(10, 10, 10)))
