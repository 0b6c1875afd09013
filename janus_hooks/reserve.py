"""GPUs reserved for VMs from boot on: the one persistent driver override janus-hooks makes, on request only.

A reservation is three files, all regenerated from the set of reserved GPUs:
- a udev rule that writes ``vfio-pci`` to ``driver_override`` when each function of the GPU appears (at
  coldplug, before ``80-drivers.rules`` loads host drivers by modalias) and loads vfio-pci;
- ``softdep <host driver> pre: vfio-pci`` in modprobe.d, so that vfio-pci is there before the host driver;
- on Debian's initramfs-tools, a hook that puts vfio-pci into the initramfs (whose udev copies the custom
  rules of /etc/udev/rules.d), followed by ``update-initramfs -u`` on the running system.

The udev rule file is the record: each reserved GPU has a comment line naming its functions and host driver
modules, which is what ``unreserve`` and ``check``/``devices`` read back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from janus_hooks.check import describe_device, group_strangers, slot_functions
from janus_hooks.errors import JanusError
from janus_hooks.files import atomic_write, fsync_dir
from janus_hooks.host import Host, resolve_beneath
from janus_hooks.snapshot import HostSnapshot

RULES_NAME = "40-janus-hooks-reserve.rules"  # before 80-drivers.rules, which loads host drivers
MODPROBE_NAME = "janus-hooks-reserve.conf"
INITRAMFS_HOOK_NAME = "janus-hooks-reserve"
UPDATE_INITRAMFS = ("update-initramfs", "-u")
UPDATE_TIMEOUT = 600.0
VFIO = "vfio-pci"
_RECORD = re.compile(r"^# reserved (\S+) functions (\S+) modules ?(.*)$")


class ReserveError(JanusError):
    """A GPU that cannot be reserved or unreserved; the message names it and why."""


@dataclass(frozen=True)
class Reservation:
    slot: str  # 0000:01:00
    functions: tuple[str, ...]
    modules: tuple[str, ...]  # host driver modules of its functions when reserved (softdep targets)


@dataclass(frozen=True)
class FileChange:
    path: Path
    content: str | None  # None: remove
    mode: int = 0o644


def rules_path(host: Host) -> Path:
    return host.udev_rules_dir() / RULES_NAME


# Root writes these (and the initramfs runs the hook at boot): resolved beneath the root like install's paths.
def modprobe_path(host: Host) -> Path:
    return resolve_beneath(host.root, "etc/modprobe.d") / MODPROBE_NAME


def initramfs_hook_path(host: Host) -> Path:
    return resolve_beneath(host.root, "etc/initramfs-tools/hooks") / INITRAMFS_HOOK_NAME


def reservations(host: Host) -> dict[str, Reservation]:
    """The reserved GPUs, by slot, as the udev rule file records them."""
    try:
        text = rules_path(host).read_text()
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise ReserveError(f"cannot read {rules_path(host)}: {err.strerror}") from err
    found = {}
    for line in text.splitlines():
        match = _RECORD.match(line)
        if match:
            slot, functions, modules = match.groups()
            found[slot] = Reservation(slot, tuple(functions.split(",")), tuple(modules.split()))
    return found


def reserved_slot(host: Host, address: str) -> str | None:
    """The reserved GPU slot this address belongs to, if any."""
    slot = address.rsplit(".", 1)[0]
    return slot if slot in reservations(host) else None


def _slot_of(snap: HostSnapshot, address: str) -> str:
    if address in snap.devices:
        return snap.devices[address].slot
    if f"{address}.0" in snap.devices:
        return address
    raise ReserveError(f"no PCI device {address} on this host (see 'janus-hooks devices')")


def plan_reserve(host: Host, address: str) -> tuple[Reservation, list[FileChange]]:
    """What reserving the GPU at ``address`` writes; refuses the boot GPU and a shared IOMMU group."""
    snap = HostSnapshot.read(host)
    slot = _slot_of(snap, address)
    gpu = next((d for d in sorted(snap.devices.values(), key=lambda d: d.address)
                if d.slot == slot and d.is_display), None)
    if gpu is None:
        raise ReserveError(f"{slot} is not a GPU (no display-class function); only GPUs are reserved")
    if gpu.boot_vga:
        raise ReserveError(f"{describe_device(gpu)} is the boot GPU (boot_vga=1): the host needs it to show "
                           "anything at boot; reserve a second GPU, and use single-GPU mode for this one")
    if gpu.iommu_group is None:
        raise ReserveError(f"{describe_device(gpu)} has no IOMMU group: turn the IOMMU on (intel_iommu=on or "
                           "amd_iommu=on) before reserving it for VMs")
    strangers = group_strangers(snap, gpu)
    if strangers:
        others = ", ".join(describe_device(d) for d in strangers)
        raise ReserveError(f"IOMMU group {gpu.iommu_group} of {gpu.address} also holds {others}: reserving the GPU "
                           "would take those from the host too")
    functions = tuple(f.address for f in slot_functions(snap, gpu))
    modules = sorted({m for f in slot_functions(snap, gpu)
                      if f.driver and f.driver != VFIO and (m := snap.driver_modules.get(f.driver))})
    reservation = Reservation(slot, functions, tuple(modules))
    wanted = {**reservations(host), slot: reservation}
    return reservation, render(host, wanted)


def plan_unreserve(host: Host, address: str) -> tuple[Reservation, list[FileChange]]:
    slot = address.rsplit(".", 1)[0] if address.count(":") == 2 and "." in address else address
    current = reservations(host)
    if slot not in current:
        raise ReserveError(f"{slot} is not reserved (reserved: {', '.join(sorted(current)) or 'none'})")
    reservation = current.pop(slot)
    return reservation, render(host, current)


def render(host: Host, wanted: dict[str, Reservation]) -> list[FileChange]:
    """The three files for a set of reservations; an empty set removes them."""
    if not wanted:
        changes = [FileChange(rules_path(host), None), FileChange(modprobe_path(host), None)]
        if initramfs_hook_path(host).exists():
            changes.append(FileChange(initramfs_hook_path(host), None, 0o755))
        return changes
    rules = ["# janus-hooks: GPUs reserved for VMs ('janus-hooks reserve ADDR'; undo: 'janus-hooks unreserve ADDR').",
             "# When a function of such a GPU appears, vfio-pci and nothing else may bind it. Generated: do not edit."]
    modules: set[str] = set()
    for slot in sorted(wanted):
        r = wanted[slot]
        rules.append(f"# reserved {slot} functions {','.join(r.functions)} modules {' '.join(r.modules)}".rstrip())
        rules += [f'ACTION=="add", SUBSYSTEM=="pci", KERNEL=="{f}", ATTR{{driver_override}}="{VFIO}", '
                  f'RUN{{builtin}}+="kmod load {VFIO}"' for f in r.functions]
        modules.update(r.modules)
    modprobe = ["# janus-hooks: vfio-pci before the host drivers of GPUs reserved for VMs ('janus-hooks reserve')."]
    modprobe += [f"softdep {m} pre: {VFIO}" for m in sorted(modules)]
    changes = [FileChange(rules_path(host), "\n".join(rules) + "\n"),
               FileChange(modprobe_path(host), "\n".join(modprobe) + "\n")]
    if host.path("etc/initramfs-tools").is_dir():
        changes.append(FileChange(initramfs_hook_path(host), INITRAMFS_HOOK, 0o755))
    return changes


INITRAMFS_HOOK = """#!/bin/sh
# janus-hooks: vfio-pci in the initramfs, whose udev applies the rule that reserves GPUs for VMs
# ('janus-hooks reserve'). Removed by 'janus-hooks unreserve' with the last reservation.
PREREQ=""
prereqs() { echo "$PREREQ"; }
case "$1" in
prereqs) prereqs; exit 0 ;;
esac
. /usr/share/initramfs-tools/hook-functions
manual_add_modules vfio-pci vfio_iommu_type1
"""


def pending(changes: list[FileChange]) -> list[FileChange]:
    """The changes that would change something."""
    out = []
    for change in changes:
        try:
            current = change.path.read_text()
        except FileNotFoundError:
            current = None
        if current != change.content:
            out.append(change)
    return out


def apply(changes: list[FileChange]) -> None:
    for change in changes:
        if change.content is None:
            try:
                change.path.unlink()
            except FileNotFoundError:
                continue
            fsync_dir(change.path.parent)
        else:
            atomic_write(change.path, change.content.encode(), mode=change.mode)


def initramfs_changed(changes: list[FileChange]) -> bool:
    """Whether the initramfs must be rebuilt: its udev rules or its modules changed."""
    return any(c.path.name in (RULES_NAME, MODPROBE_NAME, INITRAMFS_HOOK_NAME) for c in changes)
