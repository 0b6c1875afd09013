"""CPU isolation on a cgroup v2 host WITHOUT systemd, INSIDE the runit flavour of the real-kernel lab (2 cores):

    tests/lab/run -- .venv/bin/python tests/lab/isolation_cgroup.py

The lab's init has no cgroups of its own: this mounts cgroup v2, enables cpuset for the top-level groups (as
OpenRC does with its unified hierarchy), puts a process in a service group and another in libvirt's
``machine`` group, installs janus-hooks and calls the installed hook itself (``prepare begin``, ``release
end``) for a VM pinned to core 1 with ``isolate="yes"`` (libvirt plays no part: the point is the kernel's
cpuset and IRQ files written directly). Everything is read from the real kernel. Results go to
$LAB_OUT/isolation-cgroup.json.

With ``power-lost`` then ``rebooted`` (two boots sharing /var/lib/janus-hooks): the first prepares and never
releases; the second finds the journal of an earlier boot, and ``janus-hooks rollback --all --boot`` must
close it and leave the new boot's cgroups, IRQs and masks as they are. Results: isolation-power-lost.json,
isolation-rebooted.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import scenario
from scenario import say

VM = "lab-cgroup"
JOURNAL = Path("/var/lib/janus-hooks/journal") / f"{VM}.jsonl"
CGROUP = Path("/sys/fs/cgroup")
GROUPS = ("services", "machine")  # a service group janus-hooks narrows, libvirt's group it must not touch
CONFIG = """\
log_level = "debug"

[cpu]
irqs = true
workqueues = true
"""
DOMAIN = f"""\
<domain type='qemu'>
  <name>{VM}</name>
  <metadata><janus:profile xmlns:janus='{scenario.PROFILE_NS}' mode='passthrough' isolate='yes'/></metadata>
  <memory unit='MiB'>64</memory>
  <vcpu placement='static'>1</vcpu>
  <cputune><vcpupin vcpu='0' cpuset='1'/></cputune>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>
"""


def read(path: Path | str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def cpus_allowed(pid: int) -> str | None:
    for line in (read(f"/proc/{pid}/status") or "").splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    return None


def host_state(sleepers: dict[str, int]) -> dict:
    return {
        "online": read("/sys/devices/system/cpu/online"),
        "subtree_control": read(CGROUP / "cgroup.subtree_control"),
        "cpuset": {g: read(CGROUP / g / "cpuset.cpus") for g in GROUPS},
        "cpuset_effective": {g: read(CGROUP / g / "cpuset.cpus.effective") for g in GROUPS},
        "process_cpus": {g: cpus_allowed(pid) for g, pid in sleepers.items()},
        "irqs": {e: read(f"/proc/irq/{e}/smp_affinity_list") for e in sorted(os.listdir("/proc/irq"))
                 if e.isdigit()},
        "default_smp_affinity": read("/proc/irq/default_smp_affinity"),
        "workqueue_cpumask": read("/sys/devices/virtual/workqueue/cpumask"),
        "writeback_cpumask": read("/sys/bus/workqueue/devices/writeback/cpumask"),
    }


def hook(*args: str) -> dict:
    proc = subprocess.run([str(scenario.HOOK), VM, *args, "-"], input=DOMAIN, capture_output=True, text=True,
                          timeout=120, check=False)
    return {"status": proc.returncode, "stderr": proc.stderr.strip()}


def setup() -> dict[str, int]:
    """cgroup v2 with cpuset for the top-level groups and a process in each group, as this boot's init made them."""
    if not (CGROUP / "cgroup.controllers").exists():
        scenario.run(["mount", "-t", "cgroup2", "none", str(CGROUP)])
    (CGROUP / "cgroup.subtree_control").write_text("+cpuset")
    sleepers = {}
    for group in GROUPS:
        (CGROUP / group).mkdir(exist_ok=True)
        proc = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
        (CGROUP / group / "cgroup.procs").write_text(str(proc.pid))
        sleepers[group] = proc.pid
    for private in ("/var/lib/janus-hooks", "/var/log/janus-hooks"):
        if Path(private).is_dir():
            os.chmod(private, 0o700)
    return sleepers


def cli(*args: str) -> dict:
    proc = subprocess.run([str(scenario.VENV_BIN / "janus-hooks"), *args], capture_output=True, text=True,
                          timeout=180, check=False)
    return {"status": proc.returncode, "stdout": proc.stdout.strip(), "stderr": proc.stderr.strip()}


def journal_records() -> list[dict]:
    return ([json.loads(line) for line in JOURNAL.read_text().splitlines() if line.strip()]
            if JOURNAL.exists() else [])


def write_result(name: str, result: dict, sleepers: dict[str, int]) -> None:
    scenario.OUT.mkdir(parents=True, exist_ok=True)
    (scenario.OUT / name).write_text(json.dumps(result, indent=1, sort_keys=True))
    for pid in sleepers.values():
        os.kill(pid, 9)


def power_lost() -> int:
    """First boot: the VM's prepare isolates core 1, then the host loses power (no release)."""
    sleepers = setup()
    scenario.run([str(scenario.VENV_BIN / "janus-hooks"), "install", "--yes"])
    Path("/etc/janus-hooks/janus.toml").write_text(CONFIG)
    result = {"boot_id": read("/proc/sys/kernel/random/boot_id"), "before": host_state(sleepers),
              "prepare": hook("prepare", "begin")}
    result["journal"] = journal_records()
    result["during"] = host_state(sleepers)
    say(f"power lost with the journal open: {result['during']['cpuset']}")
    write_result("isolation-power-lost.json", result, sleepers)
    return 0


def rebooted() -> int:
    """Second boot, the journal kept on disk: nothing isolated survived; the boot-time rollback closes the
    journal without a write to the new boot's kernel state."""
    sleepers = setup()
    result = {"boot_id": read("/proc/sys/kernel/random/boot_id"), "journal_before": journal_records(),
              "before": host_state(sleepers), "journal": cli("journal")}
    result["rollback"] = cli("rollback", "--all", "--boot")
    say(f"rollback --all --boot: {result['rollback']}")
    result["after"] = host_state(sleepers)
    result["journal_open_after"] = JOURNAL.exists()
    write_result("isolation-rebooted.json", result, sleepers)
    return 0


def main() -> int:
    phase = sys.argv[1] if len(sys.argv) > 1 else "run"
    if phase == "power-lost":
        return power_lost()
    if phase == "rebooted":
        return rebooted()
    sleepers = setup()
    scenario.run([str(scenario.VENV_BIN / "janus-hooks"), "install", "--yes"])
    Path("/etc/janus-hooks/janus.toml").write_text(CONFIG)
    result: dict = {"before": host_state(sleepers)}
    say(f"before: {result['before']['cpuset']} processes {result['before']['process_cpus']}")
    result["prepare"] = hook("prepare", "begin")
    say(f"prepare begin: {result['prepare']}")
    result["journal"] = journal_records()
    result["during"] = host_state(sleepers)
    say(f"during: {result['during']['cpuset']} processes {result['during']['process_cpus']}")
    result["release"] = hook("release", "end")
    result["journal_open_after"] = JOURNAL.exists()
    result["after"] = host_state(sleepers)
    say(f"after: {result['after']['cpuset']} processes {result['after']['process_cpus']}")
    # The VM's core taken offline (CPU hotplug): the start is refused naming it, nothing changes.
    online = Path("/sys/devices/system/cpu/cpu1/online")
    online.write_text("0")
    try:
        result["offline"] = {"online": read("/sys/devices/system/cpu/online"), "prepare": hook("prepare", "begin"),
                             "journal_open": JOURNAL.exists(), "state": host_state(sleepers)}
    finally:
        online.write_text("1")
    say(f"core 1 offline: {result['offline']['prepare']}")
    write_result("isolation-cgroup.json", result, sleepers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
