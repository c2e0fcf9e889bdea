"""Every dashboard query, every recording rule and the exemplars, against a REAL Prometheus.

A real `prometheus` (subprocess) scrapes the in-process exporter every second and evaluates the
shipped prometheus/settings.rules.yaml and rules.yaml every second. The exporter is fed by the
simulated API through its log file AND UDP, with lookup faults (server errors, malformed, truncated,
reset, oversized, slow, rate limited) so error outcomes have data, and with the conditions a healthy
system rarely shows generated on purpose: an id that never bills (abandoned after a short give-up
horizon, counted without cost), an unknown id, rejected lines and datagrams, a duplicate, a log
rotation, a failed state database write, label values folded by a cardinality cap.

Then every PromQL expression of every panel, template variable and annotation of both dashboards
is run through /api/v1/query with the variables substituted as Grafana would (job and instance of
the scrape config, model and protocol from the variables' own queries, `$__rate_interval` short
enough for a 1 s scrape interval); each must return at least one sample with a real value. Every
recording rule must produce data, every rule must evaluate without error, the alerts the generated
conditions imply must fire, and histogram exemplars must arrive with generation_id and trace_id.
Prometheus is polled with a deadline; nothing waits a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import re
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from exporter.simulate.api import Faults
from tests.dashboard_contract import dashboard_queries, dashboards, recording_rules
from tests.prometheus_server import JOB, Prometheus, StartPrometheus
from tests.support import (
    MANAGEMENT_KEY,
    FakeApi,
    StartExporter,
    append_lines,
    fail_next_settle,
    json_line,
    make_config,
    scrape,
    value,
    wait_until,
)

pytestmark = pytest.mark.slow  # a real Prometheus scraping a real exporter

GIVE_UP_SECONDS = 4.0
DEADLINE_SECONDS = 30.0
# what Grafana would put in for a 1 s scrape interval: long enough for >= 2 samples per window
LIVE_SUBSTITUTIONS: Mapping[str, str] = {
    "__rate_interval": "15s",
    "__interval": "15s",
    "__range": "5m",
    "__range_s": "300",
    "extra_label": "feature",
}
FAULTS = Faults(
    server_error=0.08,
    malformed=0.05,
    truncated=0.03,
    reset=0.03,
    oversized=0.02,
    oversized_bytes=1_200_000,  # above zenmux.max_response_bytes: too_large
    rate_limited=0.02,
    slow=0.02,
    slow_seconds=1.0,  # above zenmux.timeout_seconds: timeout
)
# alerts the generated conditions must make fire (no `for:`, so within an evaluation or two)
EXPECTED_ALERTS = ("ZenMuxIdsAbandoned", "ZenMuxMalformedLookupResponses")
CONDITION_COUNTERS = (
    "zenmux_exporter_abandoned_ids_total{",
    "zenmux_exporter_billing_unavailable_total{",
    "zenmux_exporter_state_errors_total{",
)


def prometheus_regex(value: str) -> str:
    """A label value as Grafana formats it into a `=~"..."` matcher (regex-escaped, PromQL string-escaped)."""
    return re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\\\1", value)


# --------------------------------------------------------------------------- traffic


@dataclass
class Traffic:
    """Generations created in the simulated API and announced through the log file and UDP."""

    fake_api: FakeApi
    log_file: Path
    udp_port: int
    rotated: bool = False
    batches: int = 0

    def send_udp(self, payload: bytes) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(payload, ("127.0.0.1", self.udp_port))

    def batch(self) -> None:
        n = self.batches
        self.batches += 1
        file_ids = [self.fake_api.create() for _ in range(3)]
        udp_ids = [self.fake_api.create() for _ in range(2)]
        # six features, metrics.max_label_values 4: some are folded into "other"
        append_lines(self.log_file, [json_line(i, f"feature-{(n + k) % 6}") for k, i in enumerate(file_ids)])
        self.send_udp("\n".join(udp_ids).encode())
        if n == 20 and not self.rotated:
            # rename rotation: the writer continues in a fresh file
            self.log_file.rename(self.log_file.with_suffix(".log.1"))
            self.rotated = True

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.batch()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)  # pacing: ~50 generations per second


# --------------------------------------------------------------------------- checks


def has_value(result: list[dict[str, Any]]) -> bool:
    """At least one sample that a panel would draw (not NaN)."""
    return any(not math.isnan(float(sample["value"][1])) for sample in result)


def live_queries(substitutions: Mapping[str, str]) -> Iterator[tuple[str, str]]:
    for path in dashboards():
        for title, expr in dashboard_queries(path, substitutions):
            yield f"{path.stem}: {title}", expr


async def variable_values(
    prometheus: Prometheus, client: httpx.AsyncClient, substitutions: Mapping[str, str]
) -> dict[str, set[str]]:
    """Values of each query variable: its selector run as Grafana's label_values() would."""
    values: dict[str, set[str]] = {}
    for path in dashboards():
        for title, expr in dashboard_queries(path, substitutions):
            if title.startswith("variable $"):
                name = title.removeprefix("variable $")
                found = {s["metric"].get(name) for s in await prometheus.query(client, expr)}
                values.setdefault(name, set()).update(v for v in found if v)
    return values


async def problems_now(
    prometheus: Prometheus, client: httpx.AsyncClient, instance: str, started: float
) -> dict[str, str]:
    """Everything not (yet) as it must be, by check; empty when the whole proof holds."""
    problems: dict[str, str] = {}
    substitutions = {**LIVE_SUBSTITUTIONS, "job": prometheus_regex(JOB), "instance": prometheus_regex(instance)}

    variables = await variable_values(prometheus, client, {**substitutions, "model": ".*", "protocol": ".*"})
    for name, expected in (("job", JOB), ("instance", instance)):
        if expected not in variables.get(name, set()):
            problems[f"variable ${name}"] = f"{expected!r} not among {sorted(variables.get(name, set()))}"
    for name in ("model", "protocol"):
        if not variables.get(name):
            problems[f"variable ${name}"] = "no values"
            return problems
        # every value selected, as a multi-select without "All" sends them
        substitutions[name] = "(" + "|".join(prometheus_regex(v) for v in sorted(variables[name])) + ")"

    for title, expr in live_queries(substitutions):
        result = await prometheus.query(client, expr)
        if not has_value(result):
            problems[f"{title}: {expr}"] = "no data" if not result else "only NaN"

    for record in recording_rules():
        if not has_value(await prometheus.query(client, record)):
            problems[f"recording rule {record}"] = "no data"

    groups = (await prometheus.api(client, "rules"))["groups"]
    for group in groups:
        for rule in group["rules"]:
            if rule.get("health") == "err":
                problems[f"rule {rule['name']}"] = rule.get("lastError", "error")

    for alert in EXPECTED_ALERTS:
        firing = f'ALERTS{{alertname="{alert}", alertstate="firing", job="{JOB}"}}'
        if not await prometheus.query(client, firing):
            problems[f"alert {alert}"] = "not firing"

    # the conditions generated on purpose reached Prometheus, not only their zero series
    for expr in (
        'zenmux_exporter_abandoned_ids_total{reason="not_ready"} > 0',
        'zenmux_exporter_billing_unavailable_total{reason="gave_up_waiting"} > 0',
        'zenmux_exporter_lookups_total{outcome=~"malformed|server_error|timeout|connection_error|too_large"} > 0',
        "zenmux_exporter_state_errors_total > 0",
        'zenmux_exporter_file_rotations_total{kind="rename"} > 0',
        "zenmux_exporter_ids_rejected_total > 0",
        "zenmux_exporter_ids_duplicate_total > 0",
        'zenmux_reconcile_unseen_cost_usd{day="yesterday"} > 0',
        'zenmux_reconcile_exporter_cost_usd{day="yesterday"} > 0',
        "zenmux_exporter_label_overflow_total > 0",
        f"zenmux_exporter_give_up_after_seconds == {GIVE_UP_SECONDS:g}",
    ):
        if not await prometheus.query(client, expr):
            problems[f"condition {expr}"] = "not seen"

    data = await prometheus.api(
        client,
        "query_exemplars",
        query=f'zenmux_generation_cost_usd_bucket{{job="{JOB}"}}',
        start=f"{started - 5:.3f}",
        end=f"{time.time() + 5:.3f}",
    )
    exemplars = [e["labels"] for series in data for e in series["exemplars"]]
    if not any(e.get("generation_id") and re.fullmatch(r"[0-9a-f]{32}", e.get("trace_id", "")) for e in exemplars):
        problems["exemplars of zenmux_generation_cost_usd_bucket"] = f"none with ids: {exemplars[:3]}"
    return problems


# --------------------------------------------------------------------------- the test


async def test_every_dashboard_query_and_rule_returns_data_from_a_real_prometheus(
    tmp_path: Path, fake_api: FakeApi, start_exporter: StartExporter, start_prometheus: StartPrometheus
) -> None:
    started = time.time()
    sim = fake_api.sim
    sim.configure(dataclasses.replace(sim.config, not_ready_mode="partial", retry_after_seconds=0))
    config = make_config(
        tmp_path,
        fake_api.url,
        zenmux={"timeout_seconds": 0.5, "concurrency": 8},
        resolve={"give_up_after_seconds": GIVE_UP_SECONDS},
        metrics={"max_label_values": 4},
        # reconciliation on: a closed day with generations seen and unseen, today's unseen spend, the balance
        reconcile={"management_api_key": MANAGEMENT_KEY, "poll_interval_seconds": 10, "max_requests_per_minute": 600},
    )
    yesterday = [fake_api.create(created_at=started - 86400) for _ in range(3)]
    sim.account.create_unseen(created_at=started - 86400)
    sim.account.create_unseen(created_at=started)
    exporter = await start_exporter(config)
    instance = f"127.0.0.1:{exporter.metrics_port}"
    prometheus = start_prometheus(instance)
    log_file = tmp_path / "app.log"
    traffic = Traffic(fake_api, log_file, exporter.udp_sources[0].port)
    stop = asyncio.Event()
    running = asyncio.create_task(traffic.run(stop))
    try:
        async with httpx.AsyncClient(timeout=5) as client:

            async def scraping() -> bool:
                if prometheus.process.poll() is not None:
                    raise AssertionError(f"prometheus exited:\n{prometheus.output()}")
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"{prometheus.url}/-/ready")).status_code == 200:
                        return bool(await prometheus.query(client, f'up{{job="{JOB}"}} == 1'))
                return False

            # Prometheus must see the zero samples before the events, as it would in production
            await wait_until(scraping, timeout=20, what="prometheus ready and scraping the exporter")

            # conditions first, without faults, so their outcome is the one intended
            never_bills = sim.create(created_at=time.time() + 3600)["generationId"]  # partial answers only
            append_lines(log_file, [json_line(never_bills), "not json at all", '{"no_id_here": 1}'])
            append_lines(log_file, [json_line(gid) for gid in yesterday])
            traffic.send_udp(b"unknown_generation_id_0001\n\xff\xfe not an id\n")  # 404 until abandoned; rejected
            duplicate = fake_api.create()
            traffic.send_udp(duplicate.encode())
            traffic.send_udp(duplicate.encode())
            fail_next_settle(exporter)

            async def abandoned() -> bool:
                # Only the three counters' lines are parsed: the whole exposition (~1 MB, the ledger's histograms
                # by model, protocol and feature) took prometheus_client's parser 1-3 s per poll on a loaded
                # machine, on the event loop the exporter runs on: its lookups timed out (0.5 s), and the ids
                # waited seconds for each attempt, past this wait's deadline.
                text = "\n".join(
                    line
                    for line in (await scrape(exporter.metrics_port)).splitlines()
                    if line.startswith(CONDITION_COUNTERS)
                )
                return (
                    value(text, "zenmux_exporter_abandoned_ids_total", reason="not_ready") >= 2
                    and value(text, "zenmux_exporter_billing_unavailable_total", reason="gave_up_waiting") >= 1
                    and value(text, "zenmux_exporter_state_errors_total") >= 1
                )

            await wait_until(abandoned, timeout=GIVE_UP_SECONDS + 10, what="two ids abandoned, one state error")
            sim.configure(dataclasses.replace(sim.config, faults=FAULTS))

            problems: dict[str, str] = {"not checked yet": ""}
            deadline = time.monotonic() + DEADLINE_SECONDS

            async def proven() -> bool:
                nonlocal problems
                problems = await problems_now(prometheus, client, instance, started)
                return not problems or time.monotonic() > deadline

            await wait_until(proven, timeout=DEADLINE_SECONDS + 30, what="the live checks")
            assert problems == {}, "\n".join(f"{k}: {v}" for k, v in problems.items())

            # the proof covered every panel of both dashboards
            substitutions = {**LIVE_SUBSTITUTIONS, "job": JOB, "instance": instance, "model": ".*", "protocol": ".*"}
            assert len(list(live_queries(substitutions))) > 80
    finally:
        stop.set()
        await running
