"""CPU isolation: host work moved off the cores a running VM is pinned to, and given back when it stops.

The host-wide settings here (systemd's AllowedCPUs, top-level cpuset.cpus, IRQ affinities, the default IRQ
affinity, workqueue cpumasks, irqbalance) are shared by every running VM. So each step is computed from all
open journals, not from its own VM alone:
- its captured ``original`` is the value before *any* VM narrowed it: a step inherits it from another open
  journal's step on the same setting, or reads the host when it is the first;
- applying gives the host ``original`` minus the cores of every VM whose journal is open (this boot), as
  captured (``held``): the engine holds the host-wide lock from capture to verify, so they cannot change;
- reverting gives the host ``original`` minus the cores of the VMs still running, or ``original`` itself
  when this was the last one. One VM's release never gives back cores another still uses.
Nothing here outlives a reboot (runtime-only systemd properties, kernel state), so the journal's
reboot rule drops these steps.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from janus_hooks.actions.base import Action, Context, wait_until
from janus_hooks.cpuset import format_cpulist, format_cpumask, parse_cpulist, parse_cpumask
from janus_hooks.errors import KernelError, StepFailed
from janus_hooks.schema import (
    CGROUP,
    CPU_SET,
    GOVERNOR,
    UNIT,
    VM_NAME,
    boolean,
    integer,
    list_of,
    mapping,
    pattern,
)

log = logging.getLogger(__name__)

IRQBALANCE_UNIT = "irqbalance.service"
SYSTEMD_GROUPS = ("system.slice", "user.slice", "init.scope")
# libvirt's own top-level groups: the VMs run there and must keep their cores.
MACHINE_GROUPS = ("machine", "machine.slice")


# Journal schemas shared by the steps below (see Action.schema).
CORES = list_of(integer(0, 65535), 65536)
SHARED = {"vm": VM_NAME, "cores": CORES}
CPU_SET_OLD = {"original": CPU_SET, "value": CPU_SET, "target": CPU_SET, "held": CORES}
IRQ = pattern(r"[0-9]{1,6}", "an IRQ number")


def _cores(cores: tuple[int, ...]) -> str:
    return format_cpulist(cores)


@dataclass(frozen=True)
class SharedCpuStep(Action):
    """A host-wide setting narrowed while VMs run; see the module docstring for how it is computed."""

    vm: str
    cores: tuple[int, ...]  # the cores this VM keeps for itself

    def held_cpus(self) -> frozenset[int]:
        return frozenset(self.cores)

    def setting(self) -> str:
        """What this step changes, the same in every VM's journal (steps on one setting share an original)."""
        return self.kind

    def _elsewhere(self, ctx: Context) -> tuple[frozenset[int], dict[str, Any] | None]:
        """Cores other running VMs hold, and the captured state of another open step on this setting."""
        # Imported here: the journal imports the actions package, which loads this module on demand.
        from janus_hooks.journal import JournalStore

        held: set[int] = set()
        inherited = None
        for _vm, step in JournalStore(ctx.host.state_dir()).open_steps(self.vm, ctx.host.boot_id()):
            held |= step.action.held_cpus()
            if (isinstance(step.action, SharedCpuStep) and step.action.setting() == self.setting()
                    and "original" in step.old):
                inherited = step.old
        return frozenset(held), inherited


@dataclass(frozen=True)
class _CpuSetStep(SharedCpuStep):
    """One value that names a CPU set (a list or a mask)."""

    def _read(self, ctx: Context) -> str | None:
        raise NotImplementedError

    def _write(self, ctx: Context, value: str) -> None:
        raise NotImplementedError

    def _parse(self, ctx: Context, value: str) -> frozenset[int]:
        raise NotImplementedError

    def _format(self, cpus: frozenset[int], like: str) -> str:
        raise NotImplementedError

    def _where(self, ctx: Context) -> str:
        raise NotImplementedError

    def _effective(self, ctx: Context) -> str | None:
        """What the kernel enforces now, in this step's spelling (the value itself by default)."""
        return self._read(ctx)

    def capture(self, ctx: Context) -> dict[str, Any]:
        current = self._read(ctx)
        if current is None:
            raise StepFailed(f"{self._where(ctx)} cannot be read")
        held, inherited = self._elsewhere(ctx)
        return {"original": inherited["original"] if inherited else current, "value": current,
                "held": sorted(held)}

    def _target(self, ctx: Context, original: str, held: frozenset[int], ours: bool) -> frozenset[int]:
        excluded = held | (set(self.cores) if ours else set())
        return self._parse(ctx, original) & (ctx.host.cpus_online() - excluded)

    def apply(self, ctx: Context, old: dict[str, Any]) -> dict[str, Any]:
        held = frozenset(old["held"])
        target = self._target(ctx, old["original"], held, ours=True)
        if not target:
            raise StepFailed(f"{self._where(ctx)}: cores {_cores(self.cores)} of VM {self.vm!r} and "
                             f"{format_cpulist(held) or 'none'} of other VMs would leave the host no core")
        value = self._format(target, old["value"])
        self._write(ctx, value)
        return {"target": format_cpulist(target)}

    def verify(self, ctx: Context, old: dict[str, Any]) -> None:
        target = self._target(ctx, old["original"], frozenset(old["held"]), ours=True)
        self._wait_for(ctx, target)

    def _wait_for(self, ctx: Context, target: frozenset[int]) -> None:
        def reached() -> bool:
            value = self._effective(ctx)
            return value is not None and self._parse(ctx, value) & ctx.host.cpus_online() == target

        wait_until(ctx, reached, ctx.config.timeouts.driver,
                   f"{self._where(ctx)} becoming {format_cpulist(target)} (now {self._effective(ctx)!r})")

    def revert(self, ctx: Context, old: dict[str, Any]) -> None:
        original = old.get("original")
        if original is None:
            return
        held, _ = self._elsewhere(ctx)
        current = self._read(ctx)
        if current is None:
            return
        if not held:
            # The last VM out: the captured original, exactly as it was spelled.
            if current != original:
                self._write(ctx, original)
            return
        target = self._target(ctx, original, held, ours=False)
        if self._parse(ctx, current) & ctx.host.cpus_online() != target:
            self._write(ctx, self._format(target, current))
            self._wait_for(ctx, target)


@dataclass(frozen=True)
class _CpuListStep(_CpuSetStep):
    """A cgroup cpuset in cpulist form, where empty means no restriction of its own (all online cores)."""

    def _parse(self, ctx: Context, value: str) -> frozenset[int]:
        return parse_cpulist(value) if value else ctx.host.cpus_online()

    def _format(self, cpus: frozenset[int], like: str) -> str:
        return format_cpulist(cpus)


@dataclass(frozen=True)
class RestrictUnitCpus(_CpuListStep):
    """systemd's ``AllowedCPUs`` of one top-level unit (system.slice, user.slice, init.scope), runtime only."""

    kind = "restrict-unit-cpus"
    schema = {**SHARED, "unit": UNIT}
    old_schema = CPU_SET_OLD
    unit: str = ""

    def describe(self) -> str:
        return f"keep {self.unit} off cores {_cores(self.cores)} (AllowedCPUs, runtime)"

    def setting(self) -> str:
        return f"{self.kind}:{self.unit}"

    def _where(self, ctx: Context) -> str:
        return f"AllowedCPUs of {self.unit}"

    def _read(self, ctx: Context) -> str | None:
        return ctx.services.unit_property(self.unit, "AllowedCPUs")

    def _write(self, ctx: Context, value: str) -> None:
        ctx.services.set_unit_property(self.unit, "AllowedCPUs", value, ctx.config.timeouts.unit_stop)

    def _effective(self, ctx: Context) -> str | None:
        # The kernel's side, not systemd's word: the unit's cgroup as systemd configured it.
        return ctx.host.cgroup_cpus(self.unit)


@dataclass(frozen=True)
class RestrictCgroupCpus(_CpuListStep):
    """``cpuset.cpus`` of one top-level cgroup, written directly (cgroup v2 hosts without systemd)."""

    kind = "restrict-cgroup-cpus"
    schema = {**SHARED, "group": CGROUP}
    old_schema = CPU_SET_OLD
    group: str = ""

    def describe(self) -> str:
        return f"keep cgroup /{self.group} off cores {_cores(self.cores)} (cpuset.cpus)"

    def setting(self) -> str:
        return f"{self.kind}:{self.group}"

    def _where(self, ctx: Context) -> str:
        return str(ctx.host.cgroup_cpus_path(self.group))

    def _read(self, ctx: Context) -> str | None:
        return ctx.host.cgroup_cpus(self.group)

    def _write(self, ctx: Context, value: str) -> None:
        path = ctx.host.cgroup_cpus_path(self.group)
        try:
            # An empty cpuset.cpus means "the parent's cores" in cgroup v2; the kernel takes "\n" for it.
            ctx.host.kernel.write(path, value or "\n")
        except KernelError as err:
            if value or err.errno != errno.ENOSPC:
                raise
            # Seen on 6.1: a group with processes in it may not go back to an empty cpuset (ENOSPC). The
            # parent of a top-level group is the root, whose cores are every online core: the same cores.
            every = format_cpulist(ctx.host.cpus_online())
            log.info("%s cannot be emptied while processes are in it: set to every online core (%s)", path, every)
            ctx.host.kernel.write(path, every)


@dataclass(frozen=True)
class _MaskFileStep(_CpuSetStep):
    """A kernel file holding a hex CPU mask."""

    def _path(self, ctx: Context) -> Path:
        raise NotImplementedError

    def _where(self, ctx: Context) -> str:
        return str(self._path(ctx))

    def _read(self, ctx: Context) -> str | None:
        return ctx.host.read_value(self._path(ctx))

    def _write(self, ctx: Context, value: str) -> None:
        ctx.host.kernel.write(self._path(ctx), value)

    def _parse(self, ctx: Context, value: str) -> frozenset[int]:
        return parse_cpumask(value)

    def _format(self, cpus: frozenset[int], like: str) -> str:
        return format_cpumask(cpus, like)


@dataclass(frozen=True)
class RestrictDefaultIrqAffinity(_MaskFileStep):
    """``/proc/irq/default_smp_affinity``: where IRQs registered from now on may go."""

    kind = "restrict-default-irq-affinity"
    schema = SHARED
    old_schema = CPU_SET_OLD

    def describe(self) -> str:
        return f"keep new IRQs off cores {_cores(self.cores)} (default_smp_affinity)"

    def _path(self, ctx: Context) -> Path:
        return ctx.host.default_irq_affinity_path()


@dataclass(frozen=True)
class RestrictWorkqueues(_MaskFileStep):
    """The unbound workqueues' cpumask (``workqueue``) or the writeback flushers' (``writeback``)."""

    kind = "restrict-workqueues"
    schema = {**SHARED, "name": pattern("workqueue|writeback", "workqueue or writeback")}
    old_schema = CPU_SET_OLD
    name: str = "workqueue"

    def describe(self) -> str:
        what = "writeback flushers" if self.name == "writeback" else "unbound workqueues"
        return f"keep {what} off cores {_cores(self.cores)} (cpumask)"

    def setting(self) -> str:
        return f"{self.kind}:{self.name}"

    def _path(self, ctx: Context) -> Path:
        return ctx.host.workqueue_mask_path(self.name)


@dataclass(frozen=True)
class MoveIrqs(SharedCpuStep):
    """Every IRQ's ``smp_affinity_list`` off the VM's cores; IRQs the kernel will not move (EIO: managed
    and per-CPU interrupts) are left where they are."""

    kind = "move-irqs"
    schema = SHARED
    old_schema = {"original": mapping(IRQ, CPU_SET, 65536), "refused": list_of(integer(0, 1 << 20), 65536),
                  "held": CORES}

    def describe(self) -> str:
        return f"move IRQ affinities off cores {_cores(self.cores)}"

    def capture(self, ctx: Context) -> dict[str, Any]:
        held, inherited = self._elsewhere(ctx)
        earlier = inherited["original"] if inherited else {}
        original = {}
        for irq in ctx.host.irqs():
            value = ctx.host.irq_affinity(irq)
            if value is not None:
                # An IRQ registered since the first VM started: its current value is its original.
                original[str(irq)] = earlier.get(str(irq), value)
        return {"original": original, "held": sorted(held)}

    def _target(self, ctx: Context, original: str, excluded: frozenset[int]) -> frozenset[int]:
        online = ctx.host.cpus_online()
        target = parse_cpulist(original) & (online - excluded)
        # An IRQ pinned only to the VM's cores goes to the host's cores.
        return target or online - excluded

    def apply(self, ctx: Context, old: dict[str, Any]) -> dict[str, Any]:
        excluded = frozenset(old["held"]) | set(self.cores)
        refused = []
        for irq, original in old["original"].items():
            current = ctx.host.irq_affinity(int(irq))
            if current is None or not parse_cpulist(current) & excluded:
                continue
            target = self._target(ctx, original, excluded)
            if not self._move(ctx, int(irq), target):
                refused.append(int(irq))
                continue
            now = ctx.host.irq_affinity(int(irq))
            if now is None or parse_cpulist(now) != target:
                raise StepFailed(f"IRQ {irq} did not move to cores {format_cpulist(target)} (now {now!r})")
        if refused:
            log.info("VM %s: the kernel keeps IRQs %s where they are", self.vm, ", ".join(map(str, refused)))
        return {"refused": refused}

    def _move(self, ctx: Context, irq: int, target: frozenset[int]) -> bool:
        """Write one IRQ's affinity; False when the kernel refuses to move that IRQ at all."""
        try:
            ctx.host.kernel.write(ctx.host.irq_affinity_path(irq), format_cpulist(target))
        except KernelError as err:
            if err.errno == errno.EIO:
                return False
            raise
        return True

    def revert(self, ctx: Context, old: dict[str, Any]) -> None:
        held, _ = self._elsewhere(ctx)
        for irq, original in old.get("original", {}).items():
            current = ctx.host.irq_affinity(int(irq))
            if current is None:
                continue  # the IRQ went away (its driver was unloaded)
            if not held:
                if parse_cpulist(current) != parse_cpulist(original):
                    self._move(ctx, int(irq), parse_cpulist(original))
                continue
            target = self._target(ctx, original, held)
            if parse_cpulist(current) != target:
                self._move(ctx, int(irq), target)


@dataclass(frozen=True)
class StopIrqbalance(SharedCpuStep):
    """irqbalance would spread IRQs back over the VM's cores: stopped while any isolated VM runs."""

    kind = "stop-irqbalance"
    schema = {**SHARED, "unit": UNIT}
    old_schema = {"original": boolean}
    unit: str = IRQBALANCE_UNIT

    def describe(self) -> str:
        return f"stop {self.unit} while cores {_cores(self.cores)} are isolated"

    def capture(self, ctx: Context) -> dict[str, Any]:
        _held, inherited = self._elsewhere(ctx)
        return {"original": inherited["original"] if inherited else ctx.services.is_active(self.unit)}

    def apply(self, ctx: Context, old: dict[str, Any]) -> None:
        if ctx.services.is_active(self.unit):
            ctx.services.stop(self.unit, ctx.config.timeouts.unit_stop)

    def verify(self, ctx: Context, old: dict[str, Any]) -> None:
        wait_until(ctx, lambda: not ctx.services.is_active(self.unit), ctx.config.timeouts.unit_stop,
                   f"{self.unit} stopping")

    def revert(self, ctx: Context, old: dict[str, Any]) -> None:
        held, _ = self._elsewhere(ctx)
        if held or not old.get("original") or ctx.services.is_active(self.unit):
            return
        ctx.services.start(self.unit, ctx.config.timeouts.unit_stop)


@dataclass(frozen=True)
class SetGovernor(Action):
    """The cpufreq governor of the VM's cores (``performance``), each core's own put back afterwards."""

    kind = "set-governor"
    schema = {**SHARED, "governor": GOVERNOR}
    old_schema = {"governors": mapping(pattern(r"[0-9]{1,5}", "a core number"), GOVERNOR, 65536)}
    vm: str
    cores: tuple[int, ...]
    governor: str

    def describe(self) -> str:
        return f"set the cpufreq governor of cores {_cores(self.cores)} to {self.governor}"

    def capture(self, ctx: Context) -> dict[str, Any]:
        old = {}
        for cpu in self.cores:
            current = ctx.host.cpu_governor(cpu)
            if current is None:
                raise StepFailed(f"{ctx.host.cpu_governor_path(cpu)} cannot be read")
            old[str(cpu)] = current
        return {"governors": old}

    def apply(self, ctx: Context, old: dict[str, Any]) -> None:
        for cpu in self.cores:
            if ctx.host.cpu_governor(cpu) != self.governor:
                ctx.host.kernel.write(ctx.host.cpu_governor_path(cpu), self.governor)

    def verify(self, ctx: Context, old: dict[str, Any]) -> None:
        for cpu in self.cores:
            wait_until(ctx, lambda c=cpu: ctx.host.cpu_governor(c) == self.governor, ctx.config.timeouts.driver,
                       f"core {cpu} switching to the {self.governor} governor")

    def revert(self, ctx: Context, old: dict[str, Any]) -> None:
        for cpu, governor in old.get("governors", {}).items():
            current = ctx.host.cpu_governor(int(cpu))
            if current is not None and current != governor:
                ctx.host.kernel.write(ctx.host.cpu_governor_path(int(cpu)), governor)
