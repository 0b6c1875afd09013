"""Rows that other work owns: bench/libvirt_rows.py (real libvirtd) and bench/lab_rows.py (real-kernel lab).

Each function runs in a child process of its own (``python -m bench.foreign MODULE FUNCTION RUNS OUT``) so
that a hang is bounded by a timeout and a crash cannot take the harness down; its process group is killed
on timeout. A module that is absent is "n/a" (it has not landed), which does not fail the run; a module
that is present but cannot produce its row fails it.

Row protocol: the function returns a dict, or a list of dicts, with ``name, value, baseline, ratio, unit,
spread, note``; optional ``runs``, ``goal`` (text) and ``goal_met`` (bool); ``skipped`` (a reason) marks a
row that could not run here for a documented reason (it is shown as n/a and does not fail the run).
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, VENV_PYTHON  # noqa: E402
from bench.stats import FAILED, NOT_AVAILABLE, BenchError, Row  # noqa: E402

SOURCES = {
    # group: (module file, [(function, timeout per run in seconds, fixed timeout)])
    "libvirt": ("libvirt_rows", [("measure_vm_start_stop", 120, 300), ("measure_hugepage_alloc", 60, 300)]),
    "lab": ("lab_rows", [("measure_lab_switch", 240, 600), ("measure_desktop_switch", 300, 900)]),
    "agent": ("agent_rows", [("measure_agent_idle", 40, 300), ("measure_agent_rollback", 120, 300)]),
}


def _to_rows(group: str, function: str, data: Any) -> list[Row]:
    items = data if isinstance(data, list) else [data]
    rows = []
    for item in items:
        if not isinstance(item, dict):
            raise BenchError(f"bench/{SOURCES[group][0]}.py {function}() returned {type(item).__name__}, not a dict")
        row = Row(group, str(item.get("name") or function), unit=str(item.get("unit") or ""),
                  note=str(item.get("note") or ""), spread=str(item.get("spread") or ""))
        for key in ("value", "baseline", "ratio"):
            value = item.get(key)
            setattr(row, key, float(value) if isinstance(value, int | float) else None)
        if row.ratio is None and row.value is not None and row.baseline:
            row.ratio = row.value / row.baseline
        row.runs = item.get("runs") if isinstance(item.get("runs"), int) else None
        row.goal = str(item.get("goal") or "")
        row.goal_met = item.get("goal_met") if isinstance(item.get("goal_met"), bool) else None
        row.baseline_label = str(item.get("baseline_label") or "")
        if item.get("skipped"):
            row.status, row.note = NOT_AVAILABLE, f"not measured ({item['skipped']})"
        elif row.value is None:
            row.status = FAILED
            row.note = f"returned no value; {row.note}".rstrip("; ")
        rows.append(row)
    return rows


def measure(group: str, scratch: Path, runs: int) -> list[Row]:
    module, functions = SOURCES[group]
    if not (REPO / "bench" / f"{module}.py").exists():
        return [Row(group, f"{group}: {fn}", status=NOT_AVAILABLE,
                    note=f"not measured ({group} rows not available: bench/{module}.py is absent)")
                for fn, _, _ in functions]
    rows = []
    for function, per_run, fixed in functions:
        out = scratch / f"{module}.{function}.json"
        timeout = fixed + per_run * runs
        argv = [VENV_PYTHON, "-m", "bench.foreign", module, function, str(runs), str(out)]
        try:
            rows += _to_rows(group, function, _run(argv, out, timeout))
        except BenchError as err:
            rows.append(Row(group, f"{group}: {function}", status=FAILED, note=str(err)))
    return rows


def _run(argv: list[str], out: Path, timeout: float) -> Any:
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,  # noqa: S603
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except BaseException as exc:  # timeout, Ctrl-C, SIGTERM: never leave the child's process group behind
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        if isinstance(exc, subprocess.TimeoutExpired):
            raise BenchError(f"{argv[3]}.{argv[4]} did not finish within {timeout:g} s") from exc
        raise
    if proc.returncode != 0 or not out.exists():
        lines = err.decode(errors="replace").strip().splitlines()
        raise BenchError(f"{argv[3]}.{argv[4]} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    return json.loads(out.read_text())


def _child(module: str, function: str, runs: int, out: Path) -> None:
    import importlib

    fn = getattr(importlib.import_module(f"bench.{module}"), function)
    params = inspect.signature(fn).parameters
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    required = [n for n, p in params.items() if p.default is p.empty and p.kind not in variadic]
    if "runs" in params:
        result = fn(runs=runs)
    elif not required:
        result = fn()
    else:
        raise SystemExit(f"bench/{module}.py {function}() needs {', '.join(required)}; the harness passes only runs=")
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
