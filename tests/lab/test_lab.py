"""The real-kernel lab, run once for this module: janus-hooks switches a real GPU stack under libvirt.

Every assertion is on what the scenario read from the lab's real /sys, /proc and processes.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lab import run_in_lab  # noqa: E402

pytestmark = pytest.mark.lab

# Nothing of this machine's libvirt or janus-hooks state may leak into the lab's view of its root.
FRESH = ("/etc/libvirt/hooks", "/etc/libvirt/qemu", "/etc/janus-hooks", "/var/lib/janus-hooks", "/etc/udev/rules.d",
         "/var/log/janus-hooks")


@pytest.fixture(scope="module")
def lab_results():
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: run scripts/bootstrap")
    result = run_in_lab([".venv/bin/python", "tests/lab/scenario.py", "all"], timeout=480, fresh=FRESH)
    path = result.out_dir / "all.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data["_lab"] = {"returncode": result.returncode, "message": result.message, "output": result.output[-4000:],
                    "boot_seconds": result.boot_seconds, "total_seconds": result.total_seconds}
    return data


def _ok(lab_results, key):
    lab = lab_results["_lab"]
    assert key in lab_results, f"scenario {key} did not run: {lab['message']}\n{lab['output']}"
    return lab_results[key]


DESKTOP = {"gpu_driver": "bochs-drm", "fbcon_bound": True, "bochs_loaded": True, "vfio_group_node": False,
           "card_holders": ["Xorg"], "xorg_holds_card": True, "hugepages_total": 0, "hugepages_free": 0,
           "journal_open": False, "vfio_modules": []}


def test_lab_started_from_a_desktop(lab_results):
    assert _ok(lab_results, "switch")["before"] == DESKTOP


def test_vm_start_switches_the_real_gpu_to_vfio(lab_results):
    switch = _ok(lab_results, "switch")
    during = switch["during"]
    assert during["gpu_driver"] == "vfio-pci"
    assert during["vfio_group_node"] is True
    assert during["bochs_loaded"] is False
    assert during["xorg_holds_card"] is False and during["card_holders"] == []
    # fbcon's vtconsole is gone with the last framebuffer (or at least unbound).
    assert during["fbcon_bound"] in (None, False)
    assert switch["nested_qemu_has_gpu"] is True
    assert during["hugepages_total"] == 32 and switch["qemu_uses_hugepages"] is True
    kinds = [s["kind"] for s in switch["steps"]]
    assert kinds == ["allocate-hugepages", "display-commands", "wait-released", "unbind-vtconsole",
                     "unload-module", "load-module", "load-module", "bind-vfio"]


def test_vm_destroy_gives_the_desktop_back(lab_results):
    assert _ok(lab_results, "switch")["after"] == DESKTOP


def test_start_refused_while_a_process_holds_the_card(lab_results):
    refuse = _ok(lab_results, "refuse")
    assert "janus-hooks: VM 'lab-gpu': wait until no process holds /dev/dri/card0: " \
           f"pid {refuse['holder_pid']} (python" in refuse["error"]
    assert "still holds the GPU" in refuse["error"]
    assert refuse["after"] == DESKTOP


@pytest.mark.parametrize("kill_at", ["unload-module", "bind-vfio"])
def test_kill_9_mid_switch_then_rollback(lab_results, kill_at):
    crash = _ok(lab_results, f"crash-{kill_at}")
    assert crash["hook_status"] == -9 and crash["killed_at"] == kill_at
    assert crash["crashed"]["journal_open"] is True
    assert crash["crashed"]["xorg_holds_card"] is False  # really half-way: the desktop was gone
    assert crash["rollback_status"] == 0, crash["rollback_output"]
    assert crash["after"] == DESKTOP


def test_cli_reads_the_real_host(lab_results):
    cli = _ok(lab_results, "cli")
    gpu = cli["check_gpu"]
    assert gpu["driver"] == "bochs-drm" and gpu["iommu_group"] == 2 and gpu["boot_vga"] is True
    assert gpu["ready"] == {"single-gpu": True, "passthrough": False}
    assert "drives the host display" in gpu["refusals"]["passthrough"]
    devices = cli["devices_gpu"]
    assert [f["address"] for f in devices["functions"]] == ["0000:00:02.0"]
    assert devices["iommu_group_members"] == [] or all(m["bridge"] or m["same_card"]
                                                       for m in devices["iommu_group_members"])
    assert [(u["command"], u["node"]) for u in devices["used_by"]] == [("Xorg", "/dev/dri/card0")]
    assert cli["plan_status"] == 0 and cli["plan_refusal"] is None
    assert cli["plan_kinds"] == ["allocate-hugepages", "display-commands", "wait-released", "unbind-vtconsole",
                                 "unload-module", "load-module", "load-module", "bind-vfio"]


def test_a_command_that_falls_silent_ends_as_stalled_and_one_that_speaks_does_not():
    # Lines 15 s apart are progress; then 120 s of silence with the run's timeout far away.
    script = "for i in 1 2 3; do echo step $i; sleep 15; done; echo last words; sleep 120; echo never"
    silent = run_in_lab(["bash", "-c", script], timeout=300, stall_after=25)
    assert silent.stalled and silent.returncode == 124, silent
    assert "no console output for 25 s after 'last words'" in silent.message, silent.message
    assert "step 3" in silent.output and "never" not in silent.output
    assert silent.total_seconds < 240, silent.total_seconds
    speaking = run_in_lab(["bash", "-c", "for i in 1 2 3; do echo step $i; sleep 15; done"], timeout=300,
                          stall_after=25)
    assert (speaking.stalled, speaking.returncode, speaking.message) == (False, 0, ""), speaking
