"""bench/run runs end to end on its cheap rows and prints a table with ratios. No timing is asserted here:
the benchmark's own output is the record, and this machine's load is nobody's test failure."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHEAP = ("hook", "engine", "slowpath")  # no root, no real kernel state, a few seconds with --quick


def test_quick_cheap_rows_print_a_table_with_ratios(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench/run"), "--quick", "--json", str(out), "--only", *CHEAP],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("#  row"))
    for column in ("row", "value", "baseline", "ratio", "goal", "spread", "runs"):
        assert column in header
    rows = [line for line in lines if re.match(r"^\d+\s+(hook|engine|hook process): ", line)]
    assert len(rows) == 8, proc.stdout
    assert all(re.search(r"\s\d+\.\d+x\s", row) for row in rows), proc.stdout  # every row has its ratio
    assert "exit status" in proc.stdout

    data = json.loads(out.read_text())
    assert data["exit_status"] == 0
    assert {r["group"] for r in data["rows"]} == set(CHEAP)
    for row in data["rows"]:
        assert row["status"] == "ok"
        assert row["value"] > 0 and row["baseline"] > 0 and row["ratio"] > 0
        assert row["runs"] >= 2
    # The engine row counts what it did through the fake kernel (writes) and the counting root (reads).
    engine = next(r for r in data["rows"] if r["name"].startswith("engine: single-GPU + hugepages prepare"))
    assert engine["extra"]["writes"] > 0 and engine["extra"]["io"]["kernel_read"] > 0
    # The hook process row went through the fake kernel and systemd, and read its own imports.
    slow = next(r for r in data["rows"] if r["name"].startswith("hook process: single-GPU + hugepages prepare"))
    assert slow["extra"]["calls"] > 0 and slow["extra"]["seams"] > 0
    assert any(name.startswith("janus_hooks") for name, _ in slow["extra"]["imports"]["top_level"])


def test_only_rejects_unknown_rows() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "bench/run"), "--only", "nonsense"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr


def test_rows_from_other_modules_follow_the_documented_protocol() -> None:
    from bench import foreign

    rows = foreign._to_rows("libvirt", "measure_vm_start_stop", [
        {"name": "libvirt: start+stop", "value": 2, "baseline": 1, "unit": "s", "spread": "+-1%", "note": "n"},
        {"name": "libvirt: hugepages", "skipped": "libvirtd is not installed"},
        {"name": "libvirt: broken", "note": "no value"},
    ])
    assert [r.status for r in rows] == ["ok", "n/a", "FAILED"]
    assert rows[0].ratio == 2.0 and rows[0].group == "libvirt"
    assert "libvirtd is not installed" in rows[1].note


def test_bench_run_from_a_checkout_without_the_venv_says_to_bootstrap(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench/run").write_bytes((REPO / "bench/run").read_bytes())
    proc = subprocess.run(["/usr/bin/python3", str(tmp_path / "bench/run")], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"bench/run: {tmp_path}/.venv/bin/python does not exist: run scripts/bootstrap "
                                   "first (it creates the venv with the project's dependencies), then bench/run again")
