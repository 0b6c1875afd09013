"""The planner's CPU isolation steps: which host work leaves the VM's pinned cores, or why it cannot. Pure.

Who asks: the VM itself (``<janus:profile isolate="yes">`` or ``isolate = true`` in its TOML: refused when it
cannot be done), or the host (``[cpu] isolate = true``: a VM it cannot be done for starts without it, with a
note). A VM saying ``isolate="no"`` is never isolated.

The VM's cores are where libvirt runs its vCPUs, emulator and iothreads. When all three together would
leave the host no core but the vCPUs alone do not, the emulator and iothreads share the host's cores (the
usual layout: vCPUs on their own cores, the emulator on the housekeeping cores).
"""

from __future__ import annotations

from janus_hooks.actions import (
    Action,
    MoveIrqs,
    RestrictCgroupCpus,
    RestrictDefaultIrqAffinity,
    RestrictUnitCpus,
    RestrictWorkqueues,
    SetGovernor,
    StopIrqbalance,
)
from janus_hooks.actions.cpu import IRQBALANCE_UNIT, MACHINE_GROUPS, SYSTEMD_GROUPS
from janus_hooks.config import Config
from janus_hooks.cpuset import format_cpulist
from janus_hooks.domain import DomainSpec
from janus_hooks.errors import PlanRefused
from janus_hooks.schema import quote
from janus_hooks.snapshot import CpuState, HostSnapshot


def wants_isolation(spec: DomainSpec, config: Config) -> bool:
    """Whether a start of ``spec`` will look at CPU isolation (the snapshot then reads the CPU state)."""
    return config.isolates(spec.isolate)


def isolation_steps(spec: DomainSpec, config: Config, snap: HostSnapshot) -> tuple[list[Action], list[str]]:
    """The steps that isolate ``spec``'s cores, and notes; raises PlanRefused with the reason."""
    if not wants_isolation(spec, config):
        return [], []
    cpu = snap.cpu
    if cpu is None:
        raise PlanRefused("CPU isolation was planned without reading the host's CPUs")
    vm, own = quote(spec.name), spec.isolate is True
    why_not = _unsupported(spec, cpu)
    if why_not:
        if own:
            raise PlanRefused(f"VM {vm} asks for CPU isolation, but {why_not}")
        return [], [f"CPU isolation (cpu.isolate) skipped: {why_not}"]
    notes: list[str] = []
    cores = _vm_cores(spec, cpu, notes)
    ordered = tuple(sorted(cores))
    steps: list[Action] = []
    steps += _cgroup_steps(spec, snap.systemd, cpu, ordered)
    if config.cpu.governor:
        steps += _governor(spec, config.cpu.governor, cpu, ordered, notes)
    if config.cpu.irqs:
        if IRQBALANCE_UNIT in snap.existing_units and snap.systemd:
            steps.append(StopIrqbalance(spec.name, ordered))
        elif cpu.irqbalance_pid is not None:
            notes.append(f"irqbalance (pid {cpu.irqbalance_pid}) runs without systemd and may move IRQs back "
                         "onto the VM's cores; ban them in its IRQBALANCE_BANNED_CPULIST")
        if cpu.default_irq_affinity:
            steps.append(RestrictDefaultIrqAffinity(spec.name, ordered))
        steps.append(MoveIrqs(spec.name, ordered))
    if config.cpu.workqueues:
        steps += [RestrictWorkqueues(spec.name, ordered, name) for name in cpu.workqueue_masks]
    notes += _smt_notes(cores, cpu)
    for other, theirs in sorted(cpu.claims.items()):
        if theirs & cores:
            notes.append(f"cores {format_cpulist(theirs & cores)} are also pinned by running VM {other!r}")
    return steps, notes


def _unsupported(spec: DomainSpec, cpu: CpuState) -> str | None:
    if not cpu.cgroup2:
        return "this host has no cgroup v2 (unified) hierarchy"
    if spec.cpus.placement == "auto":
        return "its vCPUs are placed by numad (placement='auto'), so their cores are not known before the start"
    if not spec.cpus.pinned:
        return "its vCPUs are not pinned (no <vcpupin> or <vcpu cpuset>)"
    return None


def _vm_cores(spec: DomainSpec, cpu: CpuState, notes: list[str]) -> frozenset[int]:
    pins = spec.cpus
    every = pins.vcpus | pins.emulator | pins.iothreads
    missing = every - cpu.present
    if missing:
        raise PlanRefused(f"VM {quote(spec.name)} is pinned to cores {format_cpulist(missing)}, which this host does "
                          f"not have (cores {format_cpulist(cpu.present)})")
    offline = every - cpu.online
    if offline:
        raise PlanRefused(f"VM {quote(spec.name)} is pinned to cores {format_cpulist(offline)}, which are offline")
    held = frozenset().union(*cpu.claims.values()) if cpu.claims else frozenset()
    if cpu.online - every - held:
        return every
    if pins.emulator | pins.iothreads and cpu.online - pins.vcpus - held:
        shared = (pins.emulator | pins.iothreads) - pins.vcpus
        notes.append(f"the emulator and iothread cores {format_cpulist(shared)} stay shared with the host "
                     "(isolating them too would leave the host no core)")
        return pins.vcpus
    others = f" and cores {format_cpulist(held)} held by other running VMs" if held else ""
    raise PlanRefused(f"the pins of VM {quote(spec.name)} ({pins.describe()}){others} leave the host no core")


def _cgroup_steps(spec: DomainSpec, systemd: bool, cpu: CpuState, cores: tuple[int, ...]) -> list[Action]:
    if systemd:
        return [RestrictUnitCpus(spec.name, cores, unit) for unit in SYSTEMD_GROUPS]
    if "cpuset" not in cpu.root_controllers:
        raise PlanRefused(f"CPU isolation of VM {quote(spec.name)} needs the cpuset controller for the top-level "
                          "cgroups: add +cpuset to the root cgroup's cgroup.subtree_control")
    groups = [g for g in cpu.cpuset_groups if g not in MACHINE_GROUPS]
    return [RestrictCgroupCpus(spec.name, cores, group) for group in groups]


def _governor(spec: DomainSpec, governor: str, cpu: CpuState, cores: tuple[int, ...],
              notes: list[str]) -> list[Action]:
    without = [c for c in cores if c not in cpu.governors]
    if without:
        notes.append(f"cores {format_cpulist(without)} have no cpufreq: the {governor} governor is not set")
        return []
    for core in cores:
        if governor not in cpu.available_governors.get(core, ()):
            raise PlanRefused(f"cpu.governor {governor!r} is not available on core {core} (available: "
                              f"{', '.join(cpu.available_governors.get(core, ())) or 'none'})")
    if all(cpu.governors[c] == governor for c in cores):
        notes.append(f"cores {format_cpulist(cores)} already use the {governor} governor")
        return []
    return [SetGovernor(spec.name, cores, governor)]


def _smt_notes(cores: frozenset[int], cpu: CpuState) -> list[str]:
    """SMT siblings of the VM's cores that stay with the host: both share one core's caches and pipeline."""
    split = sorted({s for c in cores for s in cpu.siblings.get(c, frozenset()) if s not in cores})
    if not split:
        return []
    return [f"SMT siblings split between the VM and the host: cores {format_cpulist(split)} share a physical "
            f"core with the VM's cores {format_cpulist(cores)}; pin both threads of each core to the VM"]
