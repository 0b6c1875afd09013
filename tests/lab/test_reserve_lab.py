"""`janus-hooks reserve` across reboots of the desktop lab (tests/lab/reserve_lab.py): booted with the
reservation in place, the second GPU is on vfio-pci before any host driver touched it (udevd applies the
rule at coldplug; the kernel log shows no bochs-drm probe of it), a hot-added reserved GPU goes back to
vfio-pci through the agent, and after `unreserve` the next boot gives the GPU to bochs-drm again."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lab import new_out_dir, run_in_lab  # noqa: E402

pytestmark = pytest.mark.lab

FRESH = ("/etc/libvirt/hooks", "/etc/libvirt/qemu", "/etc/janus-hooks", "/var/lib/janus-hooks", "/var/log/janus-hooks")
# What a host keeps on its disk between boots and reserve/unreserve change.
PERSISTENT = ("/etc/udev/rules.d", "/etc/modprobe.d")
SECOND_GPU, FIRST_GPU = "0000:00:06.0", "0000:00:02.0"


def _boot(phase: str, state: Path, timeout: float) -> dict:
    result = run_in_lab([".venv/bin/python", "tests/lab/reserve_lab.py", phase], timeout=timeout, fresh=FRESH,
                        flavour="desktop", state=state, persistent=PERSISTENT, gpu_driver_by_udev=True)
    path = result.out_dir / f"reserve-{phase}.json"
    assert path.exists(), (f"boot '{phase}' wrote no results (status {result.returncode}: {result.message}); "
                           f"console in {result.out_dir}/console.log:\n{result.output[-3000:]}")
    data = json.loads(path.read_text())
    data["_output"] = result.output[-3000:]
    return data


def test_a_reserved_gpu_is_on_vfio_from_boot_and_back_on_its_driver_after_unreserve():
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: run scripts/bootstrap")
    state = new_out_dir()  # the lab host's disk: kept between the three boots below

    first = _boot("reserve", state, 900)
    assert first["devices"][SECOND_GPU]["driver"] == "bochs-drm", \
        f"before the reservation udevd should give {SECOND_GPU} to bochs-drm: {first['devices']}"
    assert first["reserve"]["returncode"] == 0, first["reserve"]
    assert "reserved for VMs from the next boot on" in first["reserve"]["stdout"], first["reserve"]
    assert first["files_at_end"]["/etc/udev/rules.d/40-janus-hooks-reserve.rules"], first["files_at_end"]
    assert (state / "etc/udev/rules.d/40-janus-hooks-reserve.rules").exists(), "the rule did not reach the state"

    second = _boot("reserved", state, 1200)
    gpu = second["devices"][SECOND_GPU]
    assert gpu == {"driver": "vfio-pci", "override": "vfio-pci"}, \
        f"booted with the reservation, {SECOND_GPU} is {gpu}, not on vfio-pci:\n{second['_output']}"
    touched = [line for line in second["kernel"] if "bochs" in line or "drm" in line]
    assert not touched, f"a host driver touched {SECOND_GPU} during the boot with the reservation: {touched}"
    assert second["devices"][FIRST_GPU]["driver"] == "bochs-drm", second["devices"]
    assert f"{SECOND_GPU[:-2]}" in second["devices_cli"]["stdout"] and "reserved for VMs" in \
        second["devices_cli"]["stdout"], second["devices_cli"]
    # Hotplug with the agent following udev: removed, found again by a rescan, back on vfio-pci.
    assert "hotplug_s" in second, second.get("hotplug_error") or second.get("agent_lines")
    assert second["hotplug_devices"][SECOND_GPU]["driver"] == "vfio-pci", \
        (second["hotplug_devices"], second["agent_lines"], second["hotplug_kernel"])
    assert any(f"devices: {SECOND_GPU} added, a function of GPU {SECOND_GPU[:-2]} reserved for VMs" in line
               for line in second["agent_lines"]), second["agent_lines"]
    assert f"{SECOND_GPU} removed: GPU left the PCI bus" in second["status"], second["status"]
    assert f"{SECOND_GPU} added: reserved for VMs: " in second["status"], second["status"]
    assert second["agent_exit"] == 0, second["agent_lines"]
    assert second["unreserve"]["returncode"] == 0, second["unreserve"]
    assert not (state / "etc/udev/rules.d/40-janus-hooks-reserve.rules").exists(), "unreserve left the rule"

    third = _boot("unreserved", state, 900)
    assert third["devices"][SECOND_GPU] == {"driver": "bochs-drm", "override": "(null)"}, \
        f"after unreserve the next boot should give {SECOND_GPU} to bochs-drm: {third['devices']}"
    assert not any(third["files_at_boot"].values()), third["files_at_boot"]
