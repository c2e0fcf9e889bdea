"""The metric contract held against the LIVE exporter.

The real exporter, fed by the simulated API through its file and UDP sources, is scraped; the
metric families on /metrics must be exactly README.md's "Metrics" tables (names, types, own labels),
and every metric a dashboard or a rule reads must be on /metrics (or be a recording rule or a series
Prometheus makes itself). tests/test_dashboards.py and tests/test_rules.py check the dashboards and
rules against the README contract; this test is what keeps that contract true.
"""

from __future__ import annotations

import socket
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.dashboard_contract import (
    BUSINESS_LABELS,
    EXPORTER_METRICS,
    EXTRA_LABELS,
    PROMETHEUS_SERIES,
    RULE_FILES,
    Metric,
    dashboard_queries,
    dashboards,
    is_business,
    metric_names,
    recording_rules,
    rules,
)
from tests.support import (
    MANAGEMENT_KEY,
    FakeApi,
    StartExporter,
    append_lines,
    json_line,
    make_config,
    scrape,
    value,
    wait_until,
)

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def exposition(text: str) -> dict[str, tuple[Metric, set[str]]]:
    """family -> (type and own labels as README states them, sample names) of an exposition."""
    out: dict[str, tuple[Metric, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        name = family.name + "_total" if family.type == "counter" else family.name
        labels: set[str] = set()
        for sample in family.samples:
            labels |= set(sample.labels)
        labels -= {"le"}
        if is_business(name):
            labels -= BUSINESS_LABELS | EXTRA_LABELS
        samples = {sample.name for sample in family.samples}
        if family.type == "histogram":
            samples |= {name + suffix for suffix in HISTOGRAM_SUFFIXES}
        else:
            samples.add(name)
        out[name] = (Metric(family.type, frozenset(labels)), samples)
    return out


async def test_live_exposition_matches_the_readme_contract(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter
) -> None:
    # max_label_values 3 folds some of the 5 features into "other": label_overflow_total gets samples
    # reconciliation on: its gauges and the balance are part of the contract
    exporter = await start_exporter(
        make_config(
            tmp_path, fake_api.url, metrics={"max_label_values": 3}, reconcile={"management_api_key": MANAGEMENT_KEY}
        )
    )
    file_ids = [fake_api.create() for _ in range(10)]
    udp_ids = [fake_api.create() for _ in range(5)]
    append_lines(tmp_path / "app.log", [json_line(i, f"feature-{n % 5}") for n, i in enumerate(file_ids)])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto("\n".join(udp_ids).encode(), ("127.0.0.1", exporter.udp_sources[0].port))

    async def resolved() -> bool:
        return value(await scrape(exporter.metrics_port), "zenmux_generations_total") == 15

    await wait_until(resolved, what="15 generations on /metrics")
    live = exposition(await scrape(exporter.metrics_port))

    assert sorted(set(live) - set(EXPORTER_METRICS)) == [], "exposed but not in README's Metrics tables"
    assert sorted(set(EXPORTER_METRICS) - set(live)) == [], "in README's Metrics tables but not exposed"
    for family, (metric, samples) in sorted(live.items()):
        expected = EXPORTER_METRICS[family]
        assert metric.type == expected.type, f"{family}: README says {expected.type}, /metrics {metric.type}"
        # a labelled counter with no child yet shows no labels (state_errors_total before its first error)
        if samples - {family} or not expected.labels:
            assert metric.labels == expected.labels, f"{family}: README labels differ from /metrics"

    # label values README/dashboards rely on exist as series from the start
    text = await scrape(exporter.metrics_port)
    for name, labels in (
        ("zenmux_exporter_lookups_total", {"outcome": "malformed"}),
        ("zenmux_exporter_abandoned_ids_total", {"reason": "not_ready"}),
        ("zenmux_exporter_billing_unavailable_total", {"reason": "gave_up_waiting"}),
        ("zenmux_exporter_ids_rejected_total", {"source": "udp", "reason": "queue_full"}),
        ("zenmux_exporter_file_rotations_total", {"source": "app-log", "kind": "rename"}),
        ("zenmux_exporter_udp_dropped_datagrams_total", {"source": "udp"}),
        ("zenmux_exporter_give_up_after_seconds", {}),
        ("zenmux_exporter_max_pending_ids", {}),
        ("zenmux_exporter_lookup_concurrency_limit", {}),
        ("zenmux_exporter_draining", {}),
    ):
        assert f"{name}{{" in text or f"{name} " in text, name
        assert any(
            line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items())
            for line in text.splitlines()
        ), (name, labels)
    assert value(text, "zenmux_exporter_give_up_after_seconds") == 30
    assert value(text, "zenmux_exporter_lookup_concurrency_limit") == exporter.config.zenmux.concurrency
    assert value(text, "zenmux_exporter_max_pending_ids") == exporter.config.state.max_pending

    # every metric a dashboard or rule reads is on /metrics, recorded, or Prometheus' own
    exposed = set().union(*(samples for _, samples in live.values()))
    known = exposed | set(recording_rules()) | set(PROMETHEUS_SERIES)
    used: dict[str, set[str]] = {}
    for path in dashboards():
        for title, expr in dashboard_queries(path):
            for name in metric_names(expr):
                used.setdefault(name, set()).add(f"{path.name}: {title}")
    for path in RULE_FILES:
        for rule in rules(path):
            for name in metric_names(rule["expr"]):
                used.setdefault(name, set()).add(f"{path.name}: {rule.get('alert') or rule.get('record')}")
    missing = {name: sorted(where) for name, where in used.items() if name not in known}
    assert missing == {}
