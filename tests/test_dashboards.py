"""Grafana dashboards (grafana/dashboards/*.json) against the metric contract.

- every metric a dashboard queries is one the exporter exposes (README "Metrics"), a
  recording rule of prometheus/*.rules.yaml / rules.yaml, or a series Prometheus makes itself;
- label matchers and `by (...)` labels exist on the metrics they apply to, and matcher
  values of enumerated labels (outcome, token_type, ...) are ones the exporter emits;
- every exporter metric appears on some dashboard;
- every query is valid PromQL for the real Prometheus parser (`promtool check rules`);
- structure: schema version, stable uids, unique panel ids, no overlapping panels, units,
  thresholds, descriptions, the `$datasource` variable everywhere, exemplars on histograms.

The contract (README.md's tables, `readme_contract()`) and the PromQL scanner live in
tests/dashboard_contract.py; tests/test_metrics_contract.py holds the contract against the live
exporter's /metrics, and tests/test_prometheus_live.py runs every dashboard query
against a real Prometheus scraping a real exporter.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.dashboard_contract import (
    COST_DASHBOARD,
    DOCS,
    EXPECTED_UIDS,
    EXPORTER_METRICS,
    GRAFANA,
    HEALTH_DASHBOARD,
    SCHEMA_VERSION,
    Metric,
    check_expr,
    dashboard_queries,
    dashboards,
    exposed_series,
    is_business,
    iter_panels,
    load,
    metric_names,
    promtool_check_exprs,
    readme_section,
)


def test_readme_contract_is_parsed() -> None:
    # the live comparison is tests/test_metrics_contract.py; this guards the table parser
    assert len(EXPORTER_METRICS) >= 30
    assert EXPORTER_METRICS["zenmux_tokens_total"] == Metric("counter", frozenset({"token_type"}))
    assert EXPORTER_METRICS["zenmux_exporter_ids_rejected_total"] == Metric("counter", frozenset({"source", "reason"}))
    assert EXPORTER_METRICS["zenmux_exporter_pending_ids"] == Metric("gauge", frozenset())
    assert {m.type for m in EXPORTER_METRICS.values()} == {"counter", "gauge", "histogram"}


def test_dashboards_exist() -> None:
    assert [p.name for p in dashboards()] == sorted(EXPECTED_UIDS)


def test_dashboard_queries_helper_extracts_runnable_promql() -> None:
    queries = dashboard_queries(COST_DASHBOARD)
    assert len(queries) > 40
    titles = {title for title, _ in queries}
    assert {"variable $job", "variable $instance", "variable $model", "variable $protocol"} <= titles
    for title, expr in queries:
        assert "$" not in expr, (title, expr)
    assert ("variable $job", "zenmux_exporter_build_info") in queries


@pytest.mark.parametrize("path", dashboards(), ids=lambda p: p.name)
def test_queries_are_valid_promql(path: Path, tmp_path: Path) -> None:
    exprs = [expr for _, expr in dashboard_queries(path)]
    result = promtool_check_exprs(exprs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promql_check_catches_a_broken_query(tmp_path: Path) -> None:
    # the validation above really parses: a broken query fails
    assert promtool_check_exprs(["sum(rate(zenmux_cost_usd_total[5m])"], tmp_path).returncode != 0


@pytest.mark.parametrize("path", dashboards(), ids=lambda p: p.name)
def test_queries_use_only_exposed_metrics_and_labels(path: Path) -> None:
    problems = [f"{title}: {problem}" for title, expr in dashboard_queries(path) for problem in check_expr(expr)]
    assert problems == []


def test_contract_checker_catches_mistakes() -> None:
    assert check_expr("rate(zenmux_cost_total[5m])") == ["unknown metric zenmux_cost_total"]
    assert check_expr('zenmux_tokens_total{token_type="cache"}')
    assert check_expr('zenmux_exporter_pending_ids{model="x"}')
    assert check_expr("sum by (outcome) (zenmux_exporter_pending_ids)")
    assert check_expr("histogram_quantile(0.9, sum by (le) (rate(zenmux_generation_cost_usd_bucket[5m])))") == []
    assert check_expr('sum by (feature) (rate(zenmux_cost_usd_total{model=~"a|b"}[5m]))') == []


def test_every_exporter_metric_is_on_a_dashboard() -> None:
    used: set[str] = set()
    for path in dashboards():
        for _, expr in dashboard_queries(path):
            used |= {exposed_series()[n][0] for n in metric_names(expr) if n in exposed_series()}
    business = {f for f in EXPORTER_METRICS if is_business(f)}
    assert business - used == set(), "business metrics on no dashboard"
    assert set(EXPORTER_METRICS) - used == set(), "self-metrics on no dashboard"


def test_business_metrics_on_cost_dashboard_and_self_metrics_on_health() -> None:
    def families(path: Path) -> set[str]:
        exposed = exposed_series()
        return {exposed[n][0] for _, e in dashboard_queries(path) for n in metric_names(e) if n in exposed}

    assert {f for f in EXPORTER_METRICS if is_business(f)} <= families(COST_DASHBOARD)
    assert {f for f in EXPORTER_METRICS if not is_business(f)} <= families(HEALTH_DASHBOARD)


@pytest.mark.parametrize("path", dashboards(), ids=lambda p: p.name)
def test_dashboard_structure(path: Path) -> None:
    dash = load(path)
    assert dash["schemaVersion"] == SCHEMA_VERSION
    assert dash["uid"] == EXPECTED_UIDS[path.name]
    assert len(dash["uid"]) <= 40 and re.fullmatch(r"[a-zA-Z0-9_-]+", dash["uid"])
    assert dash.get("id") is None, "exported id must be null so imports do not collide"
    assert dash["title"] and dash["description"] and "zenmux" in dash["tags"]

    panels = list(iter_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles)), "panel titles must be unique"
    assert panels[0]["type"] == "row", "the dashboard starts with a row"
    assert sum(p["type"] == "row" for p in panels) >= 3, "rows group the story"

    cells: set[tuple[int, int]] = set()
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine


ALLOWED_UNITS = frozenset({"currencyUSD", "s", "short", "percentunit", "reqps", "cps", "bytes", "none"})


@pytest.mark.parametrize("path", dashboards(), ids=lambda p: p.name)
def test_panels_have_units_thresholds_descriptions_and_queries(path: Path) -> None:
    for panel in iter_panels(load(path)["panels"]):
        if panel["type"] == "row":
            continue
        title = panel["title"]
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults.get("unit") in ALLOWED_UNITS, title
        steps = defaults["thresholds"]["steps"]
        assert steps and steps[0]["value"] is None, title
        assert len(panel.get("description", "")) >= 20, f"{title}: describe the question it answers"
        assert panel["targets"], title
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), title


@pytest.mark.parametrize("path", dashboards(), ids=lambda p: p.name)
def test_money_panels_use_usd(path: Path) -> None:
    money = re.compile(r"\bzenmux_(cost\w*|credits_total|generation_cost_usd\w*)\b")
    for panel in iter_panels(load(path)["panels"]):
        if panel["type"] == "row":
            continue
        unit = panel["fieldConfig"]["defaults"]["unit"]
        if re.search(r"\bspend\b|USD", panel["title"], re.I):
            assert unit == "currencyUSD", panel["title"]
        for target in panel["targets"]:
            plain_money = money.search(target["expr"]) and " / " not in target["expr"]
            if plain_money:
                assert unit == "currencyUSD", panel["title"]


def _datasource_refs(node: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield where, value
            yield from _datasource_refs(value, f"{where}/{node.get('title', node.get('name', key))}")
    elif isinstance(node, list):
        for item in node:
            yield from _datasource_refs(item, where)


@pytest.mark.parametrize("path", dashboards(), ids=lambda p: p.name)
def test_no_hard_coded_datasource(path: Path) -> None:
    dash = load(path)
    for where, ref in _datasource_refs(dash):
        if isinstance(ref, dict) and ref.get("type") == "grafana":
            assert ref["uid"] == "-- Grafana --", where  # the built-in annotations source
            continue
        assert ref == {"type": "prometheus", "uid": "${datasource}"}, where
    assert "__inputs" not in dash, "provisioned dashboards must not need an import mapping"


@pytest.mark.parametrize("path", dashboards(), ids=lambda p: p.name)
def test_template_variables(path: Path) -> None:
    variables = {v["name"]: v for v in load(path)["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for name in ("job", "instance", "model", "protocol"):
        var = variables[name]
        assert var["type"] == "query", name
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        assert query.startswith("label_values(") and query.rstrip(")").endswith(f", {name}"), name
        assert var["includeAll"] and var["multi"] and var["allValue"] == ".*", name
    # every panel filters on the selected jobs (budget and alert panels are global)
    for panel in iter_panels(load(path)["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            if "ALERTS" in expr or expr.startswith("max(zenmux:"):
                continue
            assert 'job=~"$job"' in expr, f"{panel['title']}: {expr}"


@pytest.mark.parametrize("path", dashboards(), ids=lambda p: p.name)
def test_exemplars_on_histogram_quantiles(path: Path) -> None:
    histograms = 0
    for panel in iter_panels(load(path)["panels"]):
        for target in panel.get("targets", []):
            if "_bucket" in target["expr"]:
                histograms += 1
                assert target["exemplar"] is True, panel["title"]
                assert panel["type"] == "timeseries", panel["title"]
    assert histograms > 0


def test_dashboards_are_generated_from_the_builder() -> None:
    result = subprocess.run([sys.executable, str(GRAFANA / "build_dashboards.py"), "--check"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_provisioning_files() -> None:
    prov = GRAFANA / "provisioning"
    ds_files = list((prov / "datasources").glob("*.yaml"))
    dash_files = list((prov / "dashboards").glob("*.yaml"))
    assert ds_files and dash_files
    for path in ds_files:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert doc["apiVersion"] == 1
        for ds in doc["datasources"]:
            assert ds["type"] == "prometheus" and ds["access"] == "proxy" and ds["url"].startswith("http")
            assert ds.get("isDefault") is False, "do not steal the default from an existing datasource"
    for path in dash_files:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert doc["apiVersion"] == 1
        (provider,) = doc["providers"]
        assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
        assert provider["options"]["path"] in readme_section(), "documented install path"


def test_the_docs_list_every_panel() -> None:
    docs = DOCS.read_text(encoding="utf-8").split("\n## Panels", 1)[1].split("\n## ", 1)[0]
    missing = [
        f"{path.name}: {panel['title']}"
        for path in dashboards()
        for panel in iter_panels(load(path)["panels"])
        if panel["type"] != "row" and f"| {panel['title']} |" not in docs
    ]
    assert missing == []
