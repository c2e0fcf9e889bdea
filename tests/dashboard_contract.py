"""The metric contract of README.md and the PromQL scanner that holds dashboards and rules to it.

`dashboard_queries(path, substitutions)` extracts runnable PromQL from a dashboard; `check_expr(expr)` lists an
expression's contract problems. Used by test_dashboards, test_rules, test_metrics_contract and
test_prometheus_live.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import yaml

REPO = Path(__file__).resolve().parent.parent
GRAFANA = REPO / "grafana"
DASHBOARD_DIR = GRAFANA / "dashboards"
PROMETHEUS_DIR = REPO / "prometheus"
RULE_FILES = (PROMETHEUS_DIR / "settings.rules.yaml", PROMETHEUS_DIR / "rules.yaml")
README = REPO / "README.md"
DOCS = REPO / "docs" / "dashboards-and-alerts.md"  # runbooks (the alerts' runbook_url)

COST_DASHBOARD = DASHBOARD_DIR / "zenmux-cost-and-usage.json"
HEALTH_DASHBOARD = DASHBOARD_DIR / "zenmux-exporter-health.json"
EXPECTED_UIDS = {
    COST_DASHBOARD.name: "zenmux-cost-and-usage",
    HEALTH_DASHBOARD.name: "zenmux-exporter-health",
}
SCHEMA_VERSION = 39


# --------------------------------------------------------------------------- the contract


class Metric(NamedTuple):
    type: str  # counter | gauge | histogram
    labels: frozenset[str]  # labels of its own (besides job/instance and the business labels)


def _m(type_: str, *labels: str) -> Metric:
    return Metric(type_, frozenset(labels))


def readme_contract() -> dict[str, Metric]:
    """The metric families README.md's "Metrics" tables promise (name -> type, own labels).

    This is the contract; tests/test_metrics_contract.py holds it against the live exporter's
    /metrics, so the static checks below may rely on it."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Metrics", 1)[1].split("\n## ", 1)[0]
    out: dict[str, Metric] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`zenmux_"):
            continue
        labels = frozenset(re.findall(r"`([a-z_]+)`", cells[2].split("=")[0])) if "`" in cells[2] else frozenset()
        if "=" in cells[2]:  # `token_type` = prompt, completion, ...
            labels = frozenset(re.findall(r"`([a-z_]+)`\s*=", cells[2]))
        out[cells[0].strip("`")] = Metric(cells[1], labels)
    return out


EXPORTER_METRICS: dict[str, Metric] = readme_contract()
SELF_PREFIX = "zenmux_exporter_"
BUSINESS_LABELS = frozenset({"model", "protocol"})
# metrics.extra_labels is configuration; the dashboards and tests use `feature` as the example.
EXTRA_LABELS = frozenset({"feature"})
TARGET_LABELS = frozenset({"job", "instance"})

# Values of enumerated labels, per metric family (README).
LABEL_VALUES: dict[tuple[str, str], frozenset[str]] = {
    ("zenmux_tokens_total", "token_type"): frozenset({"prompt", "completion", "reasoning", "cached"}),
    ("zenmux_generation_tokens", "token_type"): frozenset({"prompt", "completion", "reasoning", "cached"}),
    ("zenmux_generations_total", "streamed"): frozenset({"true", "false"}),
    ("zenmux_exporter_ids_rejected_total", "reason"): frozenset(
        {"invalid_id", "no_id", "not_json", "line_too_long", "datagram_too_large", "queue_full"}
    ),
    ("zenmux_exporter_billing_unavailable_total", "reason"): frozenset({"subscription_key", "gave_up_waiting"}),
    ("zenmux_exporter_file_rotations_total", "kind"): frozenset(
        {"rename", "truncate", "copytruncate_recovered", "copytruncate_unrecovered"}
    ),
    ("zenmux_exporter_lookups_total", "outcome"): frozenset(
        {"resolved", "not_ready", "rate_limited", "server_error", "timeout", "connection_error",
         "malformed", "unauthorized", "client_error", "too_large"}
    ),
}
LABEL_VALUES[("zenmux_exporter_lookup_duration_seconds", "outcome")] = LABEL_VALUES[
    ("zenmux_exporter_lookups_total", "outcome")
]
# an id is abandoned with its last lookup's outcome (never resolved; unauthorized ids wait)
LABEL_VALUES[("zenmux_exporter_abandoned_ids_total", "reason")] = LABEL_VALUES[
    ("zenmux_exporter_lookups_total", "outcome")
] - {"resolved", "unauthorized"}
LABEL_VALUES[("zenmux_exporter_state_errors_total", "operation")] = frozenset({"settle"})

# Series Prometheus itself produces, with their labels.
PROMETHEUS_SERIES: dict[str, frozenset[str]] = {
    "up": TARGET_LABELS,
    "scrape_duration_seconds": TARGET_LABELS,
    "scrape_samples_scraped": TARGET_LABELS,
    "scrape_samples_post_metric_relabeling": TARGET_LABELS,
    "scrape_series_added": TARGET_LABELS,
    "ALERTS": frozenset({"alertname", "alertstate", "severity"}) | TARGET_LABELS
    | frozenset({"reason", "source"}),
}


def is_business(family: str) -> bool:
    return family.startswith("zenmux_") and not family.startswith(SELF_PREFIX)


def exposed_series() -> dict[str, tuple[str, frozenset[str]]]:
    """Sample names the exporter exposes -> (metric family, every label it may carry)."""
    out: dict[str, tuple[str, frozenset[str]]] = {}
    for family, metric in EXPORTER_METRICS.items():
        labels = metric.labels | TARGET_LABELS
        if is_business(family):
            labels |= BUSINESS_LABELS | EXTRA_LABELS
        if metric.type == "histogram":
            out[f"{family}_bucket"] = (family, labels | {"le"})
            out[f"{family}_sum"] = (family, labels)
            out[f"{family}_count"] = (family, labels)
        else:
            out[family] = (family, labels)
    return out


def rules(path: Path) -> list[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def recording_rules() -> dict[str, str]:
    """record name -> expr, over prometheus/settings.rules.yaml and rules.yaml."""
    out: dict[str, str] = {}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    out[rule["record"]] = rule["expr"]
    return out


# --------------------------------------------------------------------------- PromQL scanning

SUBSTITUTIONS: dict[str, str] = {
    "datasource": "prometheus",
    "job": ".*",
    "instance": ".*",
    "model": ".*",
    "protocol": ".*",
    "extra_label": "feature",
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "1h",
    "__range_s": "3600",
}
_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*([a-zA-Z_]\w*)\s*\)\s*$", re.S)
_LABEL_VALUES_BARE = re.compile(r"^\s*label_values\(\s*([a-zA-Z_]\w*)\s*\)\s*$")
_QUERY_RESULT = re.compile(r"^\s*query_result\((.*)\)\s*$", re.S)


def substitute(expr: str, substitutions: Mapping[str, str] | None = None) -> str:
    """Replaces Grafana variables by values that make the expression runnable
    (SUBSTITUTIONS, overridden by `substitutions`)."""
    values = {**SUBSTITUTIONS, **(substitutions or {})}

    def repl(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VAR.sub(repl, expr)


def _variable_query(variable: dict[str, Any]) -> str | None:
    query = variable.get("query")
    if isinstance(query, dict):
        query = query.get("query")
    if not isinstance(query, str) or not query.strip():
        return None
    if _LABEL_VALUES_BARE.match(query):
        return None
    if m := _LABEL_VALUES.match(query):
        return m.group(1)
    if m := _QUERY_RESULT.match(query):
        return m.group(1)
    return query


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested (collapsed) panels included."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def dashboard_queries(path: Path | str, substitutions: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """(panel title, runnable PromQL) for every query of a dashboard: panel targets,
    query template variables (the selector of `label_values(selector, label)`), and
    Prometheus annotations. Variables are substituted (SUBSTITUTIONS, overridden by
    `substitutions`, e.g. real job/instance/model values and a short `__rate_interval`)."""
    dash = load(Path(path))
    out: list[tuple[str, str]] = []
    for panel in iter_panels(dash.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                out.append((str(panel.get("title", "")), substitute(target["expr"], substitutions)))
    for variable in dash.get("templating", {}).get("list", []):
        if variable.get("type") == "query" and (query := _variable_query(variable)) is not None:
            out.append((f"variable ${variable['name']}", substitute(query, substitutions)))
    for annotation in dash.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            out.append((f"annotation {annotation.get('name', '')}", substitute(annotation["expr"], substitutions)))
    return out


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENT = re.compile(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()")
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without", "on",
                      "ignoring", "group_left", "group_right", "atan2", "start", "end"})


class Selector(NamedTuple):
    metric: str
    matchers: tuple[tuple[str, str, str], ...]


def selectors(expr: str) -> list[Selector]:
    """Vector selectors of an expression with their matchers (metric '' = name-less)."""
    out: list[Selector] = []
    for m in _SELECTOR.finditer(expr):
        matchers = tuple((lbl, op, val) for lbl, op, val in _MATCHER.findall(m.group(2)))
        out.append(Selector(m.group(1) or "", matchers))
    return out


def metric_names(expr: str) -> set[str]:
    """Every metric name an expression reads."""
    names = {s.metric for s in selectors(expr) if s.metric}
    bare = _SELECTOR.sub(lambda m: (m.group(1) or "") + " ", expr)
    bare = _STRING.sub(" ", bare)
    bare = _GROUPING.sub(" ", bare)
    bare = _RANGE.sub(" ", bare)
    names |= {n for n in _IDENT.findall(bare) if n not in KEYWORDS}
    return names


def grouping_labels(expr: str) -> set[str]:
    """Labels named in by/without/on/ignoring/group_left/group_right clauses."""
    labels: set[str] = set()
    for _, inner in _GROUPING.findall(_STRING.sub('""', expr)):
        labels |= {x.strip() for x in inner.split(",") if x.strip()}
    return labels


def known_names() -> set[str]:
    return set(exposed_series()) | set(recording_rules()) | set(PROMETHEUS_SERIES)


def check_expr(expr: str) -> list[str]:
    """Contract problems of one expression: unknown metrics, labels, label values."""
    problems: list[str] = []
    exposed = exposed_series()
    names = metric_names(expr)
    for name in sorted(names - known_names()):
        problems.append(f"unknown metric {name}")
    for sel in selectors(expr):
        if sel.metric in exposed:
            family, labels = exposed[sel.metric]
        elif sel.metric in PROMETHEUS_SERIES:
            family, labels = sel.metric, PROMETHEUS_SERIES[sel.metric]
        else:
            continue  # recording rules: their labels are whatever their `by` keeps
        for label, op, value in sel.matchers:
            if label not in labels:
                problems.append(f"{sel.metric} has no label {label!r}")
            allowed = LABEL_VALUES.get((family, label))
            if allowed is None:
                continue
            if op == "=" and value not in allowed:
                problems.append(f"{sel.metric}{{{label}={value!r}}}: not one of {sorted(allowed)}")
            if op == "=~" and not value.startswith(".") and "$" not in value:
                unknown = {v for v in value.split("|") if v not in allowed}
                if unknown:
                    problems.append(f"{sel.metric}{{{label}=~{value!r}}}: {sorted(unknown)} never emitted")
    if names <= set(exposed) | set(PROMETHEUS_SERIES):
        allowed_labels: set[str] = set()
        for name in names:
            allowed_labels |= exposed[name][1] if name in exposed else PROMETHEUS_SERIES[name]
        for label in sorted(grouping_labels(expr) - allowed_labels):
            problems.append(f"grouping by {label!r}, which none of {sorted(names)} carries")
    return problems


# --------------------------------------------------------------------------- helpers


def dashboards() -> list[Path]:
    return sorted(DASHBOARD_DIR.glob("*.json"))


def promtool_check_exprs(exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Runs the real Prometheus parser over expressions (as recording rules)."""
    rules = {"groups": [{"name": "dashboard-queries", "rules": [
        {"record": f"dashboard:query_{i}:check", "expr": expr} for i, expr in enumerate(exprs)]}]}
    path = tmp_path / "queries.rules.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
    return subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True,
                          check=False)


# --------------------------------------------------------------------------- tests


def readme_section() -> str:
    """README.md's "Dashboards and alerts" section."""
    return README.read_text(encoding="utf-8").split("\n## Dashboards and alerts", 1)[1].split("\n## ", 1)[0]
