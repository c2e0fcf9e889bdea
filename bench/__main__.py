"""`make bench`: runs every workload, prints one table and writes the results as JSON under bench/results/.

    python -m bench [--quick] [--only NAME ...] [--repeats N] [--results-dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import Row
from bench.workloads import WORKLOADS, Context, ensure_mtail

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    with contextlib.suppress(OSError):
        memory = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory": memory,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if value != value:  # NaN
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def table(rows: Sequence[Row]) -> str:
    header = ("workload", "figure", "target", "reference", "ratio", "ok")
    body = [
        (
            row.workload,
            f"{_number(row.figure)} {row.unit}",
            row.target or "-",
            "-" if row.reference is None else f"{_number(row.reference)} (mtail)",
            "-" if row.ratio is None else f"{row.ratio:.2f}x",
            {True: "yes", False: "NO", None: "-"}[row.ok],
        )
        for row in rows
    ]
    widths = [max(len(str(line[i])) for line in (header, *body)) for i in range(len(header))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
             for line in (header, *body)]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller inputs, one repetition")
    parser.add_argument("--only", action="append", choices=sorted(WORKLOADS), help="run only this workload")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions per workload (median reported)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, state)")
    args = parser.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C, so every workload stops the processes it started.
        signal.signal(signal.SIGTERM, _interrupt)
    names = args.only or list(WORKLOADS)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if "file" in names:
        ensure_mtail()
    work = Path(tempfile.mkdtemp(prefix="zenmux-bench-"))
    context = Context(work, args.quick, repeats)
    rows: list[Row] = []
    errors: dict[str, str] = {}
    started = time.time()
    try:
        for name in names:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            try:
                rows.extend(WORKLOADS[name](context))
            except Exception:
                errors[name] = traceback.format_exc()
                print(f"{name} failed:\n{errors[name]}", file=sys.stderr, flush=True)
            print(f"  {name}: {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)
    finally:
        if args.keep:
            print(f"scratch kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(table(rows))
    result = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": time.time() - started,
        "quick": args.quick,
        "repeats": repeats,
        "machine": machine(),
        "rows": [dataclasses.asdict(row) for row in rows],
        "errors": errors,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started))
    path = args.results_dir / f"bench-{stamp}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    (args.results_dir / "latest.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"results: {path}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
