"""`make bench`: runs every workload, prints one table and writes the results as JSON under bench/results/.

    python -m bench [--against REV] [--profile DIR] [--quick] [--only NAME ...] [--repeats N]
                    [--results-dir DIR] [--keep]

With `--against REV` every workload also runs on REV (a git worktree with its own venv, see bench/against.py)
in the same run, interleaved: the workloads whose figure is a median of repetitions (file, resolve) alternate
the order of the two builds from one repetition to the next; the others run once per build, the order
alternating from workload to workload. Each figure is printed for both with their ratio.
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

from bench.against import Build, against, byte_compile, this_build
from bench.common import PROFILE_ENV, Row, median
from bench.workloads import REPEATED_OUTSIDE, THIS_ONLY, WORKLOADS, Context, ensure_mtail

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


def meets(target: str, figure: float, reference: float | None) -> bool | None:
    """Evaluates a target as written in a row: `OP NUMBER`, `OP NUMBERx mtail` (the ratio to the reference),
    `> mtail`, or a bare number (equality), joined by `and`; None when there is no target."""
    if not target or target == "-" or figure != figure:
        return None
    operators = {">=": float.__ge__, "<=": float.__le__, ">": float.__gt__, "<": float.__lt__, "==": float.__eq__}
    verdict = True
    for part in target.split(" and "):
        words = part.split()
        if len(words) == 1:
            words = ["==", words[0]]
        op = operators[words[0]]
        if words[1] == "mtail" or (len(words) == 3 and words[2] == "mtail"):
            if reference is None:
                return None
            if words[1] == "mtail":
                verdict = verdict and op(float(figure), float(reference))
            else:
                verdict = verdict and op(float(figure) / reference, float(words[1].rstrip("x")))
        else:
            verdict = verdict and op(float(figure), float(words[1].replace(",", "")))
    return verdict


def combine(runs: Sequence[Sequence[Row]]) -> list[Row]:
    """Rows of several calls of one workload on one build, merged by name: medians of figures and references."""
    out: dict[str, list[Row]] = {}
    for rows in runs:
        for row in rows:
            out.setdefault(row.workload, []).append(row)
    merged: list[Row] = []
    for name, rows in out.items():
        if len(rows) == 1:
            merged.append(rows[0])
            continue
        figure = median([r.figure for r in rows])
        references = [r.reference for r in rows if r.reference is not None]
        reference = median(references) if references else None
        first = rows[0]
        merged.append(Row(
            name, figure, first.unit, first.target, reference, None if reference is None else figure / reference,
            meets(first.target, figure, reference), [r.figure for r in rows],
            {"runs": [r.details for r in rows], "ratios": [r.ratio for r in rows]},
        ))
    return merged


def _lower_is_better(row: Row) -> bool:
    return row.target.startswith("<") or row.unit in ("ms", "s", "MB", "MiB", "% of a core", "datagrams", "x")


def table(rows: Sequence[Row], theirs: dict[str, Row] | None = None, rev: str = "") -> str:
    header: tuple[str, ...] = ("workload", "figure", "target", "reference", "ratio", "ok")
    if theirs is not None:
        header = ("workload", "this", rev, f"this/{rev}", "target", "reference", "ratio", "ok")
    body: list[tuple[str, ...]] = []
    for row in rows:
        reference = "-" if row.reference is None else f"{_number(row.reference)} (mtail)"
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}x"
        ok = {True: "yes", False: "NO", None: "-"}[row.ok]
        figure = f"{_number(row.figure)} {row.unit}"
        if theirs is None:
            body.append((row.workload, figure, row.target or "-", reference, ratio, ok))
            continue
        other = theirs.get(row.workload)
        if other is None:
            body.append((row.workload, figure, "n/a", "-", row.target or "-", reference, ratio, ok))
            continue
        versus = "-"
        if other.figure and other.figure == other.figure and row.figure == row.figure:
            change = row.figure / other.figure
            better = change < 1 if _lower_is_better(row) else change > 1
            versus = f"{change:.2f}x ({'better' if better else 'worse'})" if change != 1 else "1.00x"
        body.append((row.workload, figure, f"{_number(other.figure)} {other.unit}", versus, row.target or "-",
                     reference, ratio, ok))
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
    parser.add_argument("--against", metavar="REV", help="also run every workload on git revision REV, side by side")
    parser.add_argument("--profile", metavar="DIR", type=Path,
                        help="sample every exporter with py-spy from ready to exit: collapsed stacks in DIR")
    args = parser.parse_args(argv)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        os.environ[PROFILE_ENV] = str(args.profile.resolve())
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C, so every workload stops the processes it started.
        signal.signal(signal.SIGTERM, _interrupt)
    names = args.only or list(WORKLOADS)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if "file" in names:
        ensure_mtail()
    builds: list[Build] = [this_build()]
    if args.against:
        builds.append(against(args.against))
    for build in builds:
        byte_compile(build)
    work = Path(tempfile.mkdtemp(prefix="zenmux-bench-"))
    context = Context(work, args.quick, repeats)
    results: dict[str, list[Row]] = {build.name: [] for build in builds}
    errors: dict[str, str] = {}
    their_errors: dict[str, str] = {}
    started = time.time()
    try:
        for index, name in enumerate(names):
            t0 = time.monotonic()
            runs: dict[str, list[list[Row]]] = {build.name: [] for build in builds}
            outside = name in REPEATED_OUTSIDE and len(builds) > 1
            for repetition in range(repeats if outside else 1):
                flip = (repetition if outside else index) % 2 == 1
                for build in reversed(builds) if flip else builds:
                    if build.name != "this" and name in THIS_ONLY:
                        continue
                    print(f"running {name} on {build.name} ...", file=sys.stderr, flush=True)
                    context.build = build
                    context.repeats = 1 if outside else repeats
                    try:
                        runs[build.name].append(WORKLOADS[name](context))
                    except Exception:
                        # A workload the other revision cannot run (a feature it lacks) is its n/a, not a failure.
                        failed = errors if build.name == "this" else their_errors
                        failed[name] = traceback.format_exc()
                        print(f"{name} on {build.name} failed:\n{failed[name]}", file=sys.stderr, flush=True)
            for build in builds:
                results[build.name].extend(combine(runs[build.name]))
            print(f"  {name}: {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)
    finally:
        if args.keep:
            print(f"scratch kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    rows = results["this"]
    theirs = {row.workload: row for row in results[builds[1].name]} if len(builds) > 1 else None
    print(table(rows, theirs, builds[-1].name))
    result = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": time.time() - started,
        "quick": args.quick,
        "repeats": repeats,
        "machine": machine(),
        "rows": [dataclasses.asdict(row) for row in rows],
        "against": None if theirs is None else {
            "rev": args.against, "commit": str(builds[1].name),
            "rows": [dataclasses.asdict(r) for r in theirs.values()],
            "errors": their_errors,
        },
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
