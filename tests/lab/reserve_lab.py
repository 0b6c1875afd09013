"""`janus-hooks reserve` across reboots, INSIDE the desktop lab (asserted by tests/lab/test_reserve_lab.py).

Three boots of the desktop flavour share /etc/udev/rules.d and /etc/modprobe.d (the lab's persistent state);
the GPU driver is loaded by the desktop's udevd at coldplug, after the rules in /etc/udev/rules.d:

    reserve     the second GPU (0000:00:06.0) is on bochs-drm; `janus-hooks reserve 0000:00:06.0 --yes`
    reserved    booted with the reservation: 00:06.0 must be on vfio-pci, and the kernel log must show that
                bochs-drm never initialised it; `devices` shows it reserved. Then a hotplug with the event
                agent running (udev source): 00:06.0 removed and found again by a PCI rescan (real uevents;
                bochs-drm, loaded for 00:02.0, probes the new device before udev's rule runs): the agent must
                put it back on vfio-pci and `status` must show both events. Then `janus-hooks unreserve`.
    unreserved  booted without the reservation: 00:06.0 is on bochs-drm again

The lab boots its own busybox initramfs, which initramfs-tools does not build: each boot removes
/etc/initramfs-tools in the lab's overlay first, so reserve/unreserve write the udev rule and the modprobe
softdep only (their initramfs step is covered on the fake host). Results: $LAB_OUT/reserve-<phase>.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import scenario
from scenario import VENV_BIN, pci_driver, run, say, stop_process, wait_for

OUT = scenario.OUT
FIRST_GPU, SECOND_GPU, SLOT = "0000:00:02.0", "0000:00:06.0", "0000:00:06"
RULES = Path("/etc/udev/rules.d/40-janus-hooks-reserve.rules")
SOFTDEP = Path("/etc/modprobe.d/janus-hooks-reserve.conf")
AGENT_LOG = OUT / "agent.log"
CLI = str(VENV_BIN / "janus-hooks")


def override(address: str) -> str | None:
    try:
        return Path(f"/sys/bus/pci/devices/{address}/driver_override").read_text().strip()
    except OSError:
        return None


def kernel_lines(address: str) -> list[str]:
    """What the kernel logged about ``address`` since boot (a host driver's probe names the device)."""
    return [line for line in run(["dmesg"]).stdout.splitlines() if address in line]


def devices() -> dict:
    return {a: {"driver": pci_driver(a), "override": override(a)} for a in (FIRST_GPU, SECOND_GPU)}


def without_initramfs_tools() -> None:
    shutil.rmtree("/etc/initramfs-tools", ignore_errors=True)


def cli(*args: str) -> dict:
    proc = run([CLI, *args], timeout=300, check=False)
    return {"argv": list(args), "returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


def files() -> dict:
    return {str(p): p.read_text() if p.exists() else None for p in (RULES, SOFTDEP)}


def hotplug(result: dict) -> None:
    """Remove the reserved GPU from the bus and find it again, with the agent following udev's events."""
    for private in ("/var/lib/janus-hooks", "/var/log/janus-hooks"):  # fresh tmpfs: 0755, as janus-hooks refuses
        os.chmod(private, 0o700)
    log = AGENT_LOG.open("w")
    agent = subprocess.Popen([CLI, "agent", "--no-libvirt", "--udev-source", "udev"], stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def logged(text: str) -> bool:
        return text in AGENT_LOG.read_text()

    try:
        wait_for(lambda: logged("agent: ready"), 180, "the agent to be ready")
        Path(f"/sys/bus/pci/devices/{SECOND_GPU}/remove").write_text("1")
        wait_for(lambda: not Path(f"/sys/bus/pci/devices/{SECOND_GPU}").exists(), 30, f"{SECOND_GPU} to go")
        wait_for(lambda: logged(f"GPU {SECOND_GPU} remove"), 60, "the agent to see the GPU go")
        rescan = time.monotonic()
        Path("/sys/bus/pci/rescan").write_text("1")
        wait_for(lambda: Path(f"/sys/bus/pci/devices/{SECOND_GPU}").exists(), 30, f"{SECOND_GPU} to come back")
        try:
            wait_for(lambda: logged(f"devices: {SECOND_GPU} added, a function of GPU {SLOT} reserved for VMs")
                     or logged(f"devices: reserved GPU {SLOT}:"), 90, "the agent to handle the reserved GPU")
            result["hotplug_s"] = time.monotonic() - rescan
        except SystemExit as err:
            result["hotplug_error"] = str(err)
        result["hotplug_devices"] = devices()
        result["hotplug_kernel"] = kernel_lines(SECOND_GPU)[-10:]
        result["status"] = run([CLI, "status"], check=False).stdout
    finally:
        result["agent_exit"] = stop_process(agent)
        result["agent_lines"] = [line for line in AGENT_LOG.read_text().splitlines() if "devices:" in line][-20:]


def main(phase: str) -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    result: dict = {"phase": phase, "devices": devices(), "kernel": kernel_lines(SECOND_GPU),
                    "files_at_boot": files()}
    say(f"reserve lab, {phase}: {json.dumps(result['devices'])}")
    try:
        if phase == "reserve":
            without_initramfs_tools()
            result["reserve"] = cli("reserve", SECOND_GPU, "--yes")
        elif phase == "reserved":
            result["devices_cli"] = cli("devices")
            try:
                hotplug(result)
            except (OSError, SystemExit) as err:
                result["hotplug_error"] = repr(err)
            without_initramfs_tools()
            result["unreserve"] = cli("unreserve", SECOND_GPU, "--yes")
        elif phase != "unreserved":
            raise SystemExit(f"unknown phase {phase!r} (reserve, reserved, unreserved)")
        result["files_at_end"] = files()
    finally:
        (OUT / f"reserve-{phase}.json").write_text(json.dumps(result, indent=2))
    say(json.dumps({k: v for k, v in result.items() if k not in ("status", "kernel")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
