"""Prometheus rules (prometheus/*.yaml) with the real promtool.

- `promtool check rules` and `promtool test rules` (prometheus/tests/*.test.yaml);
- every alert has a unit test where it fires and one where it stays quiet;
- every alert has severity, summary, description and a runbook section in the docs;
- rules read only metrics and labels the exporter exposes (the contract in test_dashboards);
- the example scrape config is valid for `promtool check config`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.dashboard_contract import DOCS, PROMETHEUS_DIR, RULE_FILES, check_expr, readme_section, rules

TEST_FILES = sorted((PROMETHEUS_DIR / "tests").glob("*.test.yaml"))
EXAMPLE_CONFIG = PROMETHEUS_DIR / "prometheus.example.yaml"
SEVERITIES = frozenset({"warning", "critical"})


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, check=False, cwd=cwd)


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for path in RULE_FILES for r in rules(path) if "alert" in r}


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def doc_anchors() -> set[str]:
    return {slug(m) for m in re.findall(r"^#+\s+(.+)$", DOCS.read_text(encoding="utf-8"), re.M)}


def test_promtool_is_available() -> None:
    assert shutil.which("promtool"), "promtool missing: run scripts/install-tools.sh"


def test_check_rules() -> None:
    result = promtool("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_rule_unit_tests_pass() -> None:
    assert TEST_FILES
    result = promtool("test", "rules", *map(str, TEST_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_tests_are_not_vacuous(tmp_path: Path) -> None:
    # A unit test expecting the wrong thing must fail, so a SUCCESS above means something.
    broken = tmp_path / "broken.test.yaml"
    broken.write_text(yaml.safe_dump({
        "rule_files": [str(PROMETHEUS_DIR / "rules.yaml")],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": 'zenmux_exporter_api_auth_failing{job="j",instance="i"}',
                              "values": "1x20"}],
            "alert_rule_test": [{"eval_time": "10m", "alertname": "ZenMuxApiAuthFailing", "exp_alerts": []}],
        }],
    }), encoding="utf-8")
    assert promtool("test", "rules", str(broken)).returncode != 0


def test_every_alert_fires_and_stays_quiet_in_some_unit_test() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for path in TEST_FILES:
        for case in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = set(alerts())
    assert names - fires == set(), "alerts never shown to fire"
    assert names - quiet == set(), "alerts never shown to stay quiet"
    assert (fires | quiet) - names == set(), "tests of alerts that do not exist"


def test_alert_metadata_and_runbooks() -> None:
    anchors = doc_anchors()
    assert len(alerts()) >= 9
    for name, rule in alerts().items():
        assert re.fullmatch(r"ZenMux[A-Z][A-Za-z]+", name), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert annotations["summary"].strip() and annotations["description"].strip(), name
        url = annotations["runbook_url"]
        assert url == f"docs/dashboards-and-alerts.md#{name.lower()}", name
        assert name.lower() in anchors, f"no runbook section '### {name}' in {DOCS.name}"


def test_readme_lists_every_alert_with_its_runbook() -> None:
    section = readme_section()
    for name in alerts():
        assert f"| {name} |" in section, f"{name} missing from README's alert table"
        assert f"(docs/dashboards-and-alerts.md#{name.lower()})" in section, f"{name}: no runbook link in README"


def test_required_alerts_exist() -> None:
    exprs = {name: rule["expr"] for name, rule in alerts().items()}
    joined = "\n".join(exprs.values())
    assert "zenmux:budget_usd_per_day:effective" in joined
    assert 'zenmux_exporter_lookups_total{outcome="malformed"}' in joined
    for metric in ("zenmux_exporter_api_auth_failing", "zenmux_exporter_pending_ids",
                   "zenmux_exporter_oldest_pending_age_seconds", "zenmux_exporter_abandoned_ids_total",
                   "zenmux_exporter_udp_dropped_datagrams_total", "zenmux_exporter_give_up_after_seconds", "up"):
        assert re.search(rf"\b{metric}\b", joined), metric


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_rules_use_only_exposed_metrics_and_labels(path: Path) -> None:
    problems = [
        f"{rule.get('alert') or rule.get('record')}: {problem}"
        for rule in rules(path)
        for problem in check_expr(rule["expr"])
    ]
    assert problems == []


def test_recording_rule_names() -> None:
    for path in RULE_FILES:
        for rule in rules(path):
            if "record" in rule:
                # level:metric:operations, or a zenmux:<knob> setting
                assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+(:[a-z0-9_]+)?", rule["record"]), rule["record"]


def test_budget_knob_is_absent_safe() -> None:
    recorded = {r["record"]: r["expr"] for path in RULE_FILES for r in rules(path) if "record" in r}
    assert recorded["zenmux:budget_usd_per_day"].strip().startswith("vector(")
    assert "or vector(" in recorded["zenmux:budget_usd_per_day:effective"]
    assert "or vector(3600)" in recorded["zenmux:give_up_after_seconds:effective"]


def test_example_scrape_config(tmp_path: Path) -> None:
    config = yaml.safe_load(EXAMPLE_CONFIG.read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert "static_configs" in jobs["zenmux-exporter"]
    assert all(t.endswith(":9466") for sc in jobs["zenmux-exporter"]["static_configs"] for t in sc["targets"])
    assert any("kubernetes_sd_configs" in job for job in jobs.values())
    assert all("zenmux" in name for name in jobs), "ZenMuxExporterDown matches job=~'.*zenmux.*'"
    assert sorted(config["rule_files"]) == sorted(p.name for p in RULE_FILES)

    result = promtool("check", "config", str(EXAMPLE_CONFIG))
    if result.returncode != 0 and "field kubernetes_sd_configs not found" in result.stdout + result.stderr:
        # Debian's promtool is built without Kubernetes discovery: validate everything else
        # (relabelling included) with the discovery swapped for a static target.
        for job in config["scrape_configs"]:
            if job.pop("kubernetes_sd_configs", None) is not None:
                job["static_configs"] = [{"targets": ["10.0.0.1:9466"]}]
        for name in config["rule_files"]:
            shutil.copy(PROMETHEUS_DIR / name, tmp_path / name)
        swapped = tmp_path / "prometheus.yaml"
        swapped.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        result = promtool("check", "config", str(swapped))
    assert result.returncode == 0, result.stdout + result.stderr
