"""Command line: run, check-config, lookup, reconcile, import-state, fake-api and demo."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import logging
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from exporter import __version__
from exporter.config import (
    Config,
    ConfigError,
    LogConfig,
    instance_name,
    load_config,
    parse_config,
    read_api_key,
    read_management_key,
    read_state_password,
    redacted,
    state_secrets,
)
from exporter.config import split_host_port as host_port
from exporter.state import StateError
from exporter.telemetry import configure_logging

log = logging.getLogger("exporter")


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def run_exporter(config: Config, api_key: str, management_key: str = "") -> int:
    from exporter.app import Exporter

    exporter = Exporter(config, api_key=api_key, management_key=management_key)
    try:
        await exporter.start()
    except StateError as err:
        log.error("%s", err)
        return 1
    except ConfigError as err:
        log.error("%s", err)
        return 2
    except OSError as err:
        log.error("cannot start: %s", err)
        return 1
    stop = asyncio.Event()
    _stop_on_signals(stop)
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(exporter.damaged.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waits:
        waiter.cancel()
    if exporter.damaged.is_set():  # logged by the exporter: exit 1, as when it is found at start-up
        await exporter.stop(drain_seconds=0)
        return 1
    _stop_on_signals(exporter.abort_drain)
    log.info("stopping: draining for up to %.0fs (signal again to stop at once)", config.shutdown.drain_seconds)
    report = await exporter.stop()
    where = exporter.state.description
    if config.state.url:  # the queue is the fleet's: its resolvers finish what is pending
        log.info("stopped after %.1fs; pending ids stay in %s for the fleet's resolvers", report.seconds, where)
    else:
        log.log(
            logging.WARNING if report.left_pending else logging.INFO,
            "stopped: %d ids resolved while draining, %d left pending in %s for the next start, %.1fs",
            report.resolved_during_drain,
            report.left_pending,
            where,
            report.seconds,
        )
    return 0


def load_with_key(path: Path) -> tuple[Config, str] | None:
    """The config and its API key, or None after printing every problem (exit code 2)."""
    try:
        config = load_config(path)
        return config, read_api_key(config.zenmux)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return None


GC_YOUNG_THRESHOLD = 50_000


def cmd_run(args: argparse.Namespace) -> int:
    if (loaded := load_with_key(args.config)) is None:
        return 2
    config, api_key = loaded
    try:
        management_key = read_management_key(config.reconcile)
        secrets = [api_key, management_key, *state_secrets(config.state)]
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    configure_logging(config.log, [s for s in secrets if s])
    # Ingest allocates a few tuples per line and nothing cyclic: a young-generation collection every 700
    # allocations was ~30% of the parse time. Collections still run, just 70x less often.
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
    return asyncio.run(run_exporter(config, api_key, management_key))


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        if config.zenmux.api_key_file:
            read_api_key(config.zenmux)
        read_management_key(config.reconcile)
        read_state_password(config.state)
        if config.metrics.web_config_file:
            from exporter.webconfig import load_web_config

            load_web_config(config.metrics.web_config_file)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    print(f"# {args.config}: valid. Effective configuration (secrets redacted):")
    print(yaml.safe_dump(redacted(config), sort_keys=False), end="")
    return 0


def cmd_lookup(args: argparse.Namespace) -> int:
    from exporter.zenmux import ZenMuxClient

    if (loaded := load_with_key(args.config)) is None:
        return 2
    config, api_key = loaded

    async def lookup() -> dict[str, Any]:
        client = ZenMuxClient(config.zenmux, api_key)
        try:
            result = await client.lookup(args.id)
        finally:
            await client.aclose()
        out = {k: v for k, v in dataclasses.asdict(result).items() if k != "record"}
        out["outcome"] = result.outcome.value
        out["record"] = dataclasses.asdict(result.record) if result.record else None
        return out

    print(json.dumps(asyncio.run(lookup()), indent=2))
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from datetime import datetime

    from exporter.account import AccountClient, PollError
    from exporter.app import open_store
    from exporter.clock import SystemClock
    from exporter.contribution import LabelLimiter, LedgerShape
    from exporter.ledger import Ledger
    from exporter.reconcile import audit, audit_table

    try:
        day = datetime.strptime(args.day, "%Y-%m-%d").strftime("%Y%m%d")
    except ValueError:
        print(f"--day {args.day!r}: use YYYY-MM-DD (a UTC day)", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
        management_key = read_management_key(config.reconcile)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    if not management_key:
        print(f"{args.config}: set reconcile.management_api_key(_file): the account cost needs it", file=sys.stderr)
        return 2
    if not config.state.url and not Path(config.state.path).exists():
        print(f"{config.state.path}: no state database (state.path): nothing to compare", file=sys.stderr)
        return 1
    metrics = config.metrics
    ledger = Ledger(
        LedgerShape(metrics.extra_labels),
        LabelLimiter(metrics.max_models, metrics.max_label_values, metrics.max_label_value_length),
    )

    async def fetch() -> tuple[str, str]:
        store = await open_store(config)
        try:
            ledger.load(await store.ledger_rows())
            where = store.description
        finally:
            await store.close()
        client = AccountClient(
            config.zenmux.base_url,
            management_key,
            timeout_seconds=config.reconcile.timeout_seconds,
            clock=SystemClock(),
        )
        try:
            return where, audit_table(await audit(client, ledger, day))
        finally:
            await client.aclose()

    try:
        where, table = asyncio.run(fetch())
    except StateError as err:
        print(err, file=sys.stderr)
        return 1
    except PollError as err:
        print(f"cannot read ZenMux's account cost for {args.day}: {err} ({err.outcome})", file=sys.stderr)
        return 1
    print(f"# {args.day} (UTC): ZenMux's account cost against this exporter's ledger ({where})")
    print(table)
    return 0


def cmd_import_state(args: argparse.Namespace) -> int:
    """Copies a sidecar's SQLite state into the PostgreSQL state the config names (fleet mode)."""
    from exporter.pgstate import PostgresStore
    from exporter.state import StateStore

    try:
        config = load_config(args.config)
        password = read_state_password(config.state)
        secrets = [s for s in (password, *state_secrets(config.state)) if s]
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    configure_logging(config.log, secrets)
    if not config.state.url:
        print(f"{args.config}: state.url must name the PostgreSQL database to import into", file=sys.stderr)
        return 2
    source = Path(args.source)
    if not source.is_file():
        print(f"{source}: no such SQLite state file", file=sys.stderr)
        return 2
    instance = args.instance or instance_name(config.state)

    async def copy() -> str:
        sqlite = StateStore(source, max_pending=config.state.max_pending)
        try:
            await sqlite.complete_open()  # the integrity check of a large file too: nothing damaged is copied
            dump = await sqlite.dump()
        finally:
            await sqlite.close()
        target = await PostgresStore.open(
            config.state.url,
            password=password,
            instance=instance,
            max_pending=config.state.max_pending,
            lease_seconds=config.state.lease_seconds,
            statement_timeout=config.state.statement_timeout_seconds,
            lock_timeout=config.state.lock_timeout_seconds,
            idle_in_transaction_timeout=config.state.idle_in_transaction_timeout_seconds,
        )
        try:
            await target.load(dump, force=args.force)
        finally:
            await target.close()
        return (
            f"imported {len(dump.queue)} pending ids, {len(dump.finished)} finished ids, {len(dump.ledger)} ledger "
            f"series and the checkpoints of {len(dump.files)} file sources (as instance {instance!r}) into "
            f"{target.description}"
        )

    try:
        print(asyncio.run(copy()))
    except StateError as err:
        log.error("%s", err)
        return 1
    return 0


def cmd_fake_api(args: argparse.Namespace) -> int:
    from exporter.simulate.api import Faults, SimConfig, SimulatedZenMux, serve

    try:
        ratios: dict[str, Any] = {name: float(value) for name, value in (f.split("=", 1) for f in args.fault)}
        faults = Faults(**ratios)
    except (ValueError, TypeError) as err:
        print(f"bad --fault {' '.join(args.fault)!r}: use KIND=RATIO (a ratio in [0, 1]): {err}", file=sys.stderr)
        return 2
    sim_config = SimConfig(
        billing_delay_seconds=args.billing_delay,
        not_ready_mode=args.not_ready_mode,
        envelope=args.envelope,
        rate_limit_per_second=args.rate_limit,
        faults=faults,
    )
    configure_logging(LogConfig(), [])

    async def main() -> None:
        host, port = host_port(args.listen)
        server = await serve(SimulatedZenMux(sim_config), host, port)
        print(f"simulated ZenMux API on http://{host}:{server.port} (keys: sk-ai-v1-demo, sk-ss-v1-demo, "
              "sk-mg-v1-demo)", flush=True)
        stop = asyncio.Event()
        _stop_on_signals(stop)
        await stop.wait()
        await server.close()

    asyncio.run(main())
    return 0


def demo_config(api_url: str, directory: Path, listen: str) -> Config:
    """The embedded default: every part of the product, on loopback, with a billing delay of seconds."""
    return parse_config(
        {
            "zenmux": {"base_url": api_url, "api_key": "sk-ai-v1-demo", "concurrency": 8},
            "resolve": {"billing_delay_seconds": 3, "retry_initial_seconds": 1, "retry_max_seconds": 4},
            "sources": [
                {
                    "type": "file",
                    "name": "app-log",
                    "path": str(directory / "app.log"),
                    "format": "json",
                    "start_at": "beginning",
                    "labels": {"feature": "feature"},
                },
                {"type": "udp", "name": "udp", "listen": "127.0.0.1:0", "format": "plain"},
            ],
            "state": {"path": str(directory / "state.db")},
            "metrics": {"listen": listen, "extra_labels": ["feature"]},
            "shutdown": {"drain_seconds": 0},
            "reconcile": {"management_api_key": "sk-mg-v1-demo", "poll_interval_seconds": 10},
        },
        "demo",
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from exporter.app import Exporter
    from exporter.simulate.api import SimConfig, SimulatedZenMux, serve
    from exporter.simulate.traffic import generate_traffic

    if args.fleet:
        from exporter.config import url_passwords
        from exporter.fleetdemo import run_fleet_demo

        configure_logging(LogConfig(), url_passwords(args.fleet))
        return asyncio.run(run_fleet_demo(args.fleet, args.listen, args.rate))
    configure_logging(LogConfig(), [])

    async def main() -> int:
        with tempfile.TemporaryDirectory(prefix="zenmux-demo-") as tmp:
            directory = Path(tmp)
            api = await serve(SimulatedZenMux(SimConfig(billing_delay_seconds=2.0)), "127.0.0.1", 0)
            api_url = f"http://127.0.0.1:{api.port}"
            exporter = Exporter(demo_config(api_url, directory, args.listen), api_key="sk-ai-v1-demo")
            try:
                await exporter.start()
            except OSError as err:
                print(f"cannot listen on {args.listen}: {err.strerror}; try --listen 127.0.0.1:0", file=sys.stderr)
                await api.close()
                return 1
            host, _ = host_port(args.listen)
            stop = asyncio.Event()
            _stop_on_signals(stop)
            traffic = asyncio.create_task(
                generate_traffic(
                    api_url,
                    "sk-ai-v1-demo",
                    rate_per_second=args.rate,
                    stop=stop,
                    log_path=directory / "app.log",
                    udp_target=("127.0.0.1", exporter.udp_sources[0].port),
                )
            )
            print(
                f"\nzenmux-exporter demo\n"
                f"  metrics:        http://{host}:{exporter.metrics_port}/metrics\n"
                f"  simulated API:  {api_url}  (ground truth: {api_url}/_sim/records)\n"
                f"  app log:        {directory / 'app.log'}  (and UDP 127.0.0.1:{exporter.udp_sources[0].port})\n"
                f"Generations are billed after ~2 s; cost and tokens by model appear on /metrics within seconds.\n"
                f"Try: curl -s http://{host}:{exporter.metrics_port}/metrics | grep zenmux_cost_usd_total\n"
                f"Ctrl-C stops everything.\n",
                flush=True,
            )
            await stop.wait()
            await traffic
            report = await exporter.stop(drain_seconds=0)
            await api.close()
        # The simulated API's records end with it, so nothing pending could be resolved by a later run.
        print(f"demo stopped; {directory} deleted with its {report.left_pending} pending ids", flush=True)
        return 0

    return asyncio.run(main())


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="zenmux-exporter", description=__doc__)
    top.add_argument("--version", action="version", version=f"zenmux-exporter {__version__}")
    sub = top.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the exporter")
    run.add_argument("--config", required=True, type=Path)
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a config file and print it, secrets redacted")
    check.add_argument("--config", required=True, type=Path)
    check.set_defaults(func=cmd_check_config)

    lookup = sub.add_parser("lookup", help="look one generation id up and print the parsed result")
    lookup.add_argument("--config", required=True, type=Path)
    lookup.add_argument("id")
    lookup.set_defaults(func=cmd_lookup)

    rec = sub.add_parser("reconcile", help="print one UTC day's audit: ZenMux's account cost against the ledger")
    rec.add_argument("--config", required=True, type=Path)
    rec.add_argument("--day", required=True, help="the UTC day, YYYY-MM-DD")
    rec.set_defaults(func=cmd_reconcile)

    importer = sub.add_parser(
        "import-state", help="copy a sidecar's SQLite state into the fleet's PostgreSQL state (state.url)"
    )
    importer.add_argument("--config", required=True, type=Path, help="the fleet's config (names state.url)")
    importer.add_argument("--from", dest="source", required=True, type=Path, help="the sidecar's state.db")
    importer.add_argument("--instance", default="", help="whose file positions these are (default: state.instance, "
                          "$HOSTNAME or the host name): the ingest process that continues the files")
    importer.add_argument("--force", action="store_true",
                          help="import even into a non-empty ledger: the counters are added (merging sidecars)")
    importer.set_defaults(func=cmd_import_state)

    fake = sub.add_parser("fake-api", help="serve the simulated ZenMux API")
    fake.add_argument("--listen", default="127.0.0.1:8990")
    fake.add_argument("--billing-delay", type=float, default=3.0, help="seconds until a record is billed")
    fake.add_argument("--not-ready-mode", choices=["404", "partial"], default="404")
    fake.add_argument("--envelope", choices=["bare", "data", "success"], default="bare")
    fake.add_argument("--rate-limit", type=float, default=None, help="requests per second before 429")
    fake.add_argument("--fault", action="append", default=[], metavar="KIND=RATIO",
                      help="e.g. server_error=0.1, slow=0.05, malformed=0.01, reset=0.01")
    fake.set_defaults(func=cmd_fake_api)

    demo = sub.add_parser("demo", help="simulated API + traffic + exporter, all on loopback")
    demo.add_argument("--listen", default="127.0.0.1:9466", help="/metrics (with --fleet: the exposer's)")
    demo.add_argument("--fleet", metavar="POSTGRESQL_URL", default="",
                      help="fleet mode on this database: an ingest process, two resolvers and an exposer")
    demo.add_argument("--rate", type=float, default=5.0, help="generations per second")
    demo.set_defaults(func=cmd_demo)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
