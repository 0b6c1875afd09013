"""CPU isolation on the fake kernel: planning and refusals, two VMs sharing the host, every crash point and fault.

The fake host (``hosts.pinned_nvidia``) has 8 threads on 4 SMT cores (siblings i and i+4), cpufreq, a cgroup
v2 tree as systemd 252 leaves it, IRQs of which the kernel refuses to move 0, 2 and 124 (EIO), and the
workqueue cpumasks. systemd's ``set-property --runtime`` keeps its drop-in (emptied) after a reset, as the
real one does: tree comparisons leave ``run/systemd/system.control`` out and check AllowedCPUs instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from janus_hooks.actions import MoveIrqs, RestrictCgroupCpus, RestrictUnitCpus, SetGovernor, StopIrqbalance
from janus_hooks.domain import parse_domain
from janus_hooks.errors import ConfigError
from tests.conftest import FAST_TIMEOUTS, FakeHost, domain_xml
from tests.core.helpers import diff, kill_hook_at
from tests.fake import hosts
from tests.fake.builder import BOOT_ID
from tests.fake.kernel import FakeKernel
from tests.fake.services import FakeServices

DROPINS = "run/systemd/system.control"
UNITS = ("system.slice", "user.slice", "init.scope")
CPU_ALL = FAST_TIMEOUTS + "\n[cpu]\ngovernor = \"performance\"\nworkqueues = true\n"


def pins(vcpus: str, emulator: str | None = None, iothread: str | None = None) -> str:
    cores = vcpus.split(",")
    tune = "".join(f"<vcpupin vcpu='{i}' cpuset='{c}'/>" for i, c in enumerate(cores))
    if emulator:
        tune += f"<emulatorpin cpuset='{emulator}'/>"
    if iothread:
        tune += f"<iothreadpin iothread='1' cpuset='{iothread}'/>"
    return f"<cputune>{tune}</cputune>", f"<vcpu placement='static'>{len(cores)}</vcpu>"


def vm_xml(name: str = "win11", vcpus: str = "2,6", emulator: str | None = None, isolate: str | None = "yes",
           hostdevs: tuple[str, ...] = (), mode: str | None = "passthrough", iothread: str | None = None) -> str:
    """A VM pinned to ``vcpus`` (one core per vCPU); no hostdevs: only the isolation steps are planned."""
    cputune, vcpu = pins(vcpus, emulator, iothread)
    return domain_xml(name=name, hostdevs=hostdevs, mode=mode, vcpu=vcpu, cputune=cputune, isolate=isolate)


def host_state(h: FakeHost) -> dict[str, str]:
    """What isolation touches, as a person would read it."""
    state = {f"AllowedCPUs {u}": h.services.unit_property(u, "AllowedCPUs") for u in UNITS}
    state |= {f"irq {p.parent.name}": p.read_text().strip()
              for p in sorted(h.root.glob("proc/irq/*/smp_affinity_list"))}
    for rel in ("proc/irq/default_smp_affinity", "sys/devices/virtual/workqueue/cpumask",
                "sys/bus/workqueue/devices/writeback/cpumask", "sys/fs/cgroup/cgroup.subtree_control"):
        state[rel] = h.read(rel)
    state |= {f"cpuset {p.parent.name}": p.read_text().strip()
              for p in sorted(h.root.glob("sys/fs/cgroup/*/cpuset.cpus"))}
    state |= {f"governor {p.parents[1].name}": p.read_text().strip()
              for p in sorted(h.root.glob("sys/devices/system/cpu/cpu*/cpufreq/scaling_governor"))}
    state["irqbalance"] = "active" if h.services.is_active("irqbalance.service") else "inactive"
    return state


def assert_restored(h: FakeHost, before: dict) -> None:
    changed = [k for k in diff(before, h.snapshot()) if not k.startswith(DROPINS)]
    assert not changed, f"host tree differs at {changed[:10]}"
    assert all(h.services.unit_property(u, "AllowedCPUs") == "" for u in UNITS)


def assert_back(h: FakeHost, before: dict, state: dict, what: object = "") -> None:
    """Everything isolation touched reads as before. Without systemd, one difference is the kernel's: a group
    with processes in it may not go back to an empty cpuset (ENOSPC), so it gets every online core, the cores
    its empty cpuset meant."""
    if (h.root / "run/systemd/system").exists():
        assert host_state(h) == state, what
        assert_restored(h, before)
        return
    sshd = "sys/fs/cgroup/openrc.sshd/cpuset.cpus"
    assert diff(before, h.snapshot()) in ([], [sshd]), what
    assert h.read(sshd) in ("", "0-7"), what
    now = host_state(h)
    assert {k: v for k, v in now.items() if k != "cpuset openrc.sshd"} == {
        k: v for k, v in state.items() if k != "cpuset openrc.sshd"}, what


@pytest.fixture
def pinned(tmp_path: Path):
    def make(config: str = CPU_ALL, root: Path | None = None, **kwargs) -> FakeHost:
        root = root or tmp_path / "host"
        hosts.pinned_nvidia(root, **kwargs)
        h = FakeHost(root)
        h.config(config)
        return h
    return make


# --- CPU sets in every spelling ----------------------------------------------------------------------------------
def test_cpu_sets_in_the_kernels_libvirts_and_systemds_spellings():
    from janus_hooks.cpuset import format_cpulist, format_cpumask, parse_cpulist, parse_cpumask

    assert parse_cpulist("0-3,8") == parse_cpulist("0-3 8") == {0, 1, 2, 3, 8}
    assert parse_cpulist("1-4,^3") == {1, 2, 4} and parse_cpulist("0-7:2") == {0, 2, 4, 6}
    assert parse_cpulist("") == frozenset()
    with pytest.raises(ValueError):
        parse_cpulist("3-1")
    assert format_cpulist({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    assert parse_cpumask("00000000,000000ff") == set(range(8)) and parse_cpumask("5") == {0, 2}
    # Written back the way the file showed it: width and 32-bit groups.
    assert format_cpumask({0, 1}, like="ff") == "03"
    assert format_cpumask({0, 33}, like="00000000,000000ff") == "00000002,00000001"


# --- the domain and the config ----------------------------------------------------------------------------
def test_domain_reads_vcpupin_emulatorpin_iothreadpin_and_the_profile_attribute():
    cputune, vcpu = pins("2,6,3,7", emulator="0-1,^1", iothread="5")
    spec = parse_domain(domain_xml(vcpu=vcpu, cputune=cputune, isolate="yes"))
    assert spec.isolate is True
    assert spec.cpus.vcpus == {2, 3, 6, 7} and spec.cpus.emulator == {0} and spec.cpus.iothreads == {5}
    assert spec.cpus.pinned
    assert spec.cpus.describe() == "vCPUs 2-3,6-7, emulator 0, iothreads 5"


def test_domain_vcpu_cpuset_covers_unpinned_vcpus_and_the_emulator():
    xml = domain_xml(vcpu="<vcpu placement='static' cpuset='4-7'>4</vcpu>",
                     cputune="<cputune><vcpupin vcpu='0' cpuset='1'/></cputune>")
    cpus = parse_domain(xml).cpus
    assert cpus.vcpus == {1, 4, 5, 6, 7} and cpus.emulator == {4, 5, 6, 7}


def test_domain_without_pins_or_with_auto_placement_is_not_pinned():
    assert not parse_domain(domain_xml(vcpu="<vcpu>4</vcpu>")).cpus.pinned
    # Half the vCPUs pinned: the others float over every core.
    half = domain_xml(vcpu="<vcpu>2</vcpu>", cputune="<cputune><vcpupin vcpu='0' cpuset='2'/></cputune>")
    assert not parse_domain(half).cpus.pinned
    auto = parse_domain(domain_xml(vcpu="<vcpu placement='auto' cpuset='2-3'>2</vcpu>")).cpus
    assert auto.placement == "auto" and not auto.pinned


def test_domain_refuses_bad_cpusets_and_isolate_values():
    with pytest.raises(ConfigError, match=r"vcpupin 0 cpuset '2-x' cannot be read"):
        parse_domain(domain_xml(vcpu="<vcpu>1</vcpu>", cputune="<cputune><vcpupin vcpu='0' cpuset='2-x'/></cputune>"))
    with pytest.raises(ConfigError, match=r"isolate='maybe' must be 'yes' or 'no'"):
        parse_domain(domain_xml(isolate="maybe"))


@pytest.mark.parametrize(("text", "message"), [
    ("[cpu]\nisolate = \"yes\"\n", "janus.toml: cpu.isolate: 'yes' is not true or false"),
    ("[cpu]\ngovernor = \"perf ormance\"\n", "janus.toml: cpu.governor: 'perf ormance' is not a cpufreq governor name"),
    ("[cpu]\nisolated = true\n", "janus.toml: unknown key 'cpu.isolated'; did you mean cpu.isolate?"),
])
def test_cpu_config_is_checked(pinned, text, message):
    h = pinned(config=text)
    code, err = h.hook("win11", "prepare", "begin", vm_xml())
    assert code == 1 and message in err


# --- planning -------------------------------------------------------------------------------------------------
def _plan(h: FakeHost, xml: str):
    return h.janus().plan(parse_domain(xml))


def test_plan_lists_the_isolation_steps_after_the_gpu(pinned):
    h = pinned()
    plan = _plan(h, vm_xml(vcpus="2,6,3,7", hostdevs=hosts.NVIDIA_FUNCTIONS, mode="single-gpu"))
    assert plan.refusal is None
    text = plan.render().splitlines()
    first_cpu = next(i for i, line in enumerate(text) if "AllowedCPUs" in line)
    assert "bind 0000:01:00.3 to vfio-pci" in text[first_cpu - 1]
    assert text[first_cpu:first_cpu + 9] == [
        "  16. keep system.slice off cores 2-3,6-7 (AllowedCPUs, runtime)",
        "  17. keep user.slice off cores 2-3,6-7 (AllowedCPUs, runtime)",
        "  18. keep init.scope off cores 2-3,6-7 (AllowedCPUs, runtime)",
        "  19. set the cpufreq governor of cores 2-3,6-7 to performance",
        "  20. stop irqbalance.service while cores 2-3,6-7 are isolated",
        "  21. keep new IRQs off cores 2-3,6-7 (default_smp_affinity)",
        "  22. move IRQ affinities off cores 2-3,6-7",
        "  23. keep unbound workqueues off cores 2-3,6-7 (cpumask)",
        "  24. keep writeback flushers off cores 2-3,6-7 (cpumask)",
    ]
    # Both threads of cores 2 and 3 go to the VM: no SMT note.
    assert not any("SMT" in n for n in plan.notes)


@pytest.mark.parametrize(("cpu", "kinds"), [
    # The defaults: IRQs moved, governor and workqueue masks left alone.
    ("", ["restrict-unit-cpus"] * 3 + ["stop-irqbalance", "restrict-default-irq-affinity", "move-irqs"]),
    ("irqs = false\n", ["restrict-unit-cpus"] * 3),
    ("irqs = false\nworkqueues = true\n", ["restrict-unit-cpus"] * 3 + ["restrict-workqueues"] * 2),
    ("irqs = false\ngovernor = \"performance\"\n", ["restrict-unit-cpus"] * 3 + ["set-governor"]),
])
def test_each_cpu_key_adds_its_steps(pinned, cpu, kinds):
    h = pinned(config=FAST_TIMEOUTS + "\n[cpu]\n" + cpu)
    plan = _plan(h, vm_xml())
    assert [a.kind for a in plan.actions] == kinds
    assert h.hook("win11", "prepare", "begin", vm_xml()) == (0, "")
    state = h.janus().store.read("win11")
    assert [s.action.kind for s in state.steps] == kinds
    assert h.hook("win11", "release", "end", vm_xml()) == (0, "")


def test_plan_notes_smt_siblings_left_to_the_host(pinned):
    plan = _plan(pinned(), vm_xml(vcpus="2,3"))
    assert any("SMT siblings split between the VM and the host: cores 6-7" in n for n in plan.notes)


@pytest.mark.parametrize(("xml", "reason"), [
    (vm_xml(vcpus="2,9"), "VM 'win11' is pinned to cores 9, which this host does not have (cores 0-7)"),
    (vm_xml(vcpus="0,1,2,3,4,5,6,7"),
     "the pins of VM 'win11' (vCPUs 0-7) leave the host no core"),
    (domain_xml(mode="passthrough", vcpu="<vcpu>2</vcpu>", isolate="yes"),
     "VM 'win11' asks for CPU isolation, but its vCPUs are not pinned (no <vcpupin> or <vcpu cpuset>)"),
    (domain_xml(mode="passthrough", vcpu="<vcpu placement='auto'>2</vcpu>", isolate="yes"),
     "VM 'win11' asks for CPU isolation, but its vCPUs are placed by numad (placement='auto')"),
])
def test_plan_refuses_with_the_reason(pinned, xml, reason):
    h = pinned()
    before = h.snapshot()
    plan = _plan(h, xml)
    assert plan.refusal is not None and plan.refusal.startswith(reason)
    code, err = h.hook("win11", "prepare", "begin", xml)
    assert code == 1 and reason in err
    assert h.snapshot() == before and h.journal_vms() == []


def test_plan_refuses_an_offline_core(pinned):
    h = pinned(offline=(3,))
    assert _plan(h, vm_xml(vcpus="2,3")).refusal == "VM 'win11' is pinned to cores 3, which are offline"


def test_plan_refuses_a_per_vm_request_without_cgroup_v2_and_skips_a_host_wide_one(pinned, tmp_path):
    h = pinned(cgroup2=False)
    assert _plan(h, vm_xml()).refusal == ("VM 'win11' asks for CPU isolation, but this host has no cgroup v2 "
                                          "(unified) hierarchy")
    h.config(CPU_ALL + "isolate = true\n")
    plan = _plan(h, vm_xml(isolate=None))
    assert plan.refusal is None and plan.actions == ()
    assert plan.notes == ("CPU isolation (cpu.isolate) skipped: this host has no cgroup v2 (unified) hierarchy",)


def test_a_start_the_host_wide_setting_skips_says_why_in_the_hook_log(pinned):
    h = pinned(cgroup2=False, config=CPU_ALL + "isolate = true\n")
    before = h.snapshot()
    assert h.hook("win11", "prepare", "begin", vm_xml(isolate=None)) == (0, "")
    log = (h.root / "var/log/janus-hooks/hook.log").read_text()
    assert "VM win11: note: CPU isolation (cpu.isolate) skipped: this host has no cgroup v2 (unified) hierarchy" in log
    assert h.hook("win11", "release", "end", vm_xml(isolate=None)) == (0, "")
    assert [k for k in diff(before, h.snapshot()) if not k.startswith("var/log/")] == []


def test_host_wide_isolation_skips_unpinned_vms_and_a_vm_can_decline(pinned):
    h = pinned(config=CPU_ALL + "isolate = true\n")
    plan = _plan(h, domain_xml(mode="passthrough", vcpu="<vcpu>2</vcpu>"))
    assert plan.refusal is None and plan.actions == ()
    assert "skipped: its vCPUs are not pinned" in plan.notes[0]
    assert len(_plan(h, vm_xml(isolate=None)).actions) == 9
    assert _plan(h, vm_xml(isolate="no")).actions == ()


def test_toml_profile_asks_for_isolation(pinned):
    h = pinned()
    profile = h.root / "etc/janus-hooks/vms/win11.toml"
    profile.parent.mkdir(parents=True, exist_ok=True)
    profile.write_text('mode = "passthrough"\nisolate = true\n')
    xml = vm_xml(mode=None, isolate=None)
    assert "janus-hooks.org" not in xml
    assert len(_plan(h, xml).actions) == 9
    profile.write_text('mode = "passthrough"\nisolate = "yes"\n')
    assert "win11.toml: isolate: 'yes' is not true or false" in h.hook("win11", "prepare", "begin", xml)[1]


def test_emulator_on_the_housekeeping_cores_stays_shared(pinned):
    h = pinned()
    plan = _plan(h, vm_xml(vcpus="1,2,3,5,6,7", emulator="0,4"))
    assert plan.refusal is None
    assert plan.actions[0] == RestrictUnitCpus("win11", (1, 2, 3, 5, 6, 7), "system.slice")
    assert any("emulator and iothread cores 0,4 stay shared with the host" in n for n in plan.notes)
    # A dedicated emulator core is the VM's too.
    assert _plan(h, vm_xml(vcpus="2,6", emulator="3")).actions[0].cores == (2, 3, 6)


def test_governor_refusals_and_hosts_without_cpufreq(pinned, tmp_path):
    h = pinned(config=CPU_ALL.replace("performance", "schedutil"))
    assert _plan(h, vm_xml()).refusal == ("cpu.governor 'schedutil' is not available on core 2 "
                                          "(available: performance, powersave)")
    bare = pinned(root=tmp_path / "vm-host", governor=None)
    plan = _plan(bare, vm_xml())
    assert not any(isinstance(a, SetGovernor) for a in plan.actions)
    assert "cores 2,6 have no cpufreq: the performance governor is not set" in plan.notes


def test_without_systemd_the_top_level_cgroups_are_written_but_not_libvirts(pinned):
    h = pinned(systemd=False)
    plan = _plan(h, vm_xml())
    groups = [a.group for a in plan.actions if isinstance(a, RestrictCgroupCpus)]
    assert groups == ["openrc.sshd", "openrc.xdm"]
    assert not any(isinstance(a, (RestrictUnitCpus, StopIrqbalance)) for a in plan.actions)
    assert any("irqbalance (pid 700) runs without systemd" in n for n in plan.notes)
    before, state = h.snapshot(), host_state(h)
    assert h.hook("win11", "prepare", "begin", vm_xml()) == (0, "")
    assert h.read("sys/fs/cgroup/openrc.sshd/cpuset.cpus") == "0-1,3-5,7"
    assert h.read("sys/fs/cgroup/machine/cpuset.cpus") == ""
    assert h.hook("win11", "release", "end", vm_xml()) == (0, "")
    # The kernel keeps a populated group's cpuset non-empty (ENOSPC): sshd's group gets every online core,
    # the same cores "empty" meant; the empty group reads empty again.
    assert h.read("sys/fs/cgroup/openrc.sshd/cpuset.cpus") == "0-7"
    assert h.read("sys/fs/cgroup/openrc.xdm/cpuset.cpus") == ""
    assert diff(before, h.snapshot()) == ["sys/fs/cgroup/openrc.sshd/cpuset.cpus"]
    assert {k: v for k, v in host_state(h).items() if k != "cpuset openrc.sshd"} == {
        k: v for k, v in state.items() if k != "cpuset openrc.sshd"}


def test_without_systemd_a_cpuset_controller_that_is_off_is_named(pinned):
    h = pinned(systemd=False)
    (h.root / "sys/fs/cgroup/cgroup.subtree_control").write_text("cpu memory\n")
    assert "add +cpuset to the root cgroup's cgroup.subtree_control" in _plan(h, vm_xml()).refusal


# --- one VM: prepare and release -------------------------------------------------------------------------------
def test_one_vm_isolated_then_everything_reads_as_before(pinned):
    h = pinned()
    before, state = h.snapshot(), host_state(h)
    xml = vm_xml(vcpus="2,6", hostdevs=hosts.NVIDIA_FUNCTIONS, mode="single-gpu")
    assert h.hook("win11", "prepare", "begin", xml) == (0, "")
    during = host_state(h)
    # systemd prints CPU sets with spaces.
    assert {u: during[f"AllowedCPUs {u}"] for u in UNITS} == dict.fromkeys(UNITS, "0-1 3-5 7")
    assert during["cpuset system.slice"] == "0-1,3-5,7"
    assert during["sys/fs/cgroup/cgroup.subtree_control"] == "cpu io memory pids cpuset"
    assert during["irq 1"] == "0-1,3-5,7" and during["irq 16"] == "0-1"
    assert during["irq 121"] == "0-1,3-5,7", "an IRQ only on the VM's cores goes to the host's"
    assert during["irq 0"] == "0-7" and during["irq 124"] == "2", "the kernel keeps IRQs it refuses to move"
    assert during["proc/irq/default_smp_affinity"] == "bb"
    assert during["sys/devices/virtual/workqueue/cpumask"] == "bb"
    assert during["governor cpu2"] == during["governor cpu6"] == "performance"
    assert during["governor cpu3"] == "powersave"
    assert during["irqbalance"] == "inactive"
    assert h.hook("win11", "release", "end", xml) == (0, "")
    assert host_state(h) == state
    assert_restored(h, before)
    assert h.journal_vms() == []


def test_allowed_cpus_a_person_set_before_comes_back(pinned):
    h = pinned()
    h.services.set_unit_property("system.slice", "AllowedCPUs", "0-5", 1)
    state = host_state(h)
    assert h.hook("win11", "prepare", "begin", vm_xml()) == (0, "")
    assert h.services.unit_property("system.slice", "AllowedCPUs") == "0-1 3-5"
    assert h.hook("win11", "release", "end", vm_xml()) == (0, "")
    assert host_state(h) == state


# --- two VMs ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("first_out", ["alpha", "beta"])
def test_two_vms_pinning_different_cores_share_the_host_and_the_last_out_restores(pinned, first_out):
    h = pinned()
    before, state = h.snapshot(), host_state(h)
    xmls = {"alpha": vm_xml("alpha", vcpus="2"), "beta": vm_xml("beta", vcpus="3")}
    assert h.hook("alpha", "prepare", "begin", xmls["alpha"]) == (0, "")
    assert h.hook("beta", "prepare", "begin", xmls["beta"]) == (0, "")
    both = host_state(h)
    assert both["AllowedCPUs system.slice"] == "0-1 4-7"
    assert both["irq 1"] == "0-1,4-7" and both["irq 121"] == "0-1,4-7"
    assert both["proc/irq/default_smp_affinity"] == "f3"
    last_out = "beta" if first_out == "alpha" else "alpha"
    assert h.hook(first_out, "release", "end", xmls[first_out]) == (0, "")
    one = host_state(h)
    kept = "3" if last_out == "beta" else "2"
    expected = "0-2,4-7" if kept == "3" else "0-1,3-7"
    # The first release gives back its own core only, never the one the other VM still runs on.
    assert one["AllowedCPUs system.slice"] == one["AllowedCPUs init.scope"] == expected.replace(",", " ")
    assert one["irq 1"] == expected and one["sys/devices/virtual/workqueue/cpumask"] == ("f7" if kept == "3" else "fb")
    assert one["irq 122"] == ("0-2,4-7" if kept == "3" else "3"), "IRQ 122 was only on core 3 before"
    assert one["irqbalance"] == "inactive", "irqbalance stays stopped while a VM is isolated"
    assert one[f"governor cpu{kept}"] == "performance"
    assert h.hook(last_out, "release", "end", xmls[last_out]) == (0, "")
    assert host_state(h) == state
    assert_restored(h, before)


def test_a_second_vm_on_the_same_core_is_noted_and_cannot_take_the_last_core(pinned):
    h = pinned()
    assert h.hook("alpha", "prepare", "begin", vm_xml("alpha", vcpus="0,1,2,3,4,5")) == (0, "")
    plan = _plan(h, vm_xml("beta", vcpus="2,6"))
    assert plan.refusal is None and "cores 2 are also pinned by running VM 'alpha'" in plan.notes
    plan = _plan(h, vm_xml("beta", vcpus="6,7"))
    assert plan.refusal == ("the pins of VM 'beta' (vCPUs 6-7) and cores 0-5 held by other running VMs leave the "
                            "host no core")


def test_a_journal_from_before_a_reboot_holds_no_cores(pinned):
    h = pinned()
    assert h.hook("alpha", "prepare", "begin", vm_xml("alpha", vcpus="2,6")) == (0, "")
    # Reboot: the kernel and systemd forget, the journal stays until its release.
    fresh = pinned(root=h.root.parent / "rebooted")
    journal = h.root / "var/lib/janus-hooks/journal/alpha.jsonl"
    target = fresh.root / "var/lib/janus-hooks/journal/alpha.jsonl"
    target.parent.mkdir(mode=0o700, exist_ok=True)
    target.write_text(journal.read_text())
    target.chmod(0o600)
    (fresh.root / "proc/sys/kernel/random/boot_id").write_text(BOOT_ID.replace("b007", "b008") + "\n")
    state = host_state(fresh)
    plan = _plan(fresh, vm_xml("beta", vcpus="2,6"))
    assert plan.refusal is None and not any("also pinned" in n for n in plan.notes)
    assert fresh.hook("beta", "prepare", "begin", vm_xml("beta", vcpus="2,6")) == (0, "")
    assert fresh.hook("alpha", "release", "end", vm_xml("alpha")) == (0, "")
    assert fresh.services.unit_property("system.slice", "AllowedCPUs") == "0-1 3-5 7", "beta keeps its cores"
    assert fresh.hook("beta", "release", "end", vm_xml("beta")) == (0, "")
    assert host_state(fresh) == state


# --- crashes and faults -------------------------------------------------------------------------------------------
def _crash(tmp_path: Path, root: Path, vm: str, xml: str, event: str, step: int) -> None:
    xml_file = tmp_path / f"{vm}.xml"
    xml_file.write_text(xml)
    kill_hook_at(root, vm, xml_file, event, step, timeout=60)


def _nth_call_fails(nth: int):
    """A systemctl that fails its ``nth`` call only (a unit that would not take the change, a timeout)."""
    seen = [0]

    def fault(call: str, target: str) -> bool:
        seen[0] += 1
        return seen[0] == nth

    return fault


def _services_calls(h: FakeHost) -> int:
    return len(h.services.calls)


@pytest.mark.parametrize("event", ["intent", "applied"])
@pytest.mark.parametrize(("systemd", "other_running"), [(True, False), (True, True), (False, False), (False, True)])
def test_kill_9_at_every_isolation_point_then_release_restores(pinned, tmp_path, event, systemd, other_running):
    xml = vm_xml(vcpus="2,6")
    other = vm_xml("other", vcpus="3")
    steps = len(_plan(pinned(root=tmp_path / "probe", systemd=systemd), xml).actions)
    # systemd: AllowedCPUs x3, governor, irqbalance, default IRQ affinity, IRQs, 2 workqueue masks;
    # without it: the two top-level groups' cpuset.cpus instead of the units, no irqbalance unit to stop.
    assert steps == (9 if systemd else 7)
    for step in range(steps):
        h = pinned(root=tmp_path / f"{event}-{step}", systemd=systemd)
        before, state = h.snapshot(), host_state(h)
        if other_running:
            assert h.hook("other", "prepare", "begin", other) == (0, "")
            state_other = host_state(h)
        _crash(tmp_path, h.root, "win11", xml, event, step)
        assert "win11" in h.journal_vms()
        code, err = h.hook("win11", "release", "end", xml)
        assert code == 0, f"{event} {step}: {err}"
        if other_running:
            assert host_state(h) == state_other, f"{event} {step}"
            assert h.hook("other", "release", "end", other) == (0, "")
        assert_back(h, before, state, (event, step))
        assert h.journal_vms() == []


def test_kill_9_then_the_next_start_recovers_first(pinned, tmp_path):
    h = pinned()
    before, state = h.snapshot(), host_state(h)
    xml = vm_xml(vcpus="2,6")
    _crash(tmp_path, h.root, "win11", xml, "applied", 6)  # IRQs moved, workqueues not yet
    assert h.services.unit_property("system.slice", "AllowedCPUs") == "0-1 3-5 7"
    # libvirt may not have called release end (libvirtd killed with it): the next prepare undoes first.
    assert h.hook("win11", "prepare", "begin", xml) == (0, "")
    assert len(h.janus().store.read("win11").steps) == 9
    assert h.hook("win11", "release", "end", xml) == (0, "")
    assert host_state(h) == state
    assert_restored(h, before)


@pytest.mark.parametrize("systemd", [True, False])
def test_fault_at_every_kernel_write_and_systemctl_call_rolls_back(pinned, tmp_path, systemd):
    xml = vm_xml(vcpus="2,6")
    probe = pinned(root=tmp_path / "probe", systemd=systemd)
    assert probe.hook("win11", "prepare", "begin", xml) == (0, "")
    writes, calls = probe.kernel.ops, _services_calls(probe)
    if systemd:
        # show and set-property for each of the three units, stop irqbalance.
        assert writes >= 10 and {c[0] for c in probe.services.calls} == {"show", "set-property", "stop"}
    else:
        assert writes >= 8 and calls == 0
    faults = [("kernel", n) for n in range(1, writes + 1)] + [("systemctl", n) for n in range(1, calls + 1)]
    for where, nth in faults:
        h = pinned(root=tmp_path / f"fault-{where}-{nth}", systemd=systemd)
        before, state = h.snapshot(), host_state(h)
        if where == "kernel":
            h.kernel = FakeKernel(h.root, fail_at=nth)
        else:
            h.services = FakeServices(h.root, fault=_nth_call_fails(nth))
        code, err = h.hook("win11", "prepare", "begin", xml)
        assert code == 1 and "injected fault" in err and "\n" not in err, (where, nth, err)
        h.kernel, h.services = FakeKernel(h.root), FakeServices(h.root)
        assert_back(h, before, state, (where, nth))
        assert h.journal_vms() == []


@pytest.mark.parametrize("systemd", [True, False])
def test_fault_during_release_keeps_the_journal_until_a_later_release(pinned, tmp_path, systemd):
    xml = vm_xml(vcpus="2,6")
    probe = pinned(root=tmp_path / "probe", systemd=systemd)
    assert probe.hook("win11", "prepare", "begin", xml) == (0, "")
    start, calls_start = probe.kernel.ops, _services_calls(probe)
    assert probe.hook("win11", "release", "end", xml) == (0, "")
    writes, calls = probe.kernel.ops - start, _services_calls(probe) - calls_start
    assert writes >= 8
    if systemd:
        # Each unit read and given back, irqbalance started again.
        assert {c[0] for c in probe.services.calls[calls_start:]} == {"show", "set-property", "start"}
    faults = [("kernel", n) for n in range(1, writes + 1)] + [("systemctl", n) for n in range(1, calls + 1)]
    for where, nth in faults:
        h = pinned(root=tmp_path / f"release-fault-{where}-{nth}", systemd=systemd)
        before, state = h.snapshot(), host_state(h)
        assert h.hook("win11", "prepare", "begin", xml) == (0, "")
        if where == "kernel":
            h.kernel = FakeKernel(h.root, fail_at=nth)
        else:
            h.services = FakeServices(h.root, fault=_nth_call_fails(nth))
        code, err = h.hook("win11", "release", "end", xml)
        assert code == 1 and "could not be reverted" in err and "\n" not in err, (where, nth, err)
        assert h.journal_vms() == ["win11"]
        h.kernel, h.services = FakeKernel(h.root), FakeServices(h.root)
        assert h.hook("win11", "release", "end", xml) == (0, ""), (where, nth)
        assert_back(h, before, state, (where, nth))


class SystemdThatDoesNotApply(FakeServices):
    """systemd that records user.slice's AllowedCPUs (drop-in, exit 0) but never writes its cgroup: what the
    kernel enforces is what a step must wait for, not what systemd says."""

    def set_unit_property(self, unit: str, name: str, value: str, timeout: float) -> None:
        if unit != "user.slice":
            super().set_unit_property(unit, name, value, timeout)
            return
        self._call("set-property", f"{unit} {name}={value}")
        (self.root / DROPINS / f"{unit}.d").mkdir(parents=True, exist_ok=True)
        (self.root / DROPINS / f"{unit}.d" / f"50-{name}.conf").write_text(f"[Slice]\n{name}={value}\n")


def test_allowed_cpus_systemd_accepts_but_the_kernel_never_applies_is_refused_and_undone(pinned):
    h = pinned()
    before, state = h.snapshot(), host_state(h)
    h.services = SystemdThatDoesNotApply(h.root)
    code, err = h.hook("win11", "prepare", "begin", vm_xml(vcpus="2,6"))
    assert code == 1 and "\n" not in err
    assert "AllowedCPUs of user.slice becoming 0-1,3-5,7 (now '')" in err and "did not happen within" in err
    h.services = FakeServices(h.root)
    assert host_state(h) == state
    assert_restored(h, before)
    assert h.journal_vms() == []


def test_irqs_the_kernel_refuses_are_recorded_and_left_alone(pinned):
    h = pinned()
    assert h.hook("win11", "prepare", "begin", vm_xml(vcpus="2,6")) == (0, "")
    state = h.janus().store.read("win11")
    moves = [s for s in state.steps if isinstance(s.action, MoveIrqs)]
    assert moves[0].old["refused"] == [0, 2, 124]
    assert h.read("proc/irq/124/smp_affinity_list") == "2"


def test_after_a_reboot_the_isolation_steps_are_recognised_as_gone(pinned, tmp_path):
    h = pinned()
    assert h.hook("win11", "prepare", "begin", vm_xml()) == (0, "")
    rebooted = pinned(root=tmp_path / "after-reboot")
    (rebooted.root / "proc/sys/kernel/random/boot_id").write_text(BOOT_ID.replace("b007", "b009") + "\n")
    journal = rebooted.root / "var/lib/janus-hooks/journal"
    journal.mkdir(mode=0o700, exist_ok=True)
    (journal / "win11.jsonl").write_text((h.root / "var/lib/janus-hooks/journal/win11.jsonl").read_text())
    (journal / "win11.jsonl").chmod(0o600)
    fresh = rebooted.snapshot()
    report = rebooted.janus().release("win11")
    assert report.skipped_after_reboot == 9 and report.reverted == 0
    assert rebooted.kernel.ops == 0 and rebooted.services.calls == []
    assert rebooted.snapshot() == fresh


# --- check --------------------------------------------------------------------------------------------------------
def _cpu_checks(h: FakeHost) -> list[tuple[str, str, str]]:
    from janus_hooks.check import Probe, run_check

    janus = h.janus()
    report = run_check(janus.host, Probe(h.runner, h.services, live=False))
    return [(c.name, c.status, c.detail) for c in report.checks if c.name in ("isolation", "pinning", "smt", "shared")]


def test_check_reports_running_vms_pins_smt_splits_and_shared_cores(pinned):
    h = pinned()
    assert _cpu_checks(h) == [("isolation", "ok", "cgroup v2, systemd AllowedCPUs on system.slice, user.slice, "
                                                  "init.scope; 8 cores online (0-7); per VM (isolate=\"yes\")")]
    assert h.hook("alpha", "prepare", "begin", vm_xml("alpha", vcpus="2,3")) == (0, "")
    assert h.hook("beta", "prepare", "begin", vm_xml("beta", vcpus="3,7")) == (0, "")
    assert _cpu_checks(h)[1:] == [
        ("pinning", "ok", "VM 'alpha' runs isolated on cores 2-3; the host keeps 0-1,4-6"),
        ("smt", "warn", "VM 'alpha': SMT siblings 6-7 of its cores stay with the host (they share caches and "
                        "pipelines with the VM)"),
        # Cores 3 and 7 are one physical core's two threads: nothing split.
        ("pinning", "ok", "VM 'beta' runs isolated on cores 3,7; the host keeps 0-1,4-6"),
        ("shared", "warn", "cores 3 are pinned by both running VMs 'alpha' and 'beta'"),
    ]


def test_check_is_silent_without_cgroup_v2_unless_isolation_is_asked_for(pinned, tmp_path):
    h = pinned(cgroup2=False)
    assert _cpu_checks(h) == []
    h.config(CPU_ALL + "isolate = true\n")
    assert _cpu_checks(h) == [("isolation", "warn", "cpu.isolate is on, but this host has no cgroup v2 (unified) "
                                                    "hierarchy: VMs start without CPU isolation")]


def qemu(h: FakeHost, pid: int, vm: str, vcpus: dict[int, str]) -> None:
    """A running QEMU for ``vm`` as libvirt starts it: its vCPU threads ("CPU n/KVM") and the cores the
    kernel lets each run on; an I/O thread that may run anywhere."""
    from tests.fake.world import spawn_process, write

    spawn_process(h.root, {"pid": pid, "comm": "qemu-system-x86", "fds": []})
    (h.root / f"proc/{pid}/cmdline").write_bytes(
        f"/usr/bin/qemu-system-x86_64\0-name\0guest={vm},debug-threads=on\0".encode())
    threads = {pid: ("qemu-system-x86", "0-7")} | {pid + 1 + n: (f"CPU {n}/KVM", cores) for n, cores in vcpus.items()}
    for tid, (comm, cores) in threads.items():
        write(h.root / f"proc/{pid}/task/{tid}/comm", comm + "\n")
        write(h.root / f"proc/{pid}/task/{tid}/status", f"Name:\t{comm}\nCpus_allowed_list:\t{cores}\n")


def test_check_reads_where_running_vms_vcpu_threads_may_run(pinned):
    h = pinned()
    # alpha isolated on 2-3; beta managed but not isolated, pinned to 3 and 7; gamma managed, not pinned.
    assert h.hook("alpha", "prepare", "begin", vm_xml("alpha", vcpus="2,3")) == (0, "")
    assert h.hook("beta", "prepare", "begin", vm_xml("beta", vcpus="3,7", isolate="no")) == (0, "")
    gamma = domain_xml("gamma", mode="passthrough", vcpu="<vcpu>2</vcpu>")
    assert h.hook("gamma", "prepare", "begin", gamma) == (0, "")
    assert sorted(h.journal_vms()) == ["alpha", "beta", "gamma"]
    qemu(h, 5000, "alpha", {0: "2", 1: "3"})
    qemu(h, 5100, "beta", {0: "3", 1: "7"})
    qemu(h, 5200, "gamma", {0: "0-7", 1: "0-7"})
    assert _cpu_checks(h)[1:] == [
        ("pinning", "ok", "VM 'alpha' runs isolated on cores 2-3; the host keeps 0-1,4-7"),
        ("smt", "warn", "VM 'alpha': SMT siblings 6-7 of its cores stay with the host (they share caches and "
                        "pipelines with the VM)"),
        ("pinning", "ok", "VM 'beta' runs its vCPUs on cores 3,7, not isolated: the host's work may run there too"),
        ("shared", "warn", "cores 3 are pinned by both running VMs 'alpha' and 'beta'"),
    ]
    # alpha's vCPU threads were let onto other cores behind janus-hooks' back (virsh vcpupin on a live VM).
    qemu(h, 5000, "alpha", {0: "2", 1: "1-3"})
    assert ("pinning", "warn", "VM 'alpha': its vCPU threads may also run on cores 1, outside the cores isolated "
                               "for it (were its pins changed while it runs?)") in _cpu_checks(h)
    # A QEMU gone, or a journal from before a reboot: not running, nothing said about its pins.
    for pid in (5000, 5100, 5200):
        for path in sorted((h.root / f"proc/{pid}").rglob("*"), reverse=True):
            path.unlink() if not path.is_dir() or path.is_symlink() else path.rmdir()
    assert [c[0] for c in _cpu_checks(h)] == ["isolation", "pinning", "smt"]  # alpha's journal still claims 2-3


def test_check_without_cgroup_v2_still_reports_a_pinned_running_vm(pinned):
    h = pinned(cgroup2=False)
    assert h.hook("beta", "prepare", "begin", vm_xml("beta", vcpus="3,7", isolate="no")) == (0, "")
    assert _cpu_checks(h) == []
    qemu(h, 5100, "beta", {0: "3", 1: "7"})
    assert _cpu_checks(h) == [
        ("pinning", "ok", "VM 'beta' runs its vCPUs on cores 3,7, not isolated: the host's work may run there too")]
