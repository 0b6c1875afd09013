"""CPU isolation for real: the desktop flavour of the lab (systemd PID 1, cgroup v2, 3 cores), booted once for
this module, starts two managed VMs pinned to cores 1 and 2 through libvirtd, destroys the first while the
second runs, then the second (tests/lab/isolation.py).

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

from lab import STALL_AFTER, run_in_lab_again_if_stalled  # noqa: E402

pytestmark = pytest.mark.lab

FRESH = ("/etc/libvirt/hooks", "/etc/libvirt/qemu", "/etc/janus-hooks", "/var/lib/janus-hooks",
         "/var/log/janus-hooks")
UNITS = ("system.slice", "user.slice", "init.scope")
FIRST, SECOND = "lab-isolated", "lab-isolated-2"  # pinned to cores 1 and 2
PINNED = "lab-pinned"  # managed, not isolated, pinned to core 2 while both run


@pytest.fixture(scope="module")
def isolated():
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: run scripts/bootstrap")
    # Every step of the scenario is bounded at 300 s or less and says what it does.
    result = run_in_lab_again_if_stalled([".venv/bin/python", "tests/lab/isolation.py"], 1200, STALL_AFTER,
                                         fresh=FRESH, flavour="desktop", smp=3)
    path = result.out_dir / "isolation.json"
    assert path.exists(), f"the scenario wrote no results: {result.message}\n{result.output[-4000:]}"
    data = json.loads(path.read_text())
    assert data["error"] is None, data["error"]
    return data


def _cpus(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.replace(",", " ").split():
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def _mask(text: str) -> set[int]:
    value = int(text.replace(",", ""), 16)
    return {i for i in range(value.bit_length()) if value >> i & 1}


def _refused(isolated: dict, vm: str) -> set[str]:
    """IRQs the kernel would not move for ``vm`` (EIO), from its journal's move-irqs step."""
    records = isolated[f"journal {vm}"]
    step = next(r["step"] for r in records if r.get("type") == "intent" and r["action"]["kind"] == "move-irqs")
    done = next(r for r in records if r.get("type") == "done" and r["step"] == step)
    return {str(irq) for irq in done["result"]["refused"]}


def assert_host_keeps(state: dict, host: set[int], refused: set[str]) -> None:
    """The host's work may run only on ``host``: systemd's word, the kernel's cgroups, real processes, IRQs."""
    allowed = {u: _cpus(state["allowed"][u].split("=", 1)[1]) for u in UNITS}
    assert allowed == dict.fromkeys(UNITS, host)
    for unit in UNITS:
        assert _cpus(state["cpuset_effective"][unit]) == host, unit
    assert _cpus(state["logind_cpus"]) == host and _cpus(state["weston_cpus"]) == host
    others = {irq for irq, cpus in state["irqs"].items() if cpus is not None and _cpus(cpus) - host}
    assert others <= refused, f"IRQs still off the host's cores: {sorted(others - refused)}"
    assert len(state["irqs"]) > len(refused)
    for mask in ("default_smp_affinity", "workqueue_cpumask", "writeback_cpumask"):
        assert _mask(state[mask]) == host, mask


def test_a_vm_pinned_to_core_1_moves_the_host_off_it(isolated):
    before, one = isolated["before"], isolated["one"]
    assert before["online"] == "0-2" and before["cgroup2"] is True
    assert one["journals_open"] == [FIRST]
    assert_host_keeps(one, {0, 2}, _refused(isolated, FIRST))
    # The VM's vCPU thread runs on its core.
    assert set(one["vcpu_threads"][FIRST].values()) == {"1"}


def test_plan_shows_the_isolation_steps_read_from_the_real_host(isolated):
    plan = isolated["plan"].splitlines()
    assert plan[0].startswith("VM 'lab-isolated' (passthrough):"), plan
    steps = [line.split(". ", 1)[1] for line in plan[1:] if line.startswith("  ") and ". " in line]
    assert steps[:3] == [f"keep {unit} off cores 1 (AllowedCPUs, runtime)" for unit in UNITS]
    assert "move IRQ affinities off cores 1" in steps
    assert "keep new IRQs off cores 1 (default_smp_affinity)" in steps


def test_allowed_cpus_is_set_for_this_boot_only(isolated):
    """systemd keeps a runtime property below /run (gone at reboot), never below /etc. (For the slices it is a
    drop-in; systemd 252 left no file at all for init.scope.)"""
    for when in ("before", "one", "both", "second", "after"):
        assert not [p for p in isolated[when]["dropins"] if not p.startswith("/run/")], when
    one = isolated["one"]["dropins"]
    for unit in ("system.slice", "user.slice"):
        values = [text for path, text in one.items() if f"/{unit}.d/" in path]
        assert values and all(v.endswith("AllowedCPUs=0 2") for v in values), (unit, one)


def test_a_second_vm_on_core_2_leaves_the_host_core_0(isolated):
    both = isolated["both"]
    assert both["journals_open"] == [FIRST, SECOND]
    assert_host_keeps(both, {0}, _refused(isolated, FIRST) | _refused(isolated, SECOND))
    assert set(both["vcpu_threads"][FIRST].values()) == {"1"}
    assert set(both["vcpu_threads"][SECOND].values()) == {"2"}


def test_check_reports_each_running_vms_cores_and_a_core_two_of_them_share(isolated):
    """While both isolated VMs run, a third managed VM, not isolated, runs pinned to the second one's core 2:
    check reads the real QEMUs' vCPU threads (libvirt pinned them) and the open journals."""
    assert set(isolated["pinned_vcpu_threads"].values()) == {"2"}
    checks = json.loads(isolated["check_both"])["checks"]
    found = [(c["name"], c["status"], c["detail"]) for c in checks if c["name"] in ("isolation", "pinning", "shared")]
    assert found[0][:2] == ("isolation", "ok") and "systemd AllowedCPUs" in found[0][2], found
    assert found[1:] == [
        ("pinning", "ok", f"VM {FIRST!r} runs isolated on cores 1; the host keeps 0"),
        ("pinning", "ok", f"VM {SECOND!r} runs isolated on cores 2; the host keeps 0"),
        ("pinning", "ok", f"VM {PINNED!r} runs its vCPUs on cores 2, not isolated: the host's work may run there too"),
        ("shared", "warn", f"cores 2 are pinned by both running VMs {SECOND!r} and {PINNED!r}"),
    ]


def test_the_first_release_gives_back_its_core_only(isolated):
    second = isolated["second"]
    assert second["journals_open"] == [SECOND]
    assert_host_keeps(second, {0, 1}, _refused(isolated, SECOND))
    assert set(second["vcpu_threads"][SECOND].values()) == {"2"}


def test_after_the_last_release_everything_reads_as_before(isolated):
    before, after = isolated["before"], isolated["after"]
    assert after["journals_open"] == []
    # systemd enables the cpuset controller for the top-level groups while a unit has AllowedCPUs, and
    # takes it away again once none has: the cgroup tree itself reads as before.
    for key in ("allowed", "cpuset", "cpuset_effective", "subtree_control", "irqs", "default_smp_affinity",
                "workqueue_cpumask", "writeback_cpumask", "logind_cpus", "weston_cpus"):
        assert after[key] == before[key], key
    assert after["allowed"] == {u: "AllowedCPUs=" for u in UNITS}
