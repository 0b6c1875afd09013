"""CPU isolation for real: the desktop flavour of the lab (systemd PID 1, cgroup v2, 2 cores), booted once for
this module, starts a managed VM pinned to core 1 through libvirtd (tests/lab/isolation.py).

Every assertion is on what the scenario read from the lab's systemd, cgroupfs and /proc, never on janus-hooks'
own output. The lab has no cpufreq: the governor step is covered on the fake kernel only.
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

FRESH = ("/etc/libvirt/hooks", "/etc/libvirt/qemu", "/etc/janus-hooks", "/var/lib/janus-hooks",
         "/var/log/janus-hooks")
UNITS = ("system.slice", "user.slice", "init.scope")


@pytest.fixture(scope="module")
def isolated():
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: run scripts/bootstrap")
    result = run_in_lab([".venv/bin/python", "tests/lab/isolation.py"], timeout=900, fresh=FRESH, flavour="desktop")
    path = result.out_dir / "isolation.json"
    assert path.exists(), f"the scenario wrote no results: {result.message}\n{result.output[-4000:]}"
    return json.loads(path.read_text())


def _cpus(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def test_the_pinned_vm_starts_through_libvirt_and_the_host_is_moved_off_its_core(isolated):
    assert isolated["error"] is None, isolated["error"]
    before, during = isolated["before"], isolated["during"]
    assert before["online"] == "0-1" and before["cgroup2"] is True
    assert during["allowed"] == {u: "AllowedCPUs=0" for u in UNITS}
    for unit in UNITS:
        assert _cpus(during["cpuset_effective"][unit]) == {0}, unit
    # Host processes (a system service, the user's compositor) may no longer run on the VM's core ...
    assert during["logind_cpus"] == "0" and during["weston_cpus"] == "0"
    # ... while the VM's vCPU thread runs there.
    assert during["vcpu_threads"] and set(during["vcpu_threads"].values()) == {"1"}


def test_irqs_leave_the_vms_core_except_those_the_kernel_keeps(isolated):
    during = isolated["during"]
    moves = [r for r in isolated["journal"] if r.get("type") == "intent" and r["action"]["kind"] == "move-irqs"]
    done = [r for r in isolated["journal"] if r.get("type") == "done" and r["step"] == moves[0]["step"]]
    refused = {str(irq) for irq in done[0]["result"]["refused"]}
    on_core = {irq for irq, cpus in during["irqs"].items() if cpus is not None and 1 in _cpus(cpus)}
    assert on_core <= refused, f"IRQs still on core 1: {sorted(on_core - refused)}"
    assert len(during["irqs"]) > len(refused)
    assert int(during["default_smp_affinity"].replace(",", ""), 16) == 0b01
    assert int(during["workqueue_cpumask"].replace(",", ""), 16) == 0b01
    assert int(during["writeback_cpumask"].replace(",", ""), 16) == 0b01


def test_after_destroy_everything_reads_as_before(isolated):
    before, after = isolated["before"], isolated["after"]
    assert after["journal_open"] is False
    # systemd enables the cpuset controller for the top-level groups while a unit has AllowedCPUs, and
    # takes it away again once none has: the cgroup tree itself reads as before.
    for key in ("allowed", "cpuset", "cpuset_effective", "subtree_control", "irqs", "default_smp_affinity",
                "workqueue_cpumask", "writeback_cpumask", "logind_cpus", "weston_cpus"):
        assert after[key] == before[key], key
    assert after["allowed"] == {u: "AllowedCPUs=" for u in UNITS}
