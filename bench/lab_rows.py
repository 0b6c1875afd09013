"""Rows measured in the real-kernel lab: the single-GPU switch, janus-hooks against the guides' script
(runit flavour: measure_lab_switch; desktop flavour: measure_desktop_switch, also against the floor).

Both sides run in the same lab boot, alternating, from real timestamps taken inside the lab
(tests/lab/scenario.py bench): janus-hooks' installed hook (`prepare begin` until the GPU is on vfio-pci,
`release end` until the display server holds the GPU again) and bench/guide-switch.sh, the way popular
guides script it (stop the display manager, sleep 2, unbind console and framebuffer, sleep 2, unload the
driver, bind vfio-pci; and back). The lab runs under TCG: absolute times are slow, the ratio is the point.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FRESH = ("/etc/libvirt/hooks", "/etc/libvirt/qemu", "/etc/janus-hooks", "/var/lib/janus-hooks",
         "/var/log/janus-hooks")


def _spread(samples: list[float]) -> float:
    if len(samples) < 2:
        return 0.0
    return (max(samples) - min(samples)) / 2 / statistics.median(samples) * 100


def measure_lab_switch(runs: int = 3) -> list[dict]:
    sys.path.insert(0, str(REPO / "tests" / "lab"))
    from lab import run_in_lab

    runs = max(2, min(runs, 5))
    result = run_in_lab([".venv/bin/python", "tests/lab/scenario.py", "bench", "--runs", str(runs)],
                        timeout=120 + 40 * runs, fresh=FRESH)
    path = result.out_dir / "bench.json"
    if result.returncode != 0 or not path.exists():
        raise RuntimeError(f"lab bench failed ({result.returncode}): {result.message or result.output[-500:]}")
    times = json.loads(path.read_text())["bench"]
    rows = []
    for side, label in (("start", "GPU to vfio-pci"), ("stop", "GPU back to the desktop")):
        janus, guide = times[f"janus_{side}"], times[f"guide_{side}"]
        value, baseline = statistics.median(janus) * 1000, statistics.median(guide) * 1000
        rows.append({
            "name": f"lab: {label}, janus-hooks hook vs guide script (real kernel, TCG)",
            "value": value, "baseline": baseline, "ratio": value / baseline, "unit": "ms",
            "spread": f"+-{_spread(janus):.0f}% / +-{_spread(guide):.0f}%", "runs": len(janus),
            "note": "guide: " + ("stop DM, sleep 2, unbind console+fb, sleep 2, unload, bind vfio" if side == "start"
                                 else "unbind vfio, reload driver, rebind console, start DM (no sleeps)"),
            "baseline_label": "guide-switch.sh",
        })
    return rows


def measure_desktop_switch(runs: int = 3) -> list[dict]:
    """The desktop lab (systemd, logind, greetd + weston, PipeWire on the GPU's audio), one boot
    (tests/lab/desktop.py bench): start requested -> both functions on vfio-pci, and destroy -> a new
    graphical session holds the card; janus-hooks' hook against the guides' script and against the floor."""
    sys.path.insert(0, str(REPO / "tests" / "lab"))
    from lab import run_in_lab

    runs = max(2, min(runs, 5))
    # janus-hooks install writes a udev rule: the machine's own rules directory must not show through.
    result = run_in_lab([".venv/bin/python", "tests/lab/desktop.py", "bench", "--runs", str(runs)],
                        timeout=400 + 150 * runs, fresh=(*FRESH, "/etc/udev/rules.d"), flavour="desktop")
    path = result.out_dir / "desktop-bench.json"
    if result.returncode != 0 or not path.exists():
        raise RuntimeError(f"desktop lab bench failed ({result.returncode}): {result.message or result.output[-500:]}")
    bench = json.loads(path.read_text())["bench"]
    times, failures = bench["times"], bench.get("failures", {})
    imports = f"{min(bench['imports_ms']):.0f} ms" if bench.get("imports_ms") else "n/a"
    floor_ms = f"{min(bench['interpreter_ms']):.0f} ms" if bench.get("interpreter_ms") else "n/a"
    steps = bench.get("janus_steps") or []
    step_ms = sum(s["ms"] or 0 for s in steps[-1]) if steps else None
    dominated = (f"in the lab: python3 -I -S -c pass {floor_ms}, the slow path's imports {imports}"
                 + (f", janus' journaled steps {step_ms:.0f} ms" if step_ms is not None else ""))
    rows = []
    for way, label, goal in (("start", "start requested -> GPU and audio on vfio-pci", 0.5),
                             ("back", "destroy -> a new session holds the card", 1.0)):
        janus = times.get(f"janus_{way}") or []
        for base, base_label, base_note in (
            ("guide", "guide-switch-desktop.sh", "the guides' script (systemctl stop display-manager, sleeps)"),
            ("floor", "floor-switch-desktop.sh", "the same operations with no sleeps and no checks"),
        ):
            other = times.get(f"{base}_{way}") or []
            baseline = statistics.median(other) * 1000 if other else None
            row = {
                "name": f"desktop lab: {label}, janus-hooks vs {base} (real kernel, TCG)",
                "value": statistics.median(janus) * 1000 if janus else None,
                "baseline": baseline, "unit": "ms", "runs": len(janus),
                "spread": f"+-{_spread(janus):.0f}% / +-{_spread(other):.0f}%",
                "note": f"{base}: {base_note}; {dominated}",
                "baseline_label": base_label,
            }
            if row["value"] is not None and baseline:
                row["ratio"] = row["value"] / baseline
                if base == "guide":
                    row["goal"], row["goal_met"] = f"<= {goal}x", row["ratio"] <= goal
            if "janus" in failures:
                row["note"] = f"janus-hooks failed: {failures['janus']}; {row['note']}"
            if way == "back":
                for side in ("janus", base):
                    missed = len(bench.get("back_failures", {}).get(side, []))
                    if missed:
                        row["note"] += (f"; {side}: the desktop did not come back {missed} time(s), those runs not "
                                        "counted (the lab's desktop-bench.json shows what it looked like)")
                    incomplete = len(bench.get("left_incomplete", {}).get(side, []))
                    if incomplete:
                        row["note"] += (f"; {side}: the user's application did not come back {incomplete} "
                                        "time(s) (restarted before the next side)")
            if bench.get("aborted"):
                row["note"] += f"; the bench stopped early: {bench['aborted']['error']}"
            rows.append(row)
    return rows


if __name__ == "__main__":
    which = sys.argv[2] if len(sys.argv) > 2 else "runit"
    measure = measure_desktop_switch if which == "desktop" else measure_lab_switch
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 3), indent=1))
