#!/usr/bin/env python3
"""Generates grafana/dashboards/*.json (Grafana dashboard JSON model, schemaVersion 39).

The JSON files are committed; edit this script and run it to regenerate them:

    python3 grafana/build_dashboards.py          # write
    python3 grafana/build_dashboards.py --check  # exit 1 if the committed JSON is stale

Stdlib only. Every query goes through the `$datasource` variable (no datasource uid is
hard-coded) and filters on `job=~"$job", instance=~"$instance"` (business panels also on
`model`/`protocol`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

Json = dict[str, Any]

OUT = Path(__file__).resolve().parent / "dashboards"
SCHEMA_VERSION = 39
DS: Json = {"type": "prometheus", "uid": "${datasource}"}

SEL = 'job=~"$job", instance=~"$instance"'
BSEL = SEL + ', model=~"$model", protocol=~"$protocol"'
RI = "$__rate_interval"

GREEN = {"color": "green", "value": None}
# a configured limit drawn next to the value it bounds: red, dashed
LIMIT_LINE = [{"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
              {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}]


def steps(*pairs: tuple[str, float]) -> Json:
    return {"mode": "absolute", "steps": [GREEN, *({"color": c, "value": v} for c, v in pairs)]}


def target(expr: str, legend: str = "", *, ref: str = "A", instant: bool = False,
           exemplar: bool = False, fmt: str = "time_series") -> Json:
    return {
        "refId": ref,
        "datasource": DS,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "instant": instant,
        "exemplar": exemplar,
        "format": fmt,
    }


class Layout:
    """Places panels left to right, top to bottom, on Grafana's 24-column grid."""

    def __init__(self) -> None:
        self.panels: list[Json] = []
        self.next_id = 1
        self.x = 0
        self.y = 0
        self.row_h = 0

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        if self.x:
            self.y += self.row_h
            self.x, self.row_h = 0, 0
        self.panels.append({
            "id": self._id(), "type": "row", "title": title, "collapsed": False, "panels": [],
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
        })
        self.y += 1

    def add(self, panel: Json, w: int, h: int) -> None:
        if self.x + w > 24:
            self.y += self.row_h
            self.x, self.row_h = 0, 0
        panel["id"] = self._id()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_h = max(self.row_h, h)
        self.panels.append(panel)


def timeseries(title: str, description: str, targets: list[Json], unit: str, *,
               thresholds: Json | None = None, stack: bool = False, threshold_line: bool = False,
               overrides: list[Json] | None = None, minimum: float | None = 0) -> Json:
    defaults: Json = {
        "unit": unit,
        "color": {"mode": "palette-classic"},
        "thresholds": thresholds or steps(),
        "custom": {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if stack else 8,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
            "thresholdsStyle": {"mode": "dashed" if threshold_line else "off"},
        },
    }
    if minimum is not None:
        defaults["min"] = minimum
    return {
        "type": "timeseries", "title": title, "description": description, "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "options": {
            "legend": {"showLegend": True, "displayMode": "table", "placement": "bottom",
                       "calcs": ["mean", "max", "lastNotNull"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": targets,
    }


def stat(title: str, description: str, targets: list[Json], unit: str, *,
         thresholds: Json | None = None, mappings: list[Json] | None = None,
         decimals: int | None = None, graph: bool = False, no_value: str | None = None) -> Json:
    defaults: Json = {
        "unit": unit,
        "color": {"mode": "thresholds"},
        "thresholds": thresholds or steps(),
        "mappings": mappings or [],
    }
    if decimals is not None:
        defaults["decimals"] = decimals
    if no_value is not None:
        defaults["noValue"] = no_value  # shown when the query has no series (counter not born yet)
    return {
        "type": "stat", "title": title, "description": description, "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value", "graphMode": "area" if graph else "none",
            "justifyMode": "auto", "textMode": "auto", "orientation": "auto",
        },
        "targets": targets,
    }


def bargauge(title: str, description: str, targets: list[Json], unit: str) -> Json:
    return {
        "type": "bargauge", "title": title, "description": description, "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit, "min": 0, "color": {"mode": "continuous-BlYlRd"},
                                     "thresholds": steps()}, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "orientation": "horizontal", "displayMode": "gradient", "showUnfilled": True,
        },
        "targets": targets,
    }


def piechart(title: str, description: str, targets: list[Json], unit: str) -> Json:
    return {
        "type": "piechart", "title": title, "description": description, "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit, "color": {"mode": "palette-classic"},
                                     "thresholds": steps()}, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "pieType": "donut", "displayLabels": ["percent"],
            "legend": {"showLegend": True, "displayMode": "table", "placement": "right",
                       "values": ["value", "percent"]},
            "tooltip": {"mode": "single", "sort": "none"},
        },
        "targets": targets,
    }


def table(title: str, description: str, targets: list[Json], unit: str) -> Json:
    return {
        "type": "table", "title": title, "description": description, "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit, "thresholds": steps(),
                                     "custom": {"align": "auto"}}, "overrides": []},
        "options": {"showHeader": True, "cellHeight": "sm"},
        "transformations": [{"id": "organize", "options": {
            "excludeByName": {"Time": True, "Value": True, "__name__": True}}}],
        "targets": targets,
    }


def quantiles(metric: str, by: str, sel: str) -> list[Json]:
    """p50 and p95 of a classic histogram, grouped by `by`, exemplars on."""
    out = []
    for ref, q in (("A", "0.5"), ("B", "0.95")):
        out.append(target(
            f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{sel}}}[{RI}])))",
            f"p{int(float(q) * 100)} {{{{{by}}}}}", ref=ref, exemplar=True))
    return out


# ------------------------------------------------------------------ template variables

def query_var(name: str, label: str, query: str, *, include_all: bool = True) -> Json:
    return {
        "name": name, "label": label, "type": "query", "datasource": DS,
        "definition": query, "query": {"query": query, "refId": "StandardVariableQuery"},
        "refresh": 2, "sort": 1, "multi": True, "includeAll": include_all, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [], "regex": "", "hide": 0,
    }


def variables(extra: list[Json] | None = None) -> Json:
    ds = {
        "name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
        "current": {}, "options": [], "refresh": 1, "regex": "", "hide": 0,
    }
    return {"list": [
        ds,
        query_var("job", "Job", "label_values(zenmux_exporter_build_info, job)"),
        query_var("instance", "Instance", 'label_values(zenmux_exporter_build_info{job=~"$job"}, instance)'),
        query_var("model", "Model", f"label_values(zenmux_generations_total{{{SEL}}}, model)"),
        query_var("protocol", "Protocol", f"label_values(zenmux_generations_total{{{SEL}}}, protocol)"),
        *(extra or []),
    ]}


def annotation_list() -> Json:
    return {"list": [
        {
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
            "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts",
            "type": "dashboard",
        },
        {
            "name": "ZenMux alerts", "datasource": DS, "enable": True, "hide": False,
            "iconColor": "red", "step": "1m", "titleFormat": "{{alertname}}",
            "textFormat": "{{instance}} {{severity}}", "tagKeys": "alertname,severity",
            "useValueForTime": False,
            "expr": 'ALERTS{alertname=~"ZenMux.*", alertstate="firing", job=~"$job|"}',
        },
    ]}


def dashboard(uid: str, title: str, description: str, tags: list[str], layout: Layout,
              templating: Json, time_from: str) -> Json:
    return {
        "id": None,
        "uid": uid,
        "title": title,
        "description": description,
        "tags": tags,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "timezone": "browser",
        "refresh": "1m",
        "time": {"from": time_from, "to": "now"},
        "timepicker": {},
        "links": [{"type": "dashboards", "tags": ["zenmux"], "asDropdown": False, "includeVars": True,
                   "keepTime": True, "title": "ZenMux", "icon": "external link", "targetBlank": False,
                   "tooltip": "", "url": ""}],
        "annotations": annotation_list(),
        "templating": templating,
        "panels": layout.panels,
    }


# ------------------------------------------------------------------ cost and usage

def cost_and_usage() -> Json:
    L = Layout()
    cost = f"zenmux_cost_usd_total{{{BSEL}}}"

    L.row("Spend: what are we spending, how fast is it growing")
    L.add(stat("Spend in range", "Billed USD (ratingResponses.billAmount) over the dashboard's time range "
               "for the selected jobs, models and protocols.",
               [target(f"sum(increase({cost}[$__range]))", "spend", instant=True)], "currencyUSD",
               decimals=2), 4, 5)
    L.add(stat("Spend rate (USD/hour)", "Current burn: billed USD per hour over the last rate interval.",
               [target(f"sum(rate({cost}[{RI}])) * 3600", "USD/h")], "currencyUSD", decimals=2,
               graph=True), 4, 5)
    L.add(stat("Projected daily spend", "Last hour's spend rate extrapolated to 24 h. Compare with the "
               "daily budget (zenmux:budget_usd_per_day in prometheus/settings.rules.yaml).",
               [target(f"sum(rate({cost}[1h])) * 86400", "USD/day")], "currencyUSD", decimals=2,
               thresholds=steps(("orange", 80), ("red", 100))), 4, 5)
    L.add(stat("Projected monthly spend", "Last 24 h spend rate extrapolated to 30 days.",
               [target(f"sum(rate({cost}[1d])) * 86400 * 30", "USD/month")], "currencyUSD",
               decimals=0), 4, 5)
    L.add(stat("Daily budget", "The effective budget the alerts use: zenmux:budget_usd_per_day from "
               "settings.rules.yaml, 100 USD/day when that file is not loaded. Requires prometheus/rules.yaml.",
               [target("max(zenmux:budget_usd_per_day:effective)", "budget")], "currencyUSD", decimals=2),
          4, 5)
    L.add(stat("Budget used (trailing 24 h)", "Spend of the last 24 h across all selected jobs divided by "
               "the daily budget. ZenMuxDailyBudgetExceeded fires above 100 %.",
               [target('sum(increase(zenmux_cost_usd_total{job=~"$job"}[24h])) '
                       "/ scalar(max(zenmux:budget_usd_per_day:effective))", "used")],
               "percentunit", thresholds=steps(("orange", 0.8), ("red", 1))), 4, 5)
    L.add(timeseries("Projected daily spend vs budget",
                     "Spend rate over the last hour and last 5 minutes, projected to USD/day, against the "
                     "effective daily budget. ZenMuxSpendBurnAboveBudget fires when both projections "
                     "stay above the budget for 15 minutes.",
                     [target('sum(rate(zenmux_cost_usd_total{job=~"$job"}[1h])) * 86400', "projected (1h rate)"),
                      target('sum(rate(zenmux_cost_usd_total{job=~"$job"}[5m])) * 86400',
                             "projected (5m rate)", ref="B"),
                      target("max(zenmux:budget_usd_per_day:effective)", "budget", ref="C")],
                     "currencyUSD",
                     overrides=[{"matcher": {"id": "byName", "options": "budget"}, "properties": [
                         {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
                         {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}]}]),
          12, 8)
    L.add(timeseries("Cumulative spend in range", "Running total of billed USD since the start of the "
                     "time range, by model.",
                     [target(f"sum by (model) (increase({cost}[$__range]))", "{{model}}")],
                     "currencyUSD"), 12, 8)

    L.row("Spend breakdown: on which model, protocol, fee item, feature")
    L.add(timeseries("Spend rate by model (USD/hour)", "Billed USD per hour, stacked by model.",
                     [target(f"sum by (model) (rate({cost}[{RI}])) * 3600", "{{model}}")],
                     "currencyUSD", stack=True), 12, 8)
    L.add(timeseries("Spend rate by protocol (USD/hour)", "Billed USD per hour, stacked by protocol "
                     "(the response's api: chat.completions, responses, messages, generateContent).",
                     [target(f"sum by (protocol) (rate({cost}[{RI}])) * 3600", "{{protocol}}")],
                     "currencyUSD", stack=True), 12, 8)
    L.add(timeseries("Spend rate by fee item (USD/hour)", "ratingDetails[].billAmount per hour by "
                     "feeItemCode (input, output, cache read, web search...).",
                     [target(f"sum by (fee_item) (rate(zenmux_cost_by_fee_item_usd_total{{{BSEL}}}[{RI}])) * 3600",
                             "{{fee_item}}")], "currencyUSD", stack=True), 12, 8)
    L.add(timeseries("Spend rate by $extra_label (USD/hour)", "Billed USD per hour grouped by the extra "
                     "label chosen in the 'Extra label' variable (metrics.extra_labels, e.g. feature). "
                     "Values folded by the cardinality cap show up as 'other'.",
                     [target(f"sum by ($extra_label) (rate({cost}[{RI}])) * 3600", "{{$extra_label}}")],
                     "currencyUSD", stack=True), 12, 8)
    L.add(bargauge("Spend by model in range", "Billed USD over the time range, largest first.",
                   [target(f"sort_desc(sum by (model) (increase({cost}[$__range])))", "{{model}}",
                           instant=True)], "currencyUSD"), 8, 8)
    L.add(piechart("Spend by protocol in range", "Share of billed USD by protocol over the time range.",
                   [target(f"sum by (protocol) (increase({cost}[$__range]))", "{{protocol}}",
                           instant=True)], "currencyUSD"), 8, 8)
    L.add(bargauge("Spend by fee item in range", "Billed USD by fee item over the time range.",
                   [target(f"sort_desc(sum by (fee_item) (increase(zenmux_cost_by_fee_item_usd_total{{{BSEL}}}"
                           "[$__range])))", "{{fee_item}}", instant=True)], "currencyUSD"), 8, 8)

    L.row("Discounts and credits")
    L.add(timeseries("Billed vs origin amount (USD/hour)", "originAmount is the list price, billAmount "
                     "what is charged, discountAmount the difference.",
                     [target(f"sum(rate(zenmux_cost_origin_usd_total{{{BSEL}}}[{RI}])) * 3600", "origin"),
                      target(f"sum(rate({cost}[{RI}])) * 3600", "billed", ref="B"),
                      target(f"sum(rate(zenmux_cost_discount_usd_total{{{BSEL}}}[{RI}])) * 3600",
                             "discount", ref="C")], "currencyUSD"), 12, 8)
    L.add(stat("Discount in range", "discountAmount summed over the time range.",
               [target(f"sum(increase(zenmux_cost_discount_usd_total{{{BSEL}}}[$__range]))", "discount",
                       instant=True)], "currencyUSD", decimals=2), 4, 8)
    L.add(stat("Effective discount", "discountAmount / originAmount over the time range.",
               [target(f"sum(increase(zenmux_cost_discount_usd_total{{{BSEL}}}[$__range])) "
                       f"/ sum(increase(zenmux_cost_origin_usd_total{{{BSEL}}}[$__range]))", "discount",
                       instant=True)], "percentunit"), 4, 8)
    L.add(timeseries("Credits vs billed (USD/hour)", "ZenMux credits consumed (usage, 1 credit = 1 USD) "
                     "next to billAmount; a gap means part of the usage is not billed in USD "
                     "(e.g. subscription keys).",
                     [target(f"sum(rate(zenmux_credits_total{{{BSEL}}}[{RI}])) * 3600", "credits"),
                      target(f"sum(rate({cost}[{RI}])) * 3600", "billed", ref="B")], "currencyUSD"), 4, 8)

    L.row("Cost per generation: what is each request costing us")
    L.add(timeseries("Cost per generation p50 / p95 by model", "Quantiles of billAmount per generation "
                     "(histogram buckets 1e-6 ... 10 USD). Exemplars link to generation_id / trace_id.",
                     quantiles("zenmux_generation_cost_usd", "model", BSEL), "currencyUSD",
                     minimum=None), 12, 8)
    L.add(timeseries("Mean cost per generation by model", "Billed USD divided by billed generations.",
                     [target(f"sum by (model) (rate(zenmux_generation_cost_usd_sum{{{BSEL}}}[{RI}])) "
                             f"/ sum by (model) (rate(zenmux_generation_cost_usd_count{{{BSEL}}}[{RI}]))",
                             "{{model}}")], "currencyUSD"), 12, 8)

    L.row("Usage: generations and tokens, are tokens cached")
    L.add(timeseries("Generations per second by model", "Resolved generations per second.",
                     [target(f"sum by (model) (rate(zenmux_generations_total{{{BSEL}}}[{RI}]))", "{{model}}")],
                     "reqps", stack=True), 12, 8)
    L.add(timeseries("Tokens per second by type", "prompt and completion tokens; cached is a subset of "
                     "prompt, reasoning a subset of completion.",
                     [target(f"sum by (token_type) (rate(zenmux_tokens_total{{{BSEL}}}[{RI}]))",
                             "{{token_type}}")], "short"), 12, 8)
    L.add(timeseries("Prompt + completion tokens per second by model", "Billable token throughput by model.",
                     [target(f'sum by (model) (rate(zenmux_tokens_total{{{BSEL}, token_type=~"prompt|completion"}}'
                             f"[{RI}]))", "{{model}}")], "short", stack=True), 12, 8)
    L.add(timeseries("Prompt cache hit ratio by model", "cached prompt tokens / prompt tokens. Low values "
                     "on long repeated prompts mean caching is not kicking in.",
                     [target(f'sum by (model) (rate(zenmux_tokens_total{{{BSEL}, token_type="cached"}}[{RI}])) '
                             f'/ sum by (model) (rate(zenmux_tokens_total{{{BSEL}, token_type="prompt"}}[{RI}]))',
                             "{{model}}")], "percentunit", thresholds=steps()), 8, 8)
    L.add(stat("Cache hit ratio in range", "cached / prompt tokens over the time range.",
               [target(f'sum(increase(zenmux_tokens_total{{{BSEL}, token_type="cached"}}[$__range])) '
                       f'/ sum(increase(zenmux_tokens_total{{{BSEL}, token_type="prompt"}}[$__range]))',
                       "cache hit", instant=True)], "percentunit",
               thresholds={"mode": "absolute", "steps": [{"color": "orange", "value": None},
                                                         {"color": "green", "value": 0.2}]}), 4, 8)
    L.add(timeseries("Tokens per generation p50 / p95 by type", "Quantiles of tokens per generation "
                     "(buckets 1, 4, 16 ... 4^11). Exemplars link to generation_id / trace_id.",
                     quantiles("zenmux_generation_tokens", "token_type", BSEL), "short"), 12, 8)

    L.row("Latency: why is it slow")
    L.add(timeseries("Time to first token p50 / p95 by model", "ZenMux `latency`: request to first token.",
                     quantiles("zenmux_first_token_latency_seconds", "model", BSEL), "s",
                     thresholds=steps(("orange", 5), ("red", 15)), threshold_line=True), 12, 8)
    L.add(timeseries("Generation time p50 / p95 by model", "ZenMux `generationTime`: first token to end.",
                     quantiles("zenmux_generation_duration_seconds", "model", BSEL), "s",
                     thresholds=steps(("orange", 30), ("red", 120)), threshold_line=True), 12, 8)
    L.add(timeseries("Time to first token p95 by protocol", "Same as above, grouped by protocol.",
                     [target(f"histogram_quantile(0.95, sum by (protocol, le) "
                             f"(rate(zenmux_first_token_latency_seconds_bucket{{{BSEL}}}[{RI}])))",
                             "p95 {{protocol}}", exemplar=True)], "s"), 12, 8)
    L.add(timeseries("Mean generation time by model", "Mean of generationTime per generation.",
                     [target(f"sum by (model) (rate(zenmux_generation_duration_seconds_sum{{{BSEL}}}[{RI}])) "
                             f"/ sum by (model) (rate(zenmux_generation_duration_seconds_count{{{BSEL}}}[{RI}]))",
                             "{{model}}")], "s"), 12, 8)

    L.row("Outcomes: upstream retries, finish reasons, streaming")
    L.add(timeseries("Upstream retries per second by model", "requestRetryTimes summed: ZenMux retrying "
                     "the upstream provider. Rising retries explain latency spikes.",
                     [target(f"sum by (model) (rate(zenmux_upstream_retries_total{{{BSEL}}}[{RI}]))",
                             "{{model}}")], "short", thresholds=steps()), 8, 8)
    L.add(timeseries("Retries per generation p95 by model", "95th percentile of requestRetryTimes per "
                     "generation. Exemplars link to the generation.",
                     [target(f"histogram_quantile(0.95, sum by (model, le) "
                             f"(rate(zenmux_generation_upstream_retries_bucket{{{BSEL}}}[{RI}])))", "p95 {{model}}",
                             exemplar=True)], "short", thresholds=steps(("orange", 1), ("red", 3)),
                     threshold_line=True), 8, 8)
    L.add(timeseries("Finish reasons", "Generations per second by finish_reason (stop, length, "
                     "tool_calls, content_filter...). A rise of `length` means truncated answers.",
                     [target(f"sum by (finish_reason) (rate(zenmux_generations_total{{{BSEL}}}[{RI}]))",
                             "{{finish_reason}}")], "reqps", stack=True), 8, 8)
    L.add(timeseries("Streamed share by protocol", "Share of generations that were streamed.",
                     [target(f'sum by (protocol) (rate(zenmux_generations_total{{{BSEL}, streamed="true"}}[{RI}])) '
                             f"/ sum by (protocol) (rate(zenmux_generations_total{{{BSEL}}}[{RI}]))",
                             "{{protocol}}")], "percentunit"), 12, 8)
    L.add(stat("Streamed share in range", "Streamed generations / all generations over the time range.",
               [target(f'sum(increase(zenmux_generations_total{{{BSEL}, streamed="true"}}[$__range])) '
                       f"/ sum(increase(zenmux_generations_total{{{BSEL}}}[$__range]))", "streamed",
                       instant=True)], "percentunit"), 4, 8)
    L.add(stat("Generations counted without cost", "Generations resolved without billing data "
               "(subscription_key: billed by subscription; gave_up_waiting: billing never arrived). "
               "Their spend is missing from the panels above.",
               [target(f"sum(increase(zenmux_exporter_billing_unavailable_total{{{SEL}}}[$__range]))",
                       "without cost", instant=True)], "short",
               thresholds=steps(("orange", 1))), 8, 8)

    # ZenMux's figures are the account's (the same on every exporter of a job: max); the exporters' add up.
    L.row("Reconciliation: do our numbers match ZenMux's books (reconcile.management_api_key)")
    rsel = 'job=~"$job", model=~"$model"'
    L.add(timeseries("ZenMux vs exporters by model, closed day (USD)",
                     "Yesterday's (UTC) cost per model in ZenMux's account books (GET /api/v1/management/cost) "
                     "and in the exporters' ledgers (generations by their createAt day). They should be equal.",
                     [target(f'max by (model) (zenmux_reconcile_zenmux_cost_usd{{{rsel}, day="yesterday"}})',
                             "ZenMux {{model}}"),
                      target(f'sum by (model) (zenmux_reconcile_exporter_cost_usd{{{rsel}, day="yesterday"}})',
                             "exporters {{model}}", ref="B")],
                     "currencyUSD"), 12, 8)
    L.add(timeseries("Difference by model (USD)",
                     "ZenMux's cost minus the exporters', per UTC day (yesterday: closed; today: so far, moving "
                     "while both sides catch up). ZenMuxReconcileDifference fires on the closed day beyond "
                     "zenmux:reconcile_difference_max_usd and _ratio. Requires prometheus/rules.yaml.",
                     [target(f"job_day_model:zenmux_reconcile_difference_usd:fleet{{{rsel}}}",
                             "{{day}} {{model}}")],
                     "currencyUSD", minimum=None), 12, 8)
    L.add(stat("Unseen spend, closed day", "Spend ZenMux billed yesterday whose ids never reached an exporter "
               "(uninstrumented apps or keys, lost ids): the positive differences, summed over models.",
               [target(f'sum(clamp_min(job_day_model:zenmux_reconcile_difference_usd:fleet{{{rsel}, '
                       f'day="yesterday"}}, 0))', "unseen")], "currencyUSD", decimals=4,
               thresholds=steps(("orange", 0.1))), 4, 8)
    L.add(table("Per exporter: difference and unseen spend",
                "Each exporter against the whole account (right when one exporter sees all of its traffic).",
                [target(f'zenmux_reconcile_difference_usd{{{SEL}, model=~"$model"}}', instant=True,
                        fmt="table"),
                 target(f'zenmux_reconcile_unseen_cost_usd{{{SEL}, model=~"$model"}}', ref="B", instant=True,
                        fmt="table")],
                "currencyUSD"), 8, 8)
    L.add(timeseries("Requests: ZenMux vs exporters", "Requests per UTC day in ZenMux's books and generations "
                     "the exporters resolved.",
                     [target(f"sum by (day) (max by (day, model) (zenmux_reconcile_zenmux_requests{{{rsel}}}))",
                             "ZenMux {{day}}"),
                      target(f"sum by (day) (zenmux_reconcile_exporter_requests{{{rsel}}})", "exporters {{day}}",
                             ref="B")],
                     "short"), 12, 8)
    L.add(stat("PAYG balance", "The account's pay-as-you-go credit balance (total_credits).",
               [target('max(zenmux_payg_balance_usd{job=~"$job"})', "balance")], "currencyUSD", decimals=2,
               graph=True), 4, 8)
    L.add(stat("Runway", "Hours the PAYG balance lasts at the last hour's spend rate. ZenMuxPaygRunwayLow fires "
               "under zenmux:runway_min_hours (24 h by default). Unseen spend shortens it further.",
               [target('min(job:zenmux_payg_runway_hours:rate1h{job=~"$job"}) * 3600', "runway")], "s",
               decimals=1, thresholds={"mode": "absolute", "steps": [{"color": "red", "value": None},
                                                                    {"color": "orange", "value": 86400},
                                                                    {"color": "green", "value": 259200}]}), 4, 8)
    L.add(timeseries("Balance: top-up and bonus credits", "The parts of the PAYG balance.",
                     [target('max by (part) (zenmux_payg_balance_part_usd{job=~"$job"})', "{{part}}")],
                     "currencyUSD", stack=True), 8, 8)

    extra = {
        "name": "extra_label", "label": "Extra label", "type": "textbox", "query": "feature",
        "current": {"selected": False, "text": "feature", "value": "feature"},
        "options": [{"selected": True, "text": "feature", "value": "feature"}], "hide": 0,
        "description": "An extra label configured under metrics.extra_labels, used by 'Spend rate by ...'.",
    }
    return dashboard(
        "zenmux-cost-and-usage", "ZenMux — cost and usage",
        "What ZenMux generations cost, by model, protocol, fee item and extra labels; tokens, cache hits, "
        "latency, retries and finish reasons. Source: zenmux-exporter.",
        ["zenmux", "llm", "cost"], L, variables([extra]), "now-24h")


# ------------------------------------------------------------------ exporter health

def exporter_health() -> Json:
    L = Layout()

    L.row("Scrape health: is the exporter up")
    L.add(stat("Exporters up", "Targets of the selected jobs that Prometheus scraped successfully, and how many "
               "serve the business series (zenmux_exporter_expose_leader): each sidecar does; in fleet mode exactly "
               "one exposer, the leader (0 there: no new values on the cost dashboard).",
               [target(f"sum(up{{{SEL}}})", "up"),
                target(f"sum(zenmux_exporter_expose_leader{{{SEL}}})", "serving business series", ref="B")],
               "short", decimals=0), 4, 5)
    L.add(stat("Exporters down", "Targets whose last scrape failed. ZenMuxExporterDown fires after 5 minutes.",
               [target(f"count(up{{{SEL}}} == 0) or vector(0)", "down")], "short", decimals=0,
               thresholds=steps(("red", 1))), 4, 5)
    L.add(stat("API auth", "1 while the ZenMux API answers 401/403 to generation lookups "
               "(ZenMuxApiAuthFailing).",
               [target(f"max(zenmux_exporter_api_auth_failing{{{SEL}}})", "auth failing")], "short",
               thresholds=steps(("red", 1)),
               mappings=[{"type": "value", "options": {
                   "0": {"text": "OK", "color": "green", "index": 0},
                   "1": {"text": "FAILING", "color": "red", "index": 1}}}]), 4, 5)
    L.add(stat("Draining", "Exporters shutting down and resolving their pending ids "
               "(zenmux_exporter_draining = 1); /readyz answers 503 meanwhile. Expected during a rollout, "
               "suspicious if it lasts.",
               [target(f"sum(zenmux_exporter_draining{{{SEL}}})", "draining")], "short", decimals=0,
               thresholds=steps(("orange", 1)),
               mappings=[{"type": "value", "options": {"0": {"text": "none", "color": "green", "index": 0}}}]),
          4, 5)
    L.add(stat("Firing ZenMux alerts", "Alerts from prometheus/rules.yaml currently firing.",
               [target('count(ALERTS{alertname=~"ZenMux.*", alertstate="firing"}) or vector(0)', "alerts")],
               "short", decimals=0, thresholds=steps(("red", 1))), 4, 5)
    L.add(stat("State database errors in range", "Writes of lookup results to the state database that "
               "failed (zenmux_exporter_state_errors_total; retried after a pause, nothing is lost). Non-zero "
               "points at disk full, permissions or a locked database.",
               [target(f"sum(increase(zenmux_exporter_state_errors_total{{{SEL}}}[$__range]))", "errors",
                       instant=True)], "short", decimals=0, thresholds=steps(("red", 1)), no_value="0"), 4, 5)
    L.add(table("Build info", "Exporter version and Python runtime per instance.",
                [target(f"max by (job, instance, version, python_version) (zenmux_exporter_build_info{{{SEL}}})",
                        "", instant=True, fmt="table")], "short"), 6, 7)
    L.add(timeseries("Scrape duration", "Time Prometheus needs to scrape /metrics. The exporter renders "
                     "from its ledger; growth here follows label cardinality.",
                     [target(f"scrape_duration_seconds{{{SEL}}}", "{{instance}}")], "s",
                     thresholds=steps(("orange", 1), ("red", 5))), 6, 7)
    L.add(timeseries("Samples per scrape", "Series exposed per scrape (cardinality).",
                     [target(f"scrape_samples_scraped{{{SEL}}}", "{{instance}}")], "short"), 6, 7)
    L.add(timeseries("Metrics server connections", "Connections open to /metrics against the server's bound "
                     "(zenmux_exporter_http_max_connections), and connections it closed at once because the "
                     "bound was reached (something holds connections open, or floods the port).",
                     [target(f"max by (instance) (zenmux_exporter_http_connections{{{SEL}}})", "{{instance}}"),
                      target(f"max by (instance) (zenmux_exporter_http_max_connections{{{SEL}}})",
                             "limit {{instance}}", ref="B"),
                      target(f"sum by (instance) (increase(zenmux_exporter_http_connections_refused_total{{{SEL}}}"
                             "[$__interval]))", "refused {{instance}}", ref="C")],
                     "short",
                     overrides=[{"matcher": {"id": "byRegexp", "options": "limit.*"}, "properties": LIMIT_LINE},
                                {"matcher": {"id": "byRegexp", "options": "refused.*"}, "properties": [
                                    {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}}]}]), 6, 7)
    L.add(timeseries("Metrics server: requests cut off by reason", "Requests or connections the metrics server "
                     "cut at a bound: deadlines (header, body, write, TLS handshake), sizes, bad or smuggling "
                     "framing, and connections evicted at the connection bound for a new one (docs/http.md). "
                     "A steady rate means a slow, broken or hostile client.",
                     [target(f"sum by (reason) (increase(zenmux_exporter_http_requests_rejected_total{{{SEL}}}"
                             "[$__interval]))", "{{reason}}")], "short"), 6, 7)

    L.row("Ingest: ids received, rejected, duplicate; UDP and file sources")
    L.add(timeseries("Ids received by source", "Valid generation ids read per second.",
                     [target(f"sum by (source) (rate(zenmux_exporter_ids_received_total{{{SEL}}}[{RI}]))",
                             "{{source}}")], "cps"), 8, 8)
    L.add(timeseries("Ids rejected by source and reason", "Lines, datagrams or ids rejected: invalid_id, "
                     "no_id, not_json, line_too_long, datagram_too_large, queue_full.",
                     [target(f"sum by (source, reason) (rate(zenmux_exporter_ids_rejected_total{{{SEL}}}[{RI}]))",
                             "{{source}} {{reason}}")], "cps", thresholds=steps()), 8, 8)
    L.add(timeseries("Duplicate ids by source", "Ids already pending or resolved, dropped (at-least-once "
                     "producers, replays after rotation).",
                     [target(f"sum by (source) (rate(zenmux_exporter_ids_duplicate_total{{{SEL}}}[{RI}]))",
                             "{{source}}")], "cps"), 8, 8)
    L.add(timeseries("UDP datagrams received vs dropped", "Datagrams per second, and those dropped because "
                     "the ingest buffer was full (ZenMuxUdpDatagramsDropped).",
                     [target(f"sum by (source) (rate(zenmux_exporter_udp_datagrams_total{{{SEL}}}[{RI}]))",
                             "received {{source}}"),
                      target(f"sum by (source) (rate(zenmux_exporter_udp_dropped_datagrams_total{{{SEL}}}[{RI}]))",
                             "dropped {{source}}", ref="B")], "cps",
                     overrides=[{"matcher": {"id": "byRegexp", "options": "dropped.*"}, "properties": [
                         {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}}]}]), 8, 8)
    L.add(timeseries("File lag (bytes behind)", "Size of the current file minus the offset read. "
                     "Should stay near zero; ZenMuxFileTailLagging fires when it exceeds 16 MiB "
                     "without progress.",
                     [target(f"sum by (instance, source) (zenmux_exporter_file_size_bytes{{{SEL}}}) "
                             f"- sum by (instance, source) (zenmux_exporter_file_read_bytes{{{SEL}}})",
                             "{{instance}} {{source}}")], "bytes",
                     thresholds=steps(("orange", 1048576), ("red", 16777216)), threshold_line=True), 8, 8)
    L.add(timeseries("File read offset vs size", "Bytes read in the current file next to its size; a "
                     "drop to zero is a rotation.",
                     [target(f"zenmux_exporter_file_read_bytes{{{SEL}}}", "read {{instance}} {{source}}"),
                      target(f"zenmux_exporter_file_size_bytes{{{SEL}}}", "size {{instance}} {{source}}",
                             ref="B")], "bytes"), 8, 8)
    L.add(timeseries("File rotations", "Rotations followed per interval, by kind (rename, truncate; a "
                     "truncation's copy read: copytruncate_recovered, or not: copytruncate_unrecovered), and the "
                     "lines read from rotated copies.",
                     [target(f"sum by (source, kind) (increase(zenmux_exporter_file_rotations_total{{{SEL}}}"
                             "[$__interval]))", "{{source}} {{kind}}"),
                      target(f"sum by (source) (increase(zenmux_exporter_file_recovered_lines_total{{{SEL}}}"
                             "[$__interval]))", "{{source}} lines from copies", ref="B")], "short"), 8, 8)
    L.add(timeseries("File generations", "Checkpoints kept per file source (one per generation of the log "
                     "not yet expired), and per interval: checkpoints expired, rotated files skipped as history "
                     "(older than what the source has read), files that begin as a known generation but differ "
                     "(read as new ones: raise sources[].fingerprint_bytes if every file has a long fixed header).",
                     [target(f"sum by (instance, source) (zenmux_exporter_file_checkpoints{{{SEL}}})",
                             "{{instance}} {{source}} kept"),
                      target(f"sum by (source) (increase(zenmux_exporter_file_checkpoints_expired_total{{{SEL}}}"
                             "[$__interval]))", "{{source}} expired", ref="B"),
                      target(f"sum by (source) (increase(zenmux_exporter_file_history_skipped_total{{{SEL}}}"
                             "[$__interval]))", "{{source}} history skipped", ref="C"),
                      target(f"sum by (source) (increase(zenmux_exporter_file_identity_conflicts_total{{{SEL}}}"
                             "[$__interval]))", "{{source}} identity conflicts", ref="D")], "short"), 8, 8)
    L.add(timeseries("Label values folded into 'other'", "Values folded by a cardinality cap, by label. "
                     "Non-zero means a label (model, feature...) has more values than allowed.",
                     [target(f"sum by (label) (increase(zenmux_exporter_label_overflow_total{{{SEL}}}"
                             "[$__interval]))", "{{label}}")], "short", thresholds=steps(("orange", 1))), 8, 8)
    L.add(stat("UDP datagrams dropped in range", "Total dropped datagrams over the time range.",
               [target(f"sum(increase(zenmux_exporter_udp_dropped_datagrams_total{{{SEL}}}[$__range]))",
                       "dropped", instant=True)], "short", decimals=0, thresholds=steps(("red", 1))), 8, 8)

    L.row("Resolution: is the exporter keeping up")
    L.add(timeseries("Pending ids", "Ids waiting out the billing delay or being retried. "
                     "ZenMuxPendingBacklogGrowing fires when this keeps growing while intake outpaces "
                     "resolution.",
                     [target(f"sum by (instance) (zenmux_exporter_pending_ids{{{SEL}}})", "{{instance}}")],
                     "short"), 6, 8)
    L.add(timeseries("Pending queue fill", "Pending ids as a share of the configured queue bound "
                     "(state.max_pending, zenmux_exporter_max_pending_ids). At 100 % new ids are rejected "
                     "as queue_full (see 'Ids rejected by source and reason').",
                     [target(f"max by (instance) (zenmux_exporter_pending_ids{{{SEL}}}) "
                             f"/ max by (instance) (zenmux_exporter_max_pending_ids{{{SEL}}})", "{{instance}}")],
                     "percentunit", thresholds=steps(("orange", 0.5), ("red", 0.9)), threshold_line=True),
          6, 8)
    L.add(timeseries("Oldest pending age", "Age of the oldest pending id against the exporter's own give-up "
                     "horizon (zenmux_exporter_give_up_after_seconds = resolve.give_up_after_seconds; for "
                     "exporters too old to expose it, zenmux:give_up_after_seconds:effective from the rules). "
                     "ZenMuxOldestPendingPastGiveUp fires when the age stays above the line.",
                     [target(f"max by (instance) (zenmux_exporter_oldest_pending_age_seconds{{{SEL}}})",
                             "{{instance}}"),
                      target(f"max by (instance) (zenmux_exporter_give_up_after_seconds{{{SEL}}}) "
                             "or on () max(zenmux:give_up_after_seconds:effective)",
                             "give-up horizon {{instance}}", ref="B")],
                     "s",
                     overrides=[{"matcher": {"id": "byRegexp", "options": "give-up horizon.*"},
                                 "properties": LIMIT_LINE}]), 6, 8)
    L.add(timeseries("In-flight lookups", "Lookups in progress against GET /api/v1/management/generation, against the "
                     "configured limit (zenmux.concurrency, zenmux_exporter_lookup_concurrency_limit). Pinned "
                     "at the limit while the backlog grows: the exporter is the bottleneck.",
                     [target(f"sum by (instance) (zenmux_exporter_inflight_lookups{{{SEL}}})", "{{instance}}"),
                      target(f"max by (instance) (zenmux_exporter_lookup_concurrency_limit{{{SEL}}})",
                             "limit {{instance}}", ref="B")],
                     "short",
                     overrides=[{"matcher": {"id": "byRegexp", "options": "limit.*"}, "properties": LIMIT_LINE}]), 6, 8)
    L.add(timeseries("Lookup outcomes", "Lookup attempts per second by outcome. not_ready is the normal "
                     "billing delay; malformed, unauthorized, server_error, timeout are not.",
                     [target(f"sum by (outcome) (rate(zenmux_exporter_lookups_total{{{SEL}}}[{RI}]))",
                             "{{outcome}}")], "cps", stack=True,
                     overrides=[{"matcher": {"id": "byRegexp",
                                             "options": "malformed|unauthorized|server_error|timeout|connection_error"},
                                 "properties": [{"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}}]},
                                {"matcher": {"id": "byName", "options": "resolved"}, "properties": [
                                    {"id": "color", "value": {"mode": "fixed", "fixedColor": "green"}}]}]), 12, 8)
    L.add(timeseries("Lookup duration p50 / p95 by outcome", "Duration of lookup attempts. Exemplars link "
                     "to the generation id.",
                     quantiles("zenmux_exporter_lookup_duration_seconds", "outcome", SEL), "s",
                     thresholds=steps(("orange", 2), ("red", 10))), 12, 8)
    L.add(timeseries("Abandoned ids", "Ids given up after resolve.give_up_after_seconds, by reason "
                     "(ZenMuxIdsAbandoned). Their cost is missing.",
                     [target(f"sum by (reason) (increase(zenmux_exporter_abandoned_ids_total{{{SEL}}}"
                             "[$__interval]))", "{{reason}}")], "short", thresholds=steps(("red", 1))), 8, 8)
    L.add(timeseries("Generations counted without cost", "Generations resolved without billing, by reason "
                     "(subscription_key, gave_up_waiting).",
                     [target(f"sum by (reason) (increase(zenmux_exporter_billing_unavailable_total{{{SEL}}}"
                             "[$__interval]))", "{{reason}}")], "short"), 8, 8)
    L.add(timeseries("Reconciliation requests", "Account requests for reconciliation (cost, balance) by "
                     "outcome: rate_limited is ZenMux's 60/min account limit (429) or a management endpoint's (422).",
                     [target(f"sum by (endpoint, outcome) (rate(zenmux_exporter_reconcile_requests_total{{{SEL}}}"
                             f"[{RI}]))", "{{endpoint}} {{outcome}}")], "reqps"), 8, 8)
    L.add(timeseries("Malformed and auth failures", "Malformed responses (ZenMuxMalformedLookupResponses) "
                     "and 401/403 answers (ZenMuxApiAuthFailing) per interval.",
                     [target(f'sum by (outcome) (increase(zenmux_exporter_lookups_total{{{SEL}, '
                             f'outcome=~"malformed|unauthorized"}}[$__interval]))', "{{outcome}}")], "short",
                     thresholds=steps(("red", 1))), 8, 8)

    return dashboard(
        "zenmux-exporter-health", "ZenMux — exporter health",
        "Is zenmux-exporter healthy and keeping up: ingest, rejects, backlog, lookups, API auth, UDP drops, "
        "file lag, scrape health.",
        ["zenmux", "exporter"], L, variables(), "now-6h")


DASHBOARDS = {
    "zenmux-cost-and-usage.json": cost_and_usage,
    "zenmux-exporter-health.json": exporter_health,
}


def render(build: Any) -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    OUT.mkdir(parents=True, exist_ok=True)
    for name, build in DASHBOARDS.items():
        path = OUT / name
        text = render(build)
        if check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print("stale, run python3 grafana/build_dashboards.py:", ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
