"""Rows measured in the real-kernel lab: the single-GPU switch, janus-hooks against the guides' script.

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


if __name__ == "__main__":
    print(json.dumps(measure_lab_switch(int(sys.argv[1]) if len(sys.argv) > 1 else 3), indent=1))
