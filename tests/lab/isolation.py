"""CPU isolation INSIDE the desktop flavour of the real-kernel lab (systemd PID 1, cgroup v2, 2 cores):

    tests/lab/run --flavour desktop -- .venv/bin/python tests/lab/isolation.py

A managed VM with no GPU, its one vCPU pinned to core 1 (``<janus:profile isolate="yes">``), is started
through libvirtd and destroyed. Before, during and after, everything is read from the real system: systemd's
AllowedCPUs (``systemctl show``), the cgroups' cpuset files, every IRQ's affinity, the default IRQ affinity,
the workqueue cpumasks, which cores a host process and the VM's vCPU thread may run on. Results go to
$LAB_OUT/isolation.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import desktop
import scenario
from scenario import say, wait_for

VM = "lab-isolated"
CORE = 1  # the VM's; the host keeps core 0
JOURNAL = Path("/var/lib/janus-hooks/journal") / f"{VM}.jsonl"
UNITS = ("system.slice", "user.slice", "init.scope")
CONFIG = desktop.CONFIG + """
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
  <cputune><vcpupin vcpu='0' cpuset='{CORE}'/></cputune>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def allowed_cpus(unit: str) -> str:
    out = subprocess.run(["systemctl", "show", unit, "-p", "AllowedCPUs"], capture_output=True, text=True,
                         timeout=30, check=False).stdout.strip()
    return out  # "AllowedCPUs=" or "AllowedCPUs=0"


def cpus_allowed(task: str) -> str | None:
    """The cores a process or thread (``/proc/<pid>`` or ``/proc/<pid>/task/<tid>``) may run on."""
    for line in (read(f"{task}/status") or "").splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    return None


def pid_of(comm: str) -> int | None:
    for entry in os.listdir("/proc"):
        if entry.isdigit() and read(f"/proc/{entry}/comm") == comm:
            return int(entry)
    return None


def vcpu_threads() -> dict[str, str | None]:
    """The VM's QEMU threads named "CPU n/TCG" and the cores each may run on."""
    found: dict[str, str | None] = {}
    for entry in os.listdir("/proc"):
        cmdline = (read(f"/proc/{entry}/cmdline") or "") if entry.isdigit() else ""
        if f"guest={VM}" not in cmdline:
            continue
        for task in os.listdir(f"/proc/{entry}/task"):
            name = read(f"/proc/{entry}/task/{task}/comm") or ""
            if name.startswith("CPU "):
                found[name] = cpus_allowed(f"/proc/{entry}/task/{task}")
    return found


def host_state() -> dict:
    irqs = {}
    for entry in sorted(os.listdir("/proc/irq"), key=lambda n: int(n) if n.isdigit() else -1):
        if entry.isdigit():
            irqs[entry] = read(f"/proc/irq/{entry}/smp_affinity_list")
    logind = pid_of("systemd-logind")
    return {
        "online": read("/sys/devices/system/cpu/online"),
        "cgroup2": Path("/sys/fs/cgroup/cgroup.controllers").is_file(),
        "subtree_control": read("/sys/fs/cgroup/cgroup.subtree_control"),
        "allowed": {u: allowed_cpus(u) for u in UNITS},
        "cpuset": {u: read(f"/sys/fs/cgroup/{u}/cpuset.cpus") for u in UNITS},
        "cpuset_effective": {u: read(f"/sys/fs/cgroup/{u}/cpuset.cpus.effective") for u in UNITS},
        "irqs": irqs,
        "default_smp_affinity": read("/proc/irq/default_smp_affinity"),
        "workqueue_cpumask": read("/sys/devices/virtual/workqueue/cpumask"),
        "writeback_cpumask": read("/sys/bus/workqueue/devices/writeback/cpumask"),
        "logind_cpus": cpus_allowed(f"/proc/{logind}") if logind else None,
        "weston_cpus": cpus_allowed(f"/proc/{pid}") if (pid := pid_of("weston")) else None,
        "vcpu_threads": vcpu_threads(),
        "journal_open": JOURNAL.exists(),
    }


def journal_records() -> list[dict]:
    if not JOURNAL.exists():
        return []
    return [json.loads(line) for line in JOURNAL.read_text().splitlines() if line.strip()]


def main() -> int:
    if os.environ.get("LAB_FLAVOUR") != "desktop":
        print("isolation.py: runs inside the desktop lab only (tests/lab/run --flavour desktop -- ...)",
              file=sys.stderr)
        return 2
    result: dict = {"setup": desktop.setup()}
    Path("/etc/janus-hooks/janus.toml").write_text(CONFIG)
    conn = scenario.connect()
    result["before"] = host_state()
    say(f"before: AllowedCPUs {result['before']['allowed']}, online {result['before']['online']}")
    plan = subprocess.run([str(scenario.VENV_BIN / "janus-hooks"), "plan", VM, "--xml", "-"], input=DOMAIN,
                          capture_output=True, text=True, timeout=120, check=False)
    result["plan"] = plan.stdout + plan.stderr
    say(result["plan"])
    say(f"virsh start {VM} ...")
    dom, result["error"], result["start_s"] = desktop.start_vm(conn, DOMAIN)
    try:
        if result["error"] is None:
            result["journal"] = journal_records()
            result["during"] = host_state()
            say(f"during: AllowedCPUs {result['during']['allowed']}, vCPU threads {result['during']['vcpu_threads']}")
            say(f"virsh destroy {VM} ...")
            t0 = time.monotonic()
            dom.destroy()
            result["released_s"] = wait_for(lambda: not JOURNAL.exists(), 60, "the journal closing")
            result["destroy_s"] = time.monotonic() - t0
        else:
            say(f"libvirt refused the start: {result['error']}")
    finally:
        desktop.cleanup(dom)
        result["after"] = host_state()
        say(f"after: AllowedCPUs {result['after']['allowed']}")
        scenario.OUT.mkdir(parents=True, exist_ok=True)
        (scenario.OUT / "isolation.json").write_text(json.dumps(result, indent=1, sort_keys=True))
        log = Path("/var/log/janus-hooks/hook.log")
        if log.exists():
            (scenario.OUT / "hook.log").write_text(log.read_text())
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
