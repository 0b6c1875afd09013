"""CPU isolation INSIDE the desktop flavour of the real-kernel lab (systemd PID 1, cgroup v2, 3 cores):

    tests/lab/run --flavour desktop --smp 3 -- .venv/bin/python tests/lab/isolation.py

Two managed VMs with no GPU, each with one vCPU pinned to its own core (1 and 2) and
``<janus:profile isolate="yes">``, are started through libvirtd one after the other; while both run, a third
managed VM that is not isolated runs pinned to core 2 and ``janus-hooks check --json`` is read; the first is
destroyed while the second runs, then the second. At each point everything is read from the real system: systemd's
AllowedCPUs (``systemctl show``), the cgroups' cpuset files, every IRQ's affinity, the default IRQ affinity,
the workqueue cpumasks, which cores host processes and the VMs' vCPU threads may run on. Results go to
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

VMS = {"lab-isolated": 1, "lab-isolated-2": 2}  # VM -> its core; the host keeps core 0
# Managed, pinned to the second VM's core, not isolated: runs while both others do, for check to see.
PINNED = "lab-pinned"
JOURNALS = Path("/var/lib/janus-hooks/journal")
UNITS = ("system.slice", "user.slice", "init.scope")
CONFIG = desktop.CONFIG + """
[cpu]
irqs = true
workqueues = true
"""

DOMAIN = """\
<domain type='qemu'>
  <name>{vm}</name>
  <metadata><janus:profile xmlns:janus='{ns}' mode='passthrough' isolate='{isolate}'/></metadata>
  <memory unit='MiB'>64</memory>
  <vcpu placement='static'>1</vcpu>
  <cputune><vcpupin vcpu='0' cpuset='{core}'/></cputune>
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


def domain(vm: str) -> str:
    if vm == PINNED:
        return DOMAIN.format(vm=vm, core=VMS["lab-isolated-2"], ns=scenario.PROFILE_NS, isolate="no")
    return DOMAIN.format(vm=vm, core=VMS[vm], ns=scenario.PROFILE_NS, isolate="yes")


def journal(vm: str) -> Path:
    return JOURNALS / f"{vm}.jsonl"


def vcpu_threads(vm: str) -> dict[str, str | None]:
    """The VM's QEMU threads named "CPU n/TCG" and the cores each may run on."""
    found: dict[str, str | None] = {}
    for entry in os.listdir("/proc"):
        cmdline = (read(f"/proc/{entry}/cmdline") or "").split("\0") if entry.isdigit() else []
        if not any(arg.startswith(f"guest={vm},") for arg in cmdline):
            continue
        for task in os.listdir(f"/proc/{entry}/task"):
            name = read(f"/proc/{entry}/task/{task}/comm") or ""
            if name.startswith("CPU "):
                found[name] = cpus_allowed(f"/proc/{entry}/task/{task}")
    return found


def allowed_cpus_dropins() -> dict[str, str]:
    """Every file systemd keeps below /run/systemd (gone at reboot) or /etc/systemd (kept) that carries
    AllowedCPUs: where ``systemctl set-property`` put what it was given."""
    found: dict[str, str] = {}
    for top in ("/run/systemd", "/etc/systemd"):
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                path = Path(dirpath, name)
                try:
                    if not path.is_file() or path.stat().st_size > 65536:
                        continue
                    text = path.read_text(errors="replace")
                except OSError:
                    continue
                if "AllowedCPUs" in text:
                    found[str(path)] = text.strip()
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
        "vcpu_threads": {vm: vcpu_threads(vm) for vm in VMS},
        "dropins": allowed_cpus_dropins(),
        "journals_open": sorted(vm for vm in VMS if journal(vm).exists()),
    }


def journal_records(vm: str) -> list[dict]:
    if not journal(vm).exists():
        return []
    return [json.loads(line) for line in journal(vm).read_text().splitlines() if line.strip()]


def start(conn, vm: str, result: dict, domains: list) -> None:
    say(f"virsh start {vm} ...")
    dom, error, result[f"start_s {vm}"] = desktop.start_vm(conn, domain(vm))
    domains.append(dom)
    if error is not None:
        raise RuntimeError(f"libvirt refused the start of {vm}: {error}")
    result[f"journal {vm}"] = journal_records(vm)


def destroy(dom, vm: str, result: dict) -> None:
    say(f"virsh destroy {vm} ...")
    t0 = time.monotonic()
    dom.destroy()
    wait_for(lambda: not journal(vm).exists(), 60, f"the journal of {vm} closing")
    result[f"destroy_s {vm}"] = time.monotonic() - t0


def record(result: dict, when: str) -> None:
    result[when] = state = host_state()
    say(f"{when}: AllowedCPUs {state['allowed']}, vCPU threads {state['vcpu_threads']}")


def main() -> int:
    if os.environ.get("LAB_FLAVOUR") != "desktop":
        print("isolation.py: runs inside the desktop lab only (tests/lab/run --flavour desktop -- ...)",
              file=sys.stderr)
        return 2
    result: dict = {"setup": desktop.setup()}
    Path("/etc/janus-hooks/janus.toml").write_text(CONFIG)
    conn = scenario.connect()
    record(result, "before")
    first, second = VMS
    plan = subprocess.run([str(scenario.VENV_BIN / "janus-hooks"), "plan", first, "--xml", "-"],
                          input=domain(first), capture_output=True, text=True, timeout=120, check=False)
    result["plan"] = plan.stdout + plan.stderr
    say(result["plan"])
    domains: list = []
    result["error"] = None
    try:
        start(conn, first, result, domains)
        record(result, "one")
        start(conn, second, result, domains)
        record(result, "both")
        start(conn, PINNED, result, domains)
        result["pinned_vcpu_threads"] = vcpu_threads(PINNED)
        check = subprocess.run([str(scenario.VENV_BIN / "janus-hooks"), "check", "--json"], capture_output=True,
                               text=True, timeout=180, check=False)
        result["check_both"] = check.stdout
        say(f"check: {check.stdout[-1500:]} {check.stderr[-500:]}")
        destroy(domains[2], PINNED, result)
        destroy(domains[0], first, result)
        record(result, "second")
        destroy(domains[1], second, result)
    except Exception as err:  # noqa: BLE001 - the results say what happened, the test judges
        result["error"] = str(err)
        say(str(err))
    finally:
        for dom in domains:
            desktop.cleanup(dom)
        record(result, "after")
        scenario.OUT.mkdir(parents=True, exist_ok=True)
        (scenario.OUT / "isolation.json").write_text(json.dumps(result, indent=1, sort_keys=True))
        log = Path("/var/log/janus-hooks/hook.log")
        if log.exists():
            (scenario.OUT / "hook.log").write_text(log.read_text())
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
