"""Plain, frozen snapshots of what the host looks like; read by ``Host``, never written.

NamedTuples, not dataclasses: every hook process defines these, and a dataclass compiles its generated
methods when its class is created (about five times what a NamedTuple costs; see bench/README.md).
"""

from __future__ import annotations

from typing import NamedTuple

PCI_CLASS_DISPLAY = 0x03
PCI_CLASS_BRIDGE = 0x06


class PciDevice(NamedTuple):
    address: str
    vendor: str
    device: str
    pci_class: str
    subsystem_vendor: str = ""
    subsystem_device: str = ""
    driver: str | None = None
    driver_override: str | None = None
    iommu_group: int | None = None
    boot_vga: bool = False
    reset_method: str = ""
    numa_node: int = -1

    @property
    def base_class(self) -> int:
        return int(self.pci_class, 16) >> 16 if self.pci_class else 0

    @property
    def is_display(self) -> bool:
        return self.base_class == PCI_CLASS_DISPLAY

    @property
    def is_bridge(self) -> bool:
        return self.base_class == PCI_CLASS_BRIDGE

    @property
    def slot(self) -> str:
        """Domain:bus:device without the function: every function of one card shares it."""
        return self.address.rsplit(".", 1)[0]

    def describe(self) -> str:
        return f"{self.address} [{self.vendor[2:]}:{self.device[2:]}] class {self.pci_class}"


class VtConsole(NamedTuple):
    name: str  # vtcon0
    description: str  # "(M) frame buffer device"
    bound: bool

    @property
    def is_framebuffer(self) -> bool:
        return "frame buffer" in self.description


class Framebuffer(NamedTuple):
    """A boot framebuffer platform device (efi-framebuffer.0, simple-framebuffer.0, vesa-framebuffer.0)."""

    device: str
    driver: str | None  # efi-framebuffer (efifb), simple-framebuffer (simplefb), simpledrm, vesa-framebuffer


class Module(NamedTuple):
    name: str
    refcnt: int
    holders: tuple[str, ...]


class ProcessHold(NamedTuple):
    """A process with a GPU device node open."""

    pid: int
    command: str
    node: str  # /dev/dri/card0, as the process sees it
    unit: str | None  # systemd unit from its cgroup, if any
    session: str | None  # logind session id from its cgroup, if any
    uid: int | None = None
    cgroup: str = ""
    fds: tuple[int, ...] = ()  # its descriptors of ``node`` (kcmp compares them with another process's)

    @property
    def user_unit(self) -> str | None:
        """The unit in a user's systemd instance it runs in (.../user@1000.service/app.slice/x.service)."""
        parts = [p for p in self.cgroup.split("/") if p]
        for i, part in enumerate(parts):
            if part.startswith("user@") and part.endswith(".service"):
                units = [p for p in parts[i + 1:] if p.endswith((".service", ".scope"))]
                return units[-1] if units else None
        return None

    @property
    def session_device_keeper(self) -> bool:
        """PID 1 (logind's fd store) or systemd-logind itself: they keep a copy of every device a session
        took through logind, and let go of it when the session ends."""
        return self.pid == 1 or self.unit == "systemd-logind.service"

    def describe(self) -> str:
        return f"pid {self.pid} ({self.command}) via {self.node}"


class Session(NamedTuple):
    """A logind session, read from logind's own state files."""

    id: str
    uid: int
    type: str  # x11, wayland, tty, unspecified
    active: bool
    seat: str = ""  # seat0 for the local display; empty for remote and background sessions

    @property
    def graphical(self) -> bool:
        return self.type in ("x11", "wayland", "mir")


class HugepagePool(NamedTuple):
    size_kb: int
    node: int | None  # None: the global pool
    total: int
    free: int
    # Promised to mappings that have not touched them yet (a started QEMU's hugetlbfs mmap): free, but
    # not for anyone else. The kernel counts them for the global pool only.
    reserved: int = 0
