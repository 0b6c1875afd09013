"""``bench/run [--quick] [--json FILE] [--only GROUP...]``: every row against its baseline, in one run.

Prints one table (row, value, baseline, ratio, goal, spread, runs) and numbered notes that say what each
baseline is and how the row was measured. Exit status 1 when a row could not be measured; rows that are
"n/a" for a documented reason (the CLI or another engineer's row module has not landed) do not count.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import cli_rows, engine_rows, foreign, hook_rows, hugepage_rows, isolation_rows, slowpath_rows
from bench.common import REPO, VENV_PYTHON, fs_type
from bench.stats import FAILED, NOT_AVAILABLE, OK, BenchError, Row

# group: ((runs, warm-up) full, (runs, warm-up) --quick)
RUNS = {
    "hook": ((100, 5), (15, 2)),
    "engine": ((30, 3), (5, 1)),
    "slowpath": ((30, 3), (4, 1)),
    "isolation": ((30, 3), (5, 1)),
    "hugepages": ((20, 2), (3, 1)),
    "cli": ((15, 2), (3, 1)),
    "libvirt": ((5, 0), (1, 0)),
    "lab": ((3, 0), (1, 0)),
    "agent": ((3, 0), (1, 0)),
}
GROUPS = tuple(RUNS)
POLICY = ("exit status: 1 if any row shows FAILED (a row of this harness, or of a row module that is present, "
          "could not be measured); rows shown n/a are documented absences (the CLI has not landed, "
          "bench/libvirt_rows.py or bench/lab_rows.py is absent, or a row module skipped with a reason) and do "
          "not count; missed goals are reported, not failed")


def _measure_group(group: str, scratch: Path, runs: int, warmup: int) -> list[Row]:
    measures: dict[str, Callable[[], list[Row]]] = {
        "hook": lambda: hook_rows.measure(scratch, runs, warmup),
        "engine": lambda: engine_rows.measure(scratch, runs, warmup),
        "slowpath": lambda: slowpath_rows.measure(scratch, runs, warmup),
        "isolation": lambda: isolation_rows.measure(scratch, runs, warmup),
        "hugepages": lambda: hugepage_rows.measure(scratch, runs, warmup),
        "cli": lambda: cli_rows.measure(scratch, runs, warmup),
        "libvirt": lambda: foreign.measure("libvirt", scratch, runs),
        "lab": lambda: foreign.measure("lab", scratch, runs),
        "agent": lambda: foreign.measure("agent", scratch, runs),
    }
    try:
        return measures[group]()
    except cli_rows.NotAvailable as why:
        return [Row(group, "cli: janus-hooks check / devices (200 PCI devices)", status=NOT_AVAILABLE, note=str(why))]
    except BenchError as err:
        return [Row(group, f"{group}: all rows", status=FAILED, note=str(err))]
    except Exception as err:  # noqa: BLE001 - a bug in one row must not hide the others
        traceback.print_exc(file=sys.stderr)
        return [Row(group, f"{group}: all rows", status=FAILED, note=f"harness error: {err!r}")]


def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return ""
    text = f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
    return f"{text} {unit}".strip()


def _goal(row: Row) -> str:
    if not row.goal:
        return "-"
    return f"{row.goal} {'ok' if row.goal_met else 'MISSED' if row.goal_met is False else ''}".strip()


def render_table(rows: list[Row]) -> str:
    header = ("#", "row", "value", "baseline", "ratio", "goal", "spread", "runs")
    lines = []
    for i, row in enumerate(rows, 1):
        if row.status == OK:
            cells = (str(i), row.name, _num(row.value, row.unit), _num(row.baseline, row.unit),
                     f"{row.ratio:.2f}x" if row.ratio is not None else "-", _goal(row), row.spread or "-",
                     str(row.runs) if row.runs else "-")
        else:
            cells = (str(i), row.name, row.status, "", "", "", "", "")
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines, strict=True)]
    fmt = "  ".join(f"{{:{'>' if i in (0, 2, 3, 4, 7) else '<'}{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*cells).rstrip() for cells in lines]
    return "\n".join(out)


def render_notes(rows: list[Row]) -> str:
    out = []
    for i, row in enumerate(rows, 1):
        text = row.note
        if row.status == OK and row.baseline_label:
            text = f"baseline: {row.baseline_label}; {text}"
        out.append(f"[{i}] {text}")
    return "\n".join(out)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,  # noqa: S603,S607
                              check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def _meta(scratch: Path, quick: bool) -> dict[str, object]:
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "janus_hooks", "hooks")
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "--short", "HEAD") + (" + uncommitted changes in janus_hooks/ or hooks/"
                                                          if dirty else ""),
        "kernel": platform.release(),
        "python": f"{VENV_PYTHON} ({platform.python_version()})",
        "cpus": os.cpu_count(),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "scratch_fs": fs_type(scratch),
        "mode": "quick" if quick else "full",
        "euid": os.geteuid(),
    }


def _mounts_below(path: Path) -> list[str]:
    prefix = os.path.realpath(path).rstrip("/") + "/"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    return [line.split()[4] for line in lines if line.split()[4].startswith(prefix)]


def remove_scratch(scratch: Path) -> bool:
    """Remove the scratch tree, unless something is still mounted below it (then it would reach the real
    /sys or /proc): refuse and say so."""
    mounted = _mounts_below(scratch)
    if mounted:
        print(f"bench: NOT removing {scratch}: still mounted below it: {', '.join(mounted)}", file=sys.stderr)
        return False
    shutil.rmtree(scratch, ignore_errors=True)
    return not scratch.exists()


def _terminate(signum: int, frame: object) -> None:
    # Turn SIGTERM into an exception so that every finally (pool restore, scratch removal) runs.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few runs per row: a smoke test, not a record")
    parser.add_argument("--json", metavar="FILE", help="also write every row, with its raw figures, as JSON")
    parser.add_argument("--only", nargs="+", metavar="ROW", choices=GROUPS,
                        help=f"measure only these row groups: {', '.join(GROUPS)}")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    groups = [g for g in GROUPS if not args.only or g in args.only]

    scratch = Path(tempfile.mkdtemp(prefix="janus-bench-"))
    rows: list[Row] = []
    try:
        meta = _meta(scratch, args.quick)
        print("janus-hooks bench: " + "; ".join(f"{k} {v}" for k, v in meta.items()), flush=True)
        for group in groups:
            runs, warmup = RUNS[group][1 if args.quick else 0]
            print(f"bench: measuring {group} ({runs} runs + {warmup} warm-up) ...", file=sys.stderr, flush=True)
            start = time.monotonic()
            group_rows = _measure_group(group, scratch, runs, warmup)
            print(f"bench: {group} took {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)
            rows += group_rows
    finally:
        removed = remove_scratch(scratch)
    failed = [r for r in rows if r.status == FAILED]
    status = 1 if failed or not removed else 0
    meta["load_average_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print()
    print(render_table(rows))
    print()
    print(render_notes(rows))
    print()
    print(POLICY + f". This run: {len(failed)} FAILED, "
          f"{sum(r.status == NOT_AVAILABLE for r in rows)} n/a -> exit {status}.")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": [r.to_json() for r in rows],
                                               "policy": POLICY, "exit_status": status}, indent=1) + "\n")
    return status
