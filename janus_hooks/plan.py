"""(domain spec, config, host snapshot) -> ordered actions. Pure: ``janus-hooks plan`` prints exactly this.

Order, and why:
1. hugepages first: if memory is short the start is refused before the desktop is touched;
2. free the GPU from its users (display manager, graphical sessions, vendor services), then check that
   nobody holds its nodes any more;
3. the text console: fbcon vtconsoles, then the boot framebuffer;
4. the host driver: modules in holders order (or only an unbind when another device shares the driver);
5. vfio modules, the reset method of a GPU that needs vendor-reset, then every function of the GPU bound to
   vfio-pci (the device_specific reset stays in force until vfio-pci let go of the card on release);
6. CPU isolation (``isolation.py``), once the GPU is the VM's: host work off the VM's pinned cores.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from janus_hooks.actions import (
    VFIO_DRIVER,
    Action,
    AllocateHugepages,
    BindVfio,
    DetachFramebuffer,
    EndSession,
    LoadModule,
    RunDisplayCommands,
    StopUnit,
    StopUserUnits,
    UnbindVtconsole,
    UnloadModule,
    WaitReleased,
)
from janus_hooks.config import Config
from janus_hooks.domain import SHARED_VRAM, DomainSpec
from janus_hooks.errors import PlanRefused
from janus_hooks.gpu import backend_for, quirks
from janus_hooks.gpu.amdgpu import DEVICE_SPECIFIC, VENDOR_RESET_MODULE, vendor_reset_family
from janus_hooks.host import Module, PciDevice, ProcessHold
from janus_hooks.host.sysfs import dev_node
from janus_hooks.schema import MAX_TOKEN, quote
from janus_hooks.snapshot import HostSnapshot

# The IOMMU backend first: loading vfio-pci also loads it (a soft dependency on Debian's 6.1), and a step
# that finds it already loaded would leave it behind on release.
VFIO_MODULES = ("vfio_iommu_type1", "vfio_pci")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What a start of ``vm`` will change, in order, or why it is refused."""

    vm: str
    mode: str | None
    devices: tuple[str, ...] = ()
    actions: tuple[Action, ...] = ()
    notes: tuple[str, ...] = ()
    refusal: str | None = None
    # More ways out than the one the refusal names; shown by `plan`, logged by the hook (libvirt gets one line).
    refusal_detail: str = ""

    @property
    def managed(self) -> bool:
        return self.mode is not None

    def raise_if_refused(self) -> None:
        if self.refusal:
            if self.refusal_detail:
                log.error("VM %s: start refused: %s; %s", self.vm, self.refusal, self.refusal_detail)
            raise PlanRefused(self.refusal)

    def render(self) -> str:
        if not self.managed:
            return f"VM {self.vm!r} is not managed by janus-hooks: nothing changes when it starts."
        if self.refusal:
            detail = f"\n  also: {self.refusal_detail}" if self.refusal_detail else ""
            return f"VM {self.vm!r} ({self.mode}): the start would be refused: {self.refusal}{detail}"
        lines = [f"VM {self.vm!r} ({self.mode}): {len(self.actions)} change(s) on prepare, undone on release"]
        lines += [f"  {i}. {a.describe()}" for i, a in enumerate(self.actions, 1)]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "mode": self.mode,
            "managed": self.managed,
            "devices": list(self.devices),
            "refusal": self.refusal,
            "refusal_detail": self.refusal_detail or None,
            "actions": [{"description": a.describe(), **a.to_json()} for a in self.actions],
            "notes": list(self.notes),
        }


class _Refuse(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.detail = detail


def _cut(text: str, limit: int = MAX_TOKEN) -> str:
    """Host text (a mount source, a device path) in a refusal: at most ``limit`` characters."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Builder:
    """The plan being built (a plain class: nothing compares or prints it, and every start defines it)."""

    def __init__(self, spec: DomainSpec, mode: str, config: Config, snap: HostSnapshot,
                 extra_units: tuple[str, ...]) -> None:
        self.spec, self.mode, self.config, self.snap, self.extra_units = spec, mode, config, snap, extra_units
        self.actions: list[Action] = []
        self.notes: list[str] = []

    def refuse(self, reason: str, detail: str = "") -> None:
        """Stop planning: ``reason`` is the one line libvirt shows (device, who, one remedy; at most ~200
        characters so that the hook's line stays within 300 with a 64-character VM name), ``detail`` the rest."""
        raise _Refuse(reason, detail)


def make_plan(spec: DomainSpec, mode: str | None, config: Config, snap: HostSnapshot | None,
              extra_units: tuple[str, ...] = (), reset_risk: str = "refuse") -> Plan:
    """Plan the prepare of ``spec``; ``mode`` None means the VM is not managed (an empty plan, no snapshot).
    ``reset_risk``: the VM's profile says whether a single-GPU start may go on without vendor-reset."""
    addresses = tuple(sorted({d.address for d in spec.hostdevs}))
    if mode is None or snap is None:
        return Plan(spec.name, None, addresses)
    b = _Builder(spec, mode, config, snap, extra_units)
    if mode == SHARED_VRAM:
        return _shared_plan(b, addresses)
    try:
        gpus = _check_devices(b, addresses)
        resets = _reset_methods(b, gpus, reset_risk)
        _hugepages(b)
        if gpus:
            unloading = _driver_modules(b, gpus, addresses)
            nodes, shared = _gpu_nodes(b, addresses, gpus, unloading)
            _free_gpu(b, gpus, addresses, nodes, shared)
            if mode == "single-gpu":
                _console(b, gpus)
            b.actions += unloading
        _vfio(b, addresses, resets)
        if config.isolates(spec.isolate):
            # CPU isolation's planner and actions are imported only for a VM that asks for it: every other
            # start would pay for their classes (see janus_hooks/actions/__init__.py).
            from janus_hooks.isolation import isolation_steps

            steps, notes = isolation_steps(spec, config, snap)
            b.actions += steps
            b.notes += notes
    except (_Refuse, PlanRefused) as refusal:
        return Plan(spec.name, mode, addresses, refusal=str(refusal), refusal_detail=getattr(refusal, "detail", ""))
    return Plan(spec.name, mode, addresses, tuple(b.actions), tuple(b.notes))


def _shared_plan(b: _Builder, addresses: tuple[str, ...]) -> Plan:
    """shared-vram: hugepages, then the mdev instance or VFs on the host's GPU, which the host keeps."""
    from janus_hooks.actions import CreateMdev, EnableVfs  # only this mode's starts load their classes

    vm = b.spec.name
    try:
        _hugepages(b)
        if not b.spec.shared:
            b.refuse(f"VM {quote(vm)} is shared-vram but its profile names no <janus:mdev/> or <janus:vf/>")
        for dev in b.spec.shared:
            if dev.parent not in b.snap.devices:
                b.refuse(f"GPU {dev.parent} of VM {quote(vm)} does not exist on this host")
            if dev.uuid and dev.mdev_type:
                b.actions.append(CreateMdev(dev.parent, dev.mdev_type, dev.uuid))
            elif dev.vfs > 0:
                b.actions.append(EnableVfs(dev.parent, dev.vfs))
            else:
                b.refuse(f"VM {quote(vm)}: a <janus:mdev/> needs a type and a uuid, a <janus:vf/> a count of 1 or more")
    except (_Refuse, PlanRefused) as refusal:
        return Plan(vm, b.mode, addresses, refusal=str(refusal))
    return Plan(vm, b.mode, addresses, tuple(b.actions), tuple(b.notes))


PCI_CLASS_STORAGE = 0x01


def _refuse_host_critical(b: _Builder, dev: PciDevice) -> None:
    """Every device the plan unbinds is checked (the whole IOMMU group must be hostdevs, see below), and no
    option forces these: the host would hang or be cut off."""
    vm = b.spec.name
    if dev.is_bridge:
        b.refuse(f"PCI device {dev.address} of VM {quote(vm)} is a bridge or root port: every device behind it would "
                 "lose its path; pass the devices behind it instead")
    reason = b.snap.critical.reasons.get(dev.address)
    if reason:
        b.refuse(f"PCI device {dev.address} of VM {quote(vm)} cannot be taken from the host: {reason}")
    # A mass-storage controller cannot be proven safe while some mounted storage could not be followed to
    # its controllers (a ZFS root, say). USB controllers are not held to this: a GPU's USB-C function is one.
    if b.snap.critical.unresolved and dev.base_class == PCI_CLASS_STORAGE:
        # The hook's prefix names the VM: the room goes to what could not be followed.
        b.refuse(f"PCI device {dev.address} may hold the host's storage, which could not be followed to its "
                 f"controllers ({_cut(b.snap.critical.unresolved[0], 100)})")


def _check_devices(b: _Builder, addresses: tuple[str, ...]) -> list[PciDevice]:
    snap, vm = b.snap, b.spec.name
    for address in addresses:
        dev = snap.devices.get(address)
        if dev is None:
            b.refuse(f"PCI device {address} of VM {quote(vm)} does not exist on this host")
        if address in snap.claims:
            b.refuse(f"PCI device {address} is in use by VM {quote(snap.claims[address])} (its journal is open)")
        _refuse_host_critical(b, dev)
        if dev.iommu_group is None:
            b.refuse(f"PCI device {address} has no IOMMU group: enable the IOMMU (intel_iommu=on or amd_iommu=on)")
        for member in snap.groups.get(dev.iommu_group, ()):
            other = snap.devices.get(member)
            if member in addresses or (other is not None and other.is_bridge):
                continue
            b.refuse(
                f"IOMMU group {dev.iommu_group} of {address} also holds {member}"
                f"{f' (class {other.pci_class})' if other else ''}, which is not given to VM {quote(vm)}"
            )
    gpus = [snap.devices[a] for a in addresses if snap.devices[a].is_display]
    if b.mode == "passthrough":
        for gpu in gpus:
            why = _drives_host_display(snap, gpu)
            if why:
                b.refuse(f"GPU {gpu.address} drives the host display ({why}); use mode single-gpu for it")
    return gpus


def _drives_host_display(snap: HostSnapshot, gpu: PciDevice) -> str | None:
    # Only the boot GPU: a compositor that merely has a second card open does not display on it (its
    # holders are refused later with the ways to let go of it).
    if not gpu.boot_vga or gpu.driver == VFIO_DRIVER:
        return None
    holders = [h for h in snap.holders if h.node in snap.drm_nodes.get(gpu.address, ())]
    if holders:
        return f"{holders[0].describe()}"
    if any(c.is_framebuffer and c.bound for c in snap.vtconsoles):
        return "the boot GPU with the framebuffer console on it"
    if any(f.driver for f in snap.framebuffers):
        return "the boot GPU with the boot framebuffer on it"
    return None


def _hugepages(b: _Builder) -> None:
    req = b.spec.hugepages
    if req is None:
        return
    size = req.page_kb or b.snap.default_hugepage_kb
    missing_kb = 0
    for node, kb in sorted(req.per_node_kb.items(), key=lambda item: (item[0] is not None, item[0] or 0)):
        pool = b.snap.hugepage_pools.get((size, node))
        where = f"NUMA node {node}" if node is not None else "this host"
        if pool is None:
            b.refuse(f"{where} has no {size} kB hugepage pool (VM {quote(b.spec.name)} asks for {size} kB pages)")
        needed = math.ceil(kb / size)
        # Free pages are not all available: some are reserved by mappings (a started QEMU), others were
        # added for a VM whose QEMU has not started yet (two VMs started together must not share them).
        # The kernel counts reservations for the global pool only; they bound what a node can offer too.
        promised = b.snap.pending_hugepages.get((size, node), 0)
        reserved = b.snap.hugepage_pools[(size, None)].reserved if (size, None) in b.snap.hugepage_pools else 0
        missing = needed - max(0, pool.free - reserved - promised)
        if missing > 0:
            b.actions.append(AllocateHugepages(size, node, missing))
            missing_kb += missing * size
        else:
            b.notes.append(f"{needed} x {size} kB hugepages already free on {where}")
    available = b.snap.mem_available_kb
    if available is not None and missing_kb > available:
        # Asking anyway would make the kernel squeeze the running desktop (and the OOM killer) for
        # pages it cannot have; refuse while nothing has been touched.
        b.refuse(f"VM {quote(b.spec.name)} needs {missing_kb // 1024} MiB more hugepages, but only "
                 f"{available // 1024} MiB of memory is available")


def _unload_order(name: str, modules: dict[str, Module], seen: set[str] | None = None) -> list[str]:
    """``name`` and everything holding it, holders first (nvidia_drm, nvidia_modeset, nvidia_uvm, nvidia)."""
    seen = set() if seen is None else seen
    if name in seen or name not in modules:
        return []
    seen.add(name)
    order: list[str] = []
    for holder in modules[name].holders:
        order += _unload_order(holder, modules, seen)
    return [*order, name]


def _driver_modules(b: _Builder, gpus: list[PciDevice], addresses: tuple[str, ...]) -> list[Action]:
    steps: list[Action] = []
    for gpu in gpus:
        backend = backend_for(gpu.driver)
        b.notes += [f"{gpu.address}: {note}" for note in quirks(gpu.driver, gpu.reset_method)]
        if gpu.driver is None or gpu.driver == VFIO_DRIVER:
            continue
        module = b.snap.driver_modules.get(gpu.driver)
        others = [d.address for d in b.snap.devices.values() if d.driver == gpu.driver and d.address not in addresses]
        if not backend.unload or module is None or others:
            why = (f"{gpu.driver} also drives {others[0]}" if others
                   else f"{gpu.driver} is built in" if module is None else f"{backend.name} is only unbound")
            b.notes.append(f"{gpu.address}: {gpu.driver} is unbound, not unloaded ({why})")
            continue
        for name in _unload_order(module, b.snap.modules):
            if not any(isinstance(s, UnloadModule) and s.module == name for s in steps):
                steps.append(UnloadModule(name))
    return steps


def _gpu_nodes(b: _Builder, addresses: tuple[str, ...], gpus: list[PciDevice],
               unloading: list[Action]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    nodes: list[str] = []
    shared: list[str] = []
    for address in addresses:
        nodes += b.snap.function_nodes(address)
    for gpu in gpus:
        if unloading:
            # Nodes shared by the vendor's whole stack only matter when its module goes away.
            shared += backend_for(gpu.driver).shared_nodes
    return tuple(dict.fromkeys(nodes)), tuple(dict.fromkeys(shared))


def _stop_units(b: _Builder, gpus: list[PciDevice]) -> list[str]:
    units: list[str] = []
    if b.mode == "single-gpu":
        dm = b.config.display_manager or b.snap.display_manager
        if dm:
            units.append(dm)
    for gpu in gpus:
        units += [u for u in backend_for(gpu.driver).units if u in b.snap.existing_units]
    units += list(b.config.stop_units) + list(b.extra_units)
    return list(dict.fromkeys(units))


def _graphical_session(b: _Builder, hold: ProcessHold) -> str | None:
    sessions = {s.id: s for s in b.snap.sessions}
    if hold.session and hold.session in sessions and sessions[hold.session].graphical:
        return hold.session
    # Modern desktops run the compositor in the user's systemd instance, outside the session scope.
    if hold.uid is not None and f"/user-{hold.uid}.slice/" in hold.cgroup + "/":
        for s in b.snap.sessions:
            if s.uid == hold.uid and s.graphical:
                return s.id
    return None


def _goes_with(peers_per_fd: tuple[tuple[int, ...], ...], ended: set[int]) -> bool:
    """Every descriptor is an open file that some process the plan ends holds too."""
    return bool(peers_per_fd) and all(ended.intersection(peers) for peers in peers_per_fd)


def _free_gpu(b: _Builder, gpus: list[PciDevice], addresses: tuple[str, ...], nodes: tuple[str, ...],
              shared: tuple[str, ...]) -> None:
    units = _stop_units(b, gpus)
    holders = [h for h in b.snap.holders if h.node in nodes or any(h.node.startswith(p) for p in shared)]
    single = b.mode == "single-gpu"
    by_command = single and not b.snap.systemd and bool(b.config.stop_command)
    sessions: dict[str, int] = {}
    # Named user units (Sunshine) in every user manager logind tracks; then those that hold the GPU or its
    # audio in a graphical session that ends (compositor, portals, PipeWire): a lingering user's manager,
    # or one kept by an ssh login, would keep them running past the session.
    user_units = {(uid, unit): None for uid in b.snap.users for unit in b.config.stop_user_units}
    ended: set[int] = set()  # pids that let go when the plan's units stop and its sessions end
    keepers = [h for h in holders if h.session_device_keeper]
    for hold in [h for h in holders if not h.session_device_keeper] + keepers:
        if hold.unit and hold.unit in units:
            ended.add(hold.pid)
            continue
        if hold.session_device_keeper and _goes_with(b.snap.shared_files.get((hold.pid, hold.node), ()), ended):
            # logind's (and PID 1's fd-store) copy of a device that a session the plan ends holds: it goes
            # with that session. WaitReleased still checks that it did.
            continue
        user_unit = hold.user_unit if hold.uid is not None else None
        if user_unit and user_unit in b.config.stop_user_units:
            user_units[(hold.uid, user_unit)] = None
            ended.add(hold.pid)
            continue
        session = _graphical_session(b, hold) if single and b.config.end_sessions else None
        if session:
            sessions.setdefault(session, hold.uid if hold.uid is not None else -1)
            if user_unit:
                user_units[(hold.uid, user_unit)] = None
            ended.add(hold.pid)
            continue
        if by_command:
            continue  # the display stop command is expected to end it; WaitReleased checks
        b.refuse(*_held(b, hold, addresses, gpus))
    if b.snap.systemd:
        dm = (b.config.display_manager or b.snap.display_manager) if single else None
        # The user units first: a release reverts in reverse, so they start again only once the display
        # manager is back with a session. Started before it, an application with the card open becomes
        # the card's DRM master and the compositor cannot take it (seen in the desktop lab), and PipeWire
        # finds no audio node the user may open yet.
        by_user: dict[int, list[str]] = {}
        for uid, unit in user_units:
            by_user.setdefault(uid, []).append(unit)
        b.actions += [StopUserUnits(uid, tuple(names)) for uid, names in by_user.items()]
        b.actions += [StopUnit(u, seat="seat0" if u == dm else "") for u in units]
        b.actions += [EndSession(s, uid) for s, uid in sessions.items()]
    else:
        if units:
            b.notes.append(f"no running systemd: not stopping {', '.join(units)}")
        if by_command:
            b.actions.append(RunDisplayCommands(b.config.stop_command, b.config.start_command))
    if nodes or shared:
        b.actions.append(WaitReleased(nodes, shared))


def _held(b: _Builder, hold: ProcessHold, addresses: tuple[str, ...], gpus: list[PciDevice]) -> tuple[str, str]:
    """The refusal for a holder janus-hooks may not stop: which function, who, and what the person can do
    (the process and its unit, one remedy), and the other ways out as detail."""
    address = next((a for a in addresses if hold.node in b.snap.function_nodes(a)), gpus[0].address)
    audio = hold.node.startswith(dev_node("snd/"))
    what = "audio function" if audio else "GPU"
    details = []
    if hold.unit:
        where, remedy = f" (unit {_cut(hold.unit, 48)})", "close it or list its unit in display.stop_units"
    elif hold.user_unit:
        where = f" (user unit {_cut(hold.user_unit, 48)} of uid {hold.uid})"
        remedy = "close it or list its unit in display.stop_user_units"
        details.append("display.stop_units is for system units")
    else:
        where, remedy = "", "close it or list its unit in display.stop_units"
    if b.mode == "passthrough" and not audio:
        # A second GPU: the desktop only has it open, it does not draw on it.
        details.append("the compositor can be told to leave this card alone (GNOME: the mutter-device-ignore udev "
                       "tag; KDE: KWIN_DRM_DEVICES)")
    line = f"{what} {address} is held by {hold.describe()}{where}, which janus-hooks may not stop; {remedy}"
    return line, "; ".join(details)


def _console(b: _Builder, gpus: list[PciDevice]) -> None:
    for con in b.snap.vtconsoles:
        if con.is_framebuffer and con.bound:
            b.actions.append(UnbindVtconsole(con.name))
    if not any(g.boot_vga for g in gpus):
        return
    bound = [f for f in b.snap.framebuffers if f.driver]
    if not bound:
        b.notes.append("no boot framebuffer (efifb, simplefb, simpledrm, vesafb) is bound")
    b.actions += [DetachFramebuffer(f.device, f.driver) for f in bound if f.driver]


def _reset_methods(b: _Builder, gpus: list[PciDevice], reset_risk: str) -> list[Action]:
    """AMD's reset bug: a GPU that only resets through vendor-reset gets ``device_specific`` for the VM's run
    when the module is loaded. Without it, a single-GPU start is refused: the card would stay hung after the
    VM and the desktop with it (unless the VM's profile accepts that); a second GPU only gets a note."""
    steps: list[Action] = []
    loaded = VENDOR_RESET_MODULE in b.snap.module_dirs
    for gpu in gpus:
        family = vendor_reset_family(gpu.vendor, gpu.device)
        if family is None:
            continue
        if loaded:
            methods = b.snap.reset_methods.get(gpu.address)
            if methods is None:
                # Kernels before 5.15 have no reset_method: the device-specific reset, which vendor-reset
                # hooks, is the first one they try.
                b.notes.append(f"{gpu.address} ({family}): reset by vendor-reset (this kernel has no reset_method)")
            elif methods == DEVICE_SPECIFIC:
                b.notes.append(f"{gpu.address} ({family}): reset method is {DEVICE_SPECIFIC} already (vendor-reset)")
            else:
                from janus_hooks.actions import SetResetMethod  # only starts with such a GPU load its class

                steps.append(SetResetMethod(gpu.address, DEVICE_SPECIFIC))
            continue
        if b.mode == "single-gpu" and reset_risk != "accept":
            b.refuse(f"GPU {gpu.address} ({family}) only resets with vendor-reset, which is not loaded: the desktop "
                     "may not come back after the VM; load vendor-reset or set reset_risk = \"accept\" in the VM's "
                     "profile")
        accepted = "; the VM's profile accepts the risk" if b.mode == "single-gpu" else ""
        b.notes.append(f"{gpu.address} ({family}) may stay hung after the VM: vendor-reset is not loaded{accepted}")
    return steps


def _vfio(b: _Builder, addresses: tuple[str, ...], resets: list[Action]) -> None:
    if not addresses:
        return
    for module in VFIO_MODULES:
        # Built-in or already loaded: nothing to load (a built-in vfio-pci shows only as a registered driver).
        if module not in b.snap.module_dirs and not (module == "vfio_pci" and VFIO_DRIVER in b.snap.pci_drivers):
            b.actions.append(LoadModule(module, addresses))
    b.actions += resets
    for address in addresses:
        if b.snap.devices[address].driver == VFIO_DRIVER:
            b.notes.append(f"{address} is already bound to {VFIO_DRIVER}")
        else:
            b.actions.append(BindVfio(address, b.snap.devices[address].driver))
