"""The event agent in the real-kernel lab (tests/lab/agent_lab.py): real uevents (the kernel source in the
runit flavour, udevd's in the desktop flavour), a real host driver binding the GPU under a VM, the rollback
when that VM's QEMU dies with nobody to call `release end`; on the systemd desktop, the installed unit
(Type=notify, watchdog, hardening) and a refused start shown on the user's session bus."""

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

FRESH = ("/etc/libvirt/hooks", "/etc/libvirt/qemu", "/etc/janus-hooks", "/var/lib/janus-hooks",
         "/var/log/janus-hooks")


def _boot(flavour: str, timeout: float) -> dict:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: run scripts/bootstrap")
    result = run_in_lab([".venv/bin/python", "tests/lab/agent_lab.py"], timeout=timeout, fresh=FRESH, flavour=flavour)
    path = result.out_dir / f"agent-{flavour}.json"
    assert path.exists(), f"the scenario wrote no results ({result.message}):\n{result.output[-4000:]}"
    data = json.loads(path.read_text())
    data["_output"] = result.output[-4000:]
    return data


def _assert_reported_and_rolled_back(data: dict, host_driver: str = "bochs-drm") -> None:
    gpu = data["gpu"]
    assert data["driver_before"] == host_driver and data["driver_switched"] == "vfio-pci", data["_output"]
    assert "reported_s" in data, data.get("report_error", data["_output"])
    assert f"WARNING: {gpu} is bound to host driver {host_driver} while VM lab-agent runs" in data["status"]
    assert "rollback_s" in data, data.get("rollback_error", data["_output"])
    assert any("VM lab-agent: rolled back (its QEMU exited while libvirt is away)" in line
               for line in data["agent_lines"]), data["agent_lines"]
    assert data["driver_after"] == host_driver


def test_runit_lab_kernel_uevents_reported_and_rollback_on_qemu_death():
    data = _boot("runit", 600)
    assert data["udev_source"] and "from the kernel source" in data["udev_source"]
    _assert_reported_and_rolled_back(data)
    assert data["agent_exit"] == 0


def test_desktop_lab_unit_udev_source_and_the_notification():
    data = _boot("desktop", 1500)
    unit = data["unit"]
    assert unit["Type"] == "notify" and unit["ActiveState"] == "active" and unit["SubState"] == "running", unit
    assert unit["WatchdogUSec"] in ("1min", "60s", "60000000"), unit
    assert data["udev_source"] and "from the udev source" in data["udev_source"]
    assert "refused" in data, data.get("notify_error")
    refused = data["refused"]
    assert refused["returncode"] == 1
    assert data["failure_record"]["reason"] == refused["stderr"]
    assert data["notifications"], data.get("notify_error") or data["agent_desktop_lines"]
    note = data["notifications"][0]
    assert note["app"] == "janus-hooks" and note["summary"] == "VM lab-broken did not start"
    assert note["body"] == refused["stderr"]
    _assert_reported_and_rolled_back(data)
    assert "ActiveState=inactive" in data["unit_after_stop"] and "Result=success" in data["unit_after_stop"]
