"""What the sources put on the agent's one queue: small frozen records, one per thing that happened."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LibvirtConnected:
    uri: str
    active: frozenset[str]  # VMs libvirt runs right now (listAllDomains at connect time)


@dataclass(frozen=True)
class LibvirtLost:
    uri: str
    reason: str


@dataclass(frozen=True)
class VmLifecycle:
    vm: str
    event: str  # started, stopped, crashed, ... (libvirt's lifecycle event, lower case)
    running: bool  # what the event means for the VM's QEMU
    at: float = field(default_factory=time.time)  # when it arrived: a failure recorded after it still stands


@dataclass(frozen=True)
class QemuExited:
    vm: str
    pid: int


@dataclass(frozen=True)
class DeviceEvent:
    action: str  # add, remove, bind, unbind, change
    subsystem: str  # pci, drm
    name: str  # 0000:01:00.0, card0
    driver: str | None = None
    pci_class: str | None = None  # hex without leading zeros, as in the uevent
    parent: str | None = None  # the PCI device of a DRM card


@dataclass(frozen=True)
class FilesChanged:
    kind: str  # config, journal, failures, sessions


@dataclass(frozen=True)
class Recheck:
    """A timer fired: look at one VM's journal again (after libvirt's own release had its chance)."""

    vm: str
    why: str
