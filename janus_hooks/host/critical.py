"""Devices the running host cannot lose: the controllers under its mounted filesystems and swap, and the
network device carrying its default route. Taking one of them away (unbinding it for vfio-pci) hangs
the host or cuts it off, so the planner refuses them with no way to force it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from janus_hooks.host.storage import PCI_ADDRESS

if TYPE_CHECKING:
    from janus_hooks.host.sysfs import Host


@dataclass(frozen=True)
class CriticalDevices:
    """PCI address -> why the host needs it; ``unresolved``: storage that could not be followed."""

    reasons: dict[str, str] = field(default_factory=dict)
    unresolved: tuple[str, ...] = ()


def _pci_of(path: Path) -> str | None:
    for part in reversed(Path(os.path.realpath(path)).parts):
        if PCI_ADDRESS.match(part):
            return part
    return None


def default_route_interfaces(host: Host) -> list[str]:
    """Interfaces of the IPv4 and IPv6 default routes (/proc/net/route, /proc/net/ipv6_route)."""
    names = []
    try:
        lines = host.path("proc/net/route").read_text(errors="replace").splitlines()[1:]
    except OSError:
        lines = []
    for line in lines:
        fields = line.split()
        if len(fields) > 7 and fields[1] == "00000000" and fields[7] == "00000000":
            names.append(fields[0])
    try:
        lines6 = host.path("proc/net/ipv6_route").read_text(errors="replace").splitlines()
    except OSError:
        lines6 = []
    for line in lines6:
        fields = line.split()
        if len(fields) == 10 and fields[0] == "0" * 32 and fields[1] == "00" and fields[9] != "lo":
            names.append(fields[9])
    return sorted(set(names))


def critical_devices(host: Host) -> CriticalDevices:
    reasons: dict[str, str] = {}
    unresolved = []
    for device in host.storage_backing():
        if device.unresolved:
            unresolved.append(f"{device.describe()}: {device.unresolved}")
        for address in device.controllers:
            reasons.setdefault(address, f"it holds the host's {device.use} ({device.source})")
    for iface in default_route_interfaces(host):
        if "/" in iface or iface in (".", ".."):
            continue
        address = _pci_of(host.path("sys/class/net", iface, "device"))
        if address:
            reasons.setdefault(address, f"it carries the host's default route ({iface})")
    return CriticalDevices(reasons, tuple(unresolved))
