"""CPU isolation on a real kernel with cgroup v2 and no systemd (the runit flavour of the lab, 2 cores): the
installed hook writes the top-level cgroups' cpuset.cpus, IRQ affinities and masks itself, and puts them back
(tests/lab/isolation_cgroup.py). Every assertion is on what the scenario read from the lab's kernel."""

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

FRESH = ("/etc/libvirt/hooks", "/etc/libvirt/qemu", "/etc/janus-hooks", "/var/lib/janus-hooks",
         "/var/log/janus-hooks")


@pytest.fixture(scope="module")
def cgroup_run():
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: run scripts/bootstrap")
    result = run_in_lab([".venv/bin/python", "tests/lab/isolation_cgroup.py"], timeout=300, fresh=FRESH)
    path = result.out_dir / "isolation-cgroup.json"
    assert path.exists(), f"the scenario wrote no results: {result.message}\n{result.output[-4000:]}"
    return json.loads(path.read_text())


def _cpus(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def test_the_service_group_leaves_core_1_and_libvirts_group_keeps_it(cgroup_run):
    assert cgroup_run["prepare"] == {"status": 0, "stderr": ""}
    before, during = cgroup_run["before"], cgroup_run["during"]
    assert before["online"] == "0-1" and "cpuset" in before["subtree_control"].split()
    assert before["cpuset"]["services"] == "" and before["process_cpus"]["services"] == "0-1"
    assert during["cpuset"]["services"] == "0" and during["cpuset_effective"]["services"] == "0"
    assert during["process_cpus"] == {"services": "0", "machine": "0-1"}
    assert during["cpuset"]["machine"] == ""
    kinds = [r["action"]["kind"] for r in cgroup_run["journal"] if r.get("type") == "intent"]
    assert "restrict-unit-cpus" not in kinds and "restrict-cgroup-cpus" in kinds


def test_irqs_and_masks_leave_core_1(cgroup_run):
    during = cgroup_run["during"]
    records = cgroup_run["journal"]
    step = next(r["step"] for r in records if r.get("type") == "intent" and r["action"]["kind"] == "move-irqs")
    done = next(r for r in records if r.get("type") == "done" and r["step"] == step)
    refused = {str(irq) for irq in done["result"]["refused"]}
    on_core = {irq for irq, cpus in during["irqs"].items() if cpus is not None and 1 in _cpus(cpus)}
    assert on_core <= refused and len(during["irqs"]) > len(refused)
    for mask in ("default_smp_affinity", "workqueue_cpumask", "writeback_cpumask"):
        assert int(during[mask].replace(",", ""), 16) == 0b01, mask


def test_release_puts_everything_back(cgroup_run):
    assert cgroup_run["release"] == {"status": 0, "stderr": ""}
    assert cgroup_run["journal_open_after"] is False
    before, after = cgroup_run["before"], cgroup_run["after"]
    # 6.1 refuses to empty the cpuset of a group with processes in it (ENOSPC): the service group gets every
    # online core, which is what its empty cpuset meant; its processes may run everywhere again.
    assert after["cpuset"] == {"services": "0-1", "machine": ""}
    assert {k: v for k, v in after.items() if k != "cpuset"} == {k: v for k, v in before.items() if k != "cpuset"}


def test_a_start_pinned_to_an_offline_core_is_refused_and_changes_nothing(cgroup_run):
    offline = cgroup_run["offline"]
    assert offline["online"] == "0"
    assert offline["prepare"]["status"] == 1
    line = offline["prepare"]["stderr"]
    assert line.startswith("janus-hooks: ") and "\n" not in line
    assert line.endswith("VM 'lab-cgroup' is pinned to cores 1, which are offline"), line
    assert offline["journal_open"] is False
    # Read with core 1 offline: the kernel's own view then; what janus-hooks could have changed is as it was.
    for key in ("cpuset", "default_smp_affinity", "workqueue_cpumask", "writeback_cpumask", "subtree_control"):
        assert offline["state"][key] == cgroup_run["after"][key], key


def test_after_a_power_loss_the_next_boot_closes_the_journal_and_touches_nothing():
    """Two boots sharing /var/lib/janus-hooks (the host's disk): the first isolates core 1 and never releases;
    on the second, a real boot of the kernel, nothing of it is left, and the boot-time rollback closes the
    journal as already gone with the reboot, writing nothing."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: run scripts/bootstrap")
    state = new_out_dir()
    fresh = tuple(p for p in FRESH if p != "/var/lib/janus-hooks")
    runs = {}
    for phase in ("power-lost", "rebooted"):
        result = run_in_lab([".venv/bin/python", "tests/lab/isolation_cgroup.py", phase], timeout=300, fresh=fresh,
                            state=state, persistent=("/var/lib/janus-hooks",))
        path = result.out_dir / f"isolation-{phase}.json"
        assert path.exists(), f"boot '{phase}' wrote no results: {result.message}\n{result.output[-4000:]}"
        runs[phase] = json.loads(path.read_text())
    lost, rebooted = runs["power-lost"], runs["rebooted"]
    assert lost["prepare"] == {"status": 0, "stderr": ""}
    assert lost["during"]["cpuset"]["services"] == "0"
    steps = [r for r in lost["journal"] if r.get("type") == "intent"]
    assert len(steps) >= 4 and rebooted["journal_before"] == lost["journal"]
    assert rebooted["boot_id"] != lost["boot_id"]
    # The new boot's kernel: nothing of the first boot's isolation.
    assert rebooted["before"]["cpuset"] == {"services": "", "machine": ""}
    assert rebooted["before"]["process_cpus"] == {"services": "0-1", "machine": "0-1"}
    assert "(an EARLIER boot)" in rebooted["journal"]["stdout"], rebooted["journal"]
    assert rebooted["rollback"]["status"] == 0, rebooted["rollback"]
    assert (f"VM 'lab-cgroup': 0 change(s) reverted, {len(steps)} already gone with the reboot; the journal is "
            "closed.") in rebooted["rollback"]["stdout"]
    assert rebooted["journal_open_after"] is False
    assert rebooted["after"] == rebooted["before"]
