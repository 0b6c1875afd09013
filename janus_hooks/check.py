"""``janus-hooks check`` and ``devices``: is this host ready, and what is each GPU's verdict.

The verdict for a GPU is the planner's own answer for a VM that gets every function of the GPU's slot,
in each mode, against one snapshot of the host: ``check`` can never promise what ``prepare`` would refuse.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from janus_hooks.config import Config, load_config
from janus_hooks.cpuset import format_cpulist
from janus_hooks.domain import MODES, DomainSpec, HostDev
from janus_hooks.errors import JanusError, UnsafeStateError
from janus_hooks.gpu import quirks
from janus_hooks.host import Host, PciDevice, Runner, Services
from janus_hooks.install import (
    ROOT_OWNED_INSTALL,
    Identity,
    InstallError,
    Manifest,
    code_others_can_change,
    file_state,
    find_conflicts,
    hook_path,
    render_shim,
)
from janus_hooks.journal import JournalStore
from janus_hooks.plan import make_plan
from janus_hooks.resources import data_file
from janus_hooks.snapshot import HostSnapshot

# qemu.d drop-ins exist since libvirt 6.5.0.
LIBVIRT_MIN = (6, 5, 0)
AGENT_UNIT = "janus-hooks-agent.service"
VERSION_TIMEOUT = 10.0

OK, WARN, FAIL = "ok", "warn", "fail"

# (base class, subclass) -> what a person calls it; base class alone as a fallback.
_CLASS_NAMES = {
    (0x01, 0x06): "SATA controller", (0x01, 0x08): "NVMe controller", (0x02, 0x00): "Ethernet controller",
    (0x02, 0x80): "network controller", (0x03, 0x00): "VGA controller", (0x03, 0x02): "3D controller",
    (0x04, 0x03): "audio device", (0x06, 0x04): "PCI bridge", (0x0C, 0x03): "USB controller",
    (0x0C, 0x05): "SMBus controller", (0x0C, 0x80): "serial bus controller",
}
_BASE_NAMES = {0x01: "storage controller", 0x02: "network controller", 0x03: "display controller",
               0x04: "multimedia device", 0x06: "bridge", 0x0C: "serial bus controller"}


def class_name(dev: PciDevice) -> str:
    try:
        value = int(dev.pci_class, 16)
    except ValueError:
        return "device"
    base, sub = value >> 16, (value >> 8) & 0xFF
    return _CLASS_NAMES.get((base, sub)) or _BASE_NAMES.get(base, f"class {dev.pci_class}")


def describe_device(dev: PciDevice) -> str:
    """``0000:00:14.0 (USB controller, xhci_hcd)``: what a refusal names."""
    return f"{dev.address} ({class_name(dev)}, {dev.driver or 'no driver'})"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok, warn, fail
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail}


@dataclass(frozen=True)
class GpuVerdict:
    gpu: PciDevice
    functions: tuple[PciDevice, ...]
    refusals: dict[str, str | None]  # mode -> why it would be refused, None: ready
    notes: tuple[str, ...] = ()

    @property
    def ready_modes(self) -> list[str]:
        return [m for m in MODES if self.refusals.get(m) is None]

    def summary(self) -> str:
        single, passthrough = self.refusals["single-gpu"], self.refusals["passthrough"]
        if single is None and passthrough is None:
            return "ready for passthrough or single-GPU"
        if single is None:
            return f"ready for single-GPU; not for passthrough: {passthrough}"
        if passthrough is None:
            return f"ready for passthrough; not for single-GPU: {single}"
        if single == passthrough:
            return f"not ready: {single}"
        return f"not ready: {single}; passthrough: {passthrough}"

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.gpu.address,
            "slot": self.gpu.slot,
            "vendor": self.gpu.vendor,
            "device": self.gpu.device,
            "driver": self.gpu.driver,
            "iommu_group": self.gpu.iommu_group,
            "boot_vga": self.gpu.boot_vga,
            "reset_method": self.gpu.reset_method,
            "functions": [f.address for f in self.functions],
            "ready": {m: self.refusals[m] is None for m in MODES},
            "refusals": dict(self.refusals),
            "notes": list(self.notes),
            "summary": self.summary(),
        }


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    gpus: list[GpuVerdict] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        """No failed check and at least one GPU that some mode accepts."""
        return all(c.status != FAIL for c in self.checks) and any(g.ready_modes for g in self.gpus)

    def to_json(self) -> dict[str, Any]:
        return {"ready": self.ready, "checks": [c.to_json() for c in self.checks],
                "gpus": [g.to_json() for g in self.gpus]}


@dataclass
class Probe:
    """What check may do beyond reading files: run host programs, ask systemd. Injected for tests."""

    runner: Runner
    services: Services | None
    live: bool  # the root is the running system: its programs and daemons are this machine's


# --- GPUs ---------------------------------------------------------------------------------------------------
def gpus(snap: HostSnapshot) -> list[PciDevice]:
    return [d for d in sorted(snap.devices.values(), key=lambda d: d.address) if d.is_display]


def slot_functions(snap: HostSnapshot, gpu: PciDevice) -> tuple[PciDevice, ...]:
    return tuple(d for d in sorted(snap.devices.values(), key=lambda d: d.address) if d.slot == gpu.slot)


def group_strangers(snap: HostSnapshot, gpu: PciDevice) -> list[PciDevice]:
    """Members of the GPU's IOMMU group that are neither its functions nor bridges: they would go along."""
    members = snap.groups.get(gpu.iommu_group, ()) if gpu.iommu_group is not None else ()
    return [d for a in members if (d := snap.devices.get(a)) is not None and d.slot != gpu.slot and not d.is_bridge]


def gpu_verdict(snap: HostSnapshot, config: Config, gpu: PciDevice) -> GpuVerdict:
    functions = slot_functions(snap, gpu)
    notes = quirks(gpu.driver, gpu.reset_method)
    strangers = group_strangers(snap, gpu)
    if strangers:
        others = ", ".join(describe_device(d) for d in strangers)
        reason = f"IOMMU group {gpu.iommu_group} also holds {others}, which would have to go to the VM too"
        return GpuVerdict(gpu, functions, dict.fromkeys(MODES, reason), tuple(notes))
    refusals: dict[str, str | None] = {}
    for mode in MODES:
        # A VM that gets every function of the card: what `profile --gpu` writes.
        spec = DomainSpec(name=f"(a {mode} VM)", uuid="", memory_kb=0,
                          hostdevs=tuple(HostDev(f.address, True) for f in functions), hugepages=None, mode=mode)
        refusals[mode] = make_plan(spec, mode, config, snap).refusal
    return GpuVerdict(gpu, functions, refusals, tuple(notes))


def inventory(snap: HostSnapshot) -> list[dict[str, Any]]:
    """Every GPU with its functions, its IOMMU group, drivers, processes and the VM holding it (devices)."""
    result = []
    for gpu in gpus(snap):
        # The card's nodes and its functions' sound cards (HDMI/DP audio): who keeps any of them busy.
        nodes = snap.card_nodes(gpu) + tuple(
            n for f in slot_functions(snap, gpu) for n in snap.sound_nodes.get(f.address, ()))

        def entry(dev: PciDevice) -> dict[str, Any]:
            return {"address": dev.address, "class": dev.pci_class, "kind": class_name(dev), "driver": dev.driver,
                    "vendor": dev.vendor, "device": dev.device, "held_by_vm": snap.claims.get(dev.address)}

        members = snap.groups.get(gpu.iommu_group, ()) if gpu.iommu_group is not None else ()
        result.append({
            "address": gpu.address,
            "slot": gpu.slot,
            "vendor": gpu.vendor,
            "device": gpu.device,
            "boot_vga": gpu.boot_vga,
            "reset_method": gpu.reset_method,
            "numa_node": gpu.numa_node,
            "iommu_group": gpu.iommu_group,
            "held_by_vm": snap.claims.get(gpu.address),
            "functions": [entry(f) for f in slot_functions(snap, gpu)],
            "iommu_group_members": [
                {**entry(d), "same_card": d.slot == gpu.slot, "bridge": d.is_bridge}
                for a in members if (d := snap.devices.get(a)) is not None
            ],
            "used_by": [{"pid": h.pid, "command": h.command, "node": h.node, "unit": h.unit}
                        for h in snap.holders if h.node in nodes],
        })
    return result


# --- host checks --------------------------------------------------------------------------------------------
def _version(text: str) -> tuple[int, ...] | None:
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(x) for x in match.groups()) if match else None


def libvirt_check(host: Host, probe: Probe) -> Check:
    path = host.program("libvirtd") or host.program("virtqemud")
    if path is None:
        return Check("libvirt", FAIL, "neither libvirtd nor virtqemud is installed")
    running = [f"{n} running (pid {pid})" for n in ("libvirtd", "virtqemud") if (pid := host.daemon_pid(n))]
    state = "; ".join(running) or "not running"
    if not probe.live:
        return Check("libvirt", OK, f"{path.name} installed, {state} (version not checked outside the running system)")
    try:
        result = probe.runner.run([str(path), "--version"], VERSION_TIMEOUT)
        version = _version(result.stdout + result.stderr)
    except JanusError:
        version = None
    if version is None:
        return Check("libvirt", WARN, f"{path.name} installed, {state}, but its version could not be read")
    shown = ".".join(map(str, version))
    if version < LIBVIRT_MIN:
        return Check("libvirt", FAIL, f"libvirt {shown} is too old: qemu.d hooks need 6.5 or newer")
    return Check("libvirt", OK, f"libvirt {shown}, {state}")


def hook_checks(host: Host) -> list[Check]:
    path = hook_path(host)
    state = file_state(path)
    if state[0] == "missing":
        return [Check("hook", FAIL, f"{path} is not installed: run 'janus-hooks install'")]
    try:
        manifest = Manifest.load(host)
    except InstallError as err:
        if not isinstance(err.__cause__, PermissionError):
            raise
        host.denied.append(Manifest.path(host))
        return [Check("hook", OK, f"{path} installed (whether it is current: run as root)")]
    entry = manifest.entries.get(str(path.relative_to(host.root))) if manifest else None
    if entry is None:
        return [Check("hook", WARN, f"{path} exists but is not listed in {Manifest.path(host)}: "
                                    "run 'janus-hooks install' to take it over")]
    if state[1] != entry.sha256:
        return [Check("hook", FAIL, f"{path} was changed since install: run 'janus-hooks install' after moving it")]
    installed_code = _installed_identity(manifest)
    problem = code_others_can_change(installed_code) if installed_code else None
    if problem:  # made writable since install: whoever can change it becomes root at the next VM start
        return [Check("hook", FAIL, f"{problem}: the installed hook runs it as root; {ROOT_OWNED_INSTALL}")]
    current = render_shim(data_file("hooks", "qemu").read_text(), Identity.current(host.root))
    if hashlib.sha256(current.encode()).hexdigest() != state[1]:
        installed = manifest.identity.get("package_dir", "another copy") if manifest else "another copy"
        return [Check("hook", WARN, f"{path} runs janus-hooks from {installed}, not this copy or version: "
                                    "run 'janus-hooks install' again to update it")]
    return [Check("hook", OK, f"{path} installed and current")]


def _installed_identity(manifest: Manifest | None) -> Identity | None:
    """What the installed hook and units run, as install recorded it."""
    fields = manifest.identity if manifest else {}
    names = ("root", "interpreter", "python", "package_dir")
    if not all(isinstance(fields.get(n), str) for n in names):
        return None
    return Identity(*(fields[n] for n in names))


def agent_check(host: Host, probe: Probe) -> Check:
    installed = (host.systemd_unit_dir() / AGENT_UNIT).exists()
    if installed and probe.services is not None and host.systemd_running() and probe.live:
        try:
            if probe.services.is_active(AGENT_UNIT):
                return Check("agent", OK, f"{AGENT_UNIT} is running")
        except JanusError:
            pass
    if not installed:
        return Check("agent", WARN, f"not running: {AGENT_UNIT} is not installed (the hook works without it; "
                                    "the agent heals what libvirt cannot report)")
    return Check("agent", WARN, f"not running: start it with 'systemctl enable --now {AGENT_UNIT}' (the hook "
                                "works without it; the agent heals what libvirt cannot report)")


def host_checks(host: Host, probe: Probe, config_error: str | None) -> list[Check]:
    checks: list[Check] = []
    flags = host.cpu_flags()
    if "vmx" in flags or "svm" in flags:
        checks.append(Check("cpu", OK, "Intel VT-x (vmx)" if "vmx" in flags else "AMD-V (svm)"))
    else:
        checks.append(Check("cpu", FAIL, "the CPU shows neither vmx nor svm: enable virtualization in the firmware"))
    if host.kvm_device() or host.module_available("kvm"):
        checks.append(Check("kvm", OK, "kvm available"))
    else:
        checks.append(Check("kvm", FAIL, "the kvm module is neither loaded nor installed"))
    cmdline = host.cmdline().split()
    iommu_args = [a for a in cmdline if a.split("=")[0] in ("intel_iommu", "amd_iommu", "iommu")]
    groups = {d.iommu_group for d in host.pci_devices() if d.iommu_group is not None}
    if groups:
        checks.append(Check("iommu", OK, f"{len(groups)} IOMMU groups"
                                         f"{' (' + ' '.join(iommu_args) + ')' if iommu_args else ''}"))
    elif iommu_args:
        checks.append(Check("iommu", FAIL, f"{' '.join(iommu_args)} is set but no IOMMU group exists: "
                                           "enable VT-d / AMD-Vi in the firmware"))
    else:
        checks.append(Check("iommu", FAIL, "no IOMMU groups: add intel_iommu=on (Intel) or amd_iommu=on (AMD) "
                                           "to the kernel command line and enable VT-d / AMD-Vi in the firmware"))
    if host.module_available("vfio_pci") or host.pci_driver_loaded("vfio-pci"):
        checks.append(Check("vfio", OK, "vfio-pci available"))
    else:
        checks.append(Check("vfio", FAIL, "the vfio-pci module is neither loaded nor installed"))
    pools = [p for s in host.hugepage_sizes() if (p := host.hugepage_pool(s)) is not None]
    if pools:
        checks.append(Check("hugepages", OK, "; ".join(f"{p.size_kb} kB pages: {p.total} reserved, {p.free} free"
                                                       for p in pools)))
    else:
        checks.append(Check("hugepages", WARN, "the kernel shows no hugepage pools"))
    if host.hugetlbfs_mounted():
        checks.append(Check("hugetlbfs", OK, "hugetlbfs is mounted"))
    else:
        checks.append(Check("hugetlbfs", WARN, "hugetlbfs is not mounted: VMs with hugepage backing cannot start "
                                               "(mount it and restart libvirtd)"))
    checks.append(libvirt_check(host, probe))
    try:
        checks += hook_checks(host)
        checks += [Check("conflict", WARN, note) for note in find_conflicts(host)]
        checks.append(agent_check(host, probe))
    except UnsafeStateError as err:  # an install path that leads elsewhere: the other checks still answer
        checks.append(Check("hook", FAIL, str(err)))
    if config_error:
        checks.append(Check("config", FAIL, config_error))
    return checks


# --- CPU isolation ------------------------------------------------------------------------------------------
def cpu_checks(host: Host, config: Config, claims: dict[str, frozenset[int]],
               vcpus: dict[str, frozenset[int]] | None = None) -> list[Check]:
    """Whether isolation can work here, and for each running managed VM: the cores it is isolated on
    (``claims``, from the open journals) or its vCPU threads are pinned to (``vcpus``, read from the kernel),
    SMT siblings it leaves to the host, cores it shares with another running VM, vCPU threads that may run
    outside the cores isolated for them. Silent on a host that neither can nor is asked to isolate and runs
    no pinned VM."""
    vcpus = vcpus or {}
    online = host.cpus_online()
    # A VM whose vCPU threads may run on every online core is not pinned: nothing to say about it.
    pinned = {vm: cores for vm, cores in vcpus.items() if not online <= cores}
    checks: list[Check] = []
    if host.cgroup2():
        how = ("systemd AllowedCPUs on system.slice, user.slice, init.scope" if host.systemd_running()
               else "cpuset.cpus of the top-level cgroups")
        state = "on for every pinned VM" if config.cpu.isolate else "per VM (isolate=\"yes\")"
        checks.append(Check("isolation", OK, f"cgroup v2, {how}; {len(online)} cores online "
                                             f"({format_cpulist(online)}); {state}"))
    elif config.cpu.isolate:
        checks.append(Check("isolation", WARN, "cpu.isolate is on, but this host has no cgroup v2 (unified) "
                                               "hierarchy: VMs start without CPU isolation"))
    elif not claims and not pinned:
        return []
    held = frozenset().union(*claims.values())
    cores_of = {**pinned, **claims}
    for vm, cores in sorted(cores_of.items()):
        if vm in claims:
            checks.append(Check("pinning", OK, f"VM {vm!r} runs isolated on cores {format_cpulist(cores)}; "
                                               f"the host keeps {format_cpulist(online - held) or 'no core'}"))
            stray = vcpus.get(vm, cores) - cores
            if stray:
                checks.append(Check("pinning", WARN, f"VM {vm!r}: its vCPU threads may also run on cores "
                                                     f"{format_cpulist(stray)}, outside the cores isolated for it "
                                                     "(were its pins changed while it runs?)"))
        else:
            checks.append(Check("pinning", OK, f"VM {vm!r} runs its vCPUs on cores {format_cpulist(cores)}, not "
                                               "isolated: the host's work may run there too"))
        split = sorted({s for c in cores for s in host.cpu_siblings(c) if s not in cores})
        if split:
            checks.append(Check("smt", WARN, f"VM {vm!r}: SMT siblings {format_cpulist(split)} of its cores stay "
                                             "with the host (they share caches and pipelines with the VM)"))
    names = sorted(cores_of)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            shared = cores_of[first] & cores_of[second]
            if shared:
                checks.append(Check("shared", WARN, f"cores {format_cpulist(shared)} are pinned by both running "
                                                    f"VMs {first!r} and {second!r}"))
    return checks


def running_vcpu_cpus(host: Host, store: JournalStore) -> dict[str, frozenset[int]]:
    """The running managed VMs (an open journal of this boot, their QEMU alive) and the cores their vCPU
    threads may run on. A journal that cannot be read is the journal command's to report."""
    boot_id = host.boot_id()
    found: dict[str, frozenset[int]] = {}
    for vm in store.vms():
        try:
            state = store.read(vm)
        except (JanusError, OSError):
            continue
        if state is None or state.boot_id != boot_id:
            continue
        pid = host.vm_process(vm)
        cores = host.vcpu_cpus(pid) if pid is not None else None
        if cores:
            found[vm] = cores
    return found


def run_check(host: Host, probe: Probe, read_config: Callable[[], Config] | None = None) -> Report:
    """The whole check: host facts, then one snapshot and a verdict per GPU."""
    config_error = None
    try:
        config = (read_config or (lambda: load_config(host.config_dir())))()
    except JanusError as err:
        config, config_error = Config(), str(err)
    report = Report(host_checks(host, probe, config_error))
    store = JournalStore(host.state_dir(), listdir=host.list_dir)
    report.checks += cpu_checks(host, config, store.cpu_claims(host.boot_id()), running_vcpu_cpus(host, store))
    snap = HostSnapshot.read(host, claims=store.claims(), units_of_interest=config.stop_units)
    report.gpus = [gpu_verdict(snap, config, g) for g in gpus(snap)]
    if not report.gpus:
        report.checks.append(Check("gpu", FAIL, "no GPU (display-class PCI device) found"))
    return report
