"""What holds the host's filesystems and swap: mount -> block device -> whole disks -> PCI controllers.

Read once per snapshot from the mount table (``/proc/1/mountinfo``: the host's view, not the caller's),
``/proc/swaps`` and ``/sys/class/block``. Stacked devices (device mapper: LVM, LUKS; md RAID) are followed
through their ``slaves`` down to the disks, partitions up to their whole disk, and a disk's sysfs path up to
the nearest PCI device: the controller that must never be taken from the host while the system runs on it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from janus_hooks.host.sysfs import Host

PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
# Filesystems that sit on disks that sysfs does not name: their controllers cannot be found from here.
_OPAQUE_FS = ("zfs",)
_MAX_DEPTH = 16  # stacked devices and loop files nest a few levels; anything deeper is a cycle


class BackingDevice(NamedTuple):
    """One mounted filesystem or swap area followed down to the hardware it lives on.

    NamedTuples here: every start reads the host's storage, and a dataclass compiles its generated methods
    when its class is created (about five times what a NamedTuple costs each hook process).
    """

    use: str  # "filesystem /boot", "swap /dev/sda3"
    source: str  # as the mount table names it: /dev/mapper/vg-root
    disks: tuple[str, ...] = ()  # whole disks: sda, nvme0n1
    controllers: tuple[str, ...] = ()  # PCI addresses of the controllers behind the disks
    unresolved: str = ""  # why it could not be followed to its controllers; "" when it was

    def describe(self) -> str:
        return f"{self.use} ({self.source})"


class _Mount(NamedTuple):
    point: str
    major: int
    minor: int
    fstype: str
    source: str


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in mount tables as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mounts(text: str) -> list[_Mount]:
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2 or ":" not in fields[2]:
            continue
        major, _, minor = fields[2].partition(":")
        if not (major.isdigit() and minor.isdigit()):
            continue
        mounts.append(_Mount(_unescape(fields[4]), int(major), int(minor), tail[0], _unescape(tail[1])))
    return mounts


class StorageMap:
    """Follows mounts and swaps below one ``Host``'s root; build with ``StorageMap(host).backing()``."""

    def __init__(self, host: Host) -> None:
        self._host = host
        self._block = host.path("sys/class/block")

    def backing(self) -> list[BackingDevice]:
        """Every block-backed mounted filesystem and every swap area, each once per source device."""
        text = self._read_first("proc/1/mountinfo", "proc/self/mountinfo")
        if text is None:
            return [BackingDevice("filesystems", "mount table", unresolved="the mount table cannot be read")]
        mounts = _mounts(text)
        result: dict[str, BackingDevice] = {}
        for mount in sorted(mounts, key=lambda m: len(m.point)):
            device = self._mount_device(mount, mounts, depth=0)
            if device is not None and device.source not in result:
                result[device.source] = device
        for device in self._swaps(mounts):
            result.setdefault(device.source, device)
        return list(result.values())

    # --- mounts and swaps ----------------------------------------------------------------------------
    def _read_first(self, *names: str) -> str | None:
        for name in names:
            try:
                return self._host.path(name).read_text(errors="replace")
            except OSError:
                continue
        return None

    def _mount_device(self, mount: _Mount, mounts: list[_Mount], depth: int) -> BackingDevice | None:
        use = f"filesystem {mount.point}"
        if mount.fstype in _OPAQUE_FS:
            return BackingDevice(use, mount.source, unresolved=f"{mount.fstype} does not show its disks in sysfs")
        name = None
        if mount.major != 0:
            name = self._name_of_devnum(mount.major, mount.minor)
        elif mount.source.startswith("/dev/"):
            # btrfs and a few others report an anonymous device number; the source names the real one.
            name = self._name_of_node(mount.source)
        else:
            return None  # tmpfs, proc, overlay, network filesystems: no local disk behind them
        if name is None:
            return BackingDevice(use, mount.source, unresolved=f"{mount.source} is not in sysfs")
        return self._follow(use, mount.source, name, mounts, depth)

    def _swaps(self, mounts: list[_Mount]) -> list[BackingDevice]:
        text = self._read_first("proc/swaps") or ""
        devices = []
        for line in text.splitlines()[1:]:
            fields = line.split()
            if len(fields) < 2:
                continue
            path, kind = _unescape(fields[0]), fields[1]
            use = f"swap {path}"
            if kind == "partition":
                name = self._name_of_node(path)
                if name is None:
                    devices.append(BackingDevice(use, path, unresolved=f"{path} is not in sysfs"))
                    continue
                devices.append(self._follow(use, path, name, mounts, 0))
            else:
                devices.append(self._file_device(use, path, mounts, 0))
        return devices

    def _file_device(self, use: str, path: str, mounts: list[_Mount], depth: int) -> BackingDevice:
        """The device under a file (a swap file, a loop device's backing file): its filesystem's device."""
        holder = max((m for m in mounts if _contains(m.point, path)), key=lambda m: len(m.point), default=None)
        if holder is None:
            return BackingDevice(use, path, unresolved=f"no mounted filesystem holds {path}")
        inner = self._mount_device(holder, mounts, depth + 1)
        if inner is None:
            return BackingDevice(use, path)
        return BackingDevice(use, path, inner.disks, inner.controllers, inner.unresolved)

    # --- block devices --------------------------------------------------------------------------------
    def _name_of_devnum(self, major: int, minor: int) -> str | None:
        try:
            return os.path.basename(os.readlink(self._host.path("sys/dev/block", f"{major}:{minor}")))
        except OSError:
            return None

    def _name_of_node(self, node: str) -> str | None:
        """The sysfs name of a device node path (/dev/mapper/x, /dev/disk/by-uuid/..., /dev/sda2)."""
        leaf = self._resolve_dev_link(node)
        if (self._block / leaf).exists():
            return leaf
        if node.startswith("/dev/mapper/"):
            wanted = node[len("/dev/mapper/"):]
            for name in self._list(self._block):
                if name.startswith("dm-") and _read(self._block / name / "dm" / "name") == wanted:
                    return name
        return None

    def _resolve_dev_link(self, node: str) -> str:
        # /dev/disk/by-uuid/... and /dev/md/name are symbolic links to the kernel's name; followed here by
        # hand so that an absolute link stays below the host's root.
        path = node
        for _ in range(_MAX_DEPTH):
            try:
                target = os.readlink(self._host.path(path.lstrip("/")))
            except OSError:
                break
            path = os.path.normpath(target if target.startswith("/") else os.path.join(os.path.dirname(path), target))
        return os.path.basename(path)

    def _follow(self, use: str, source: str, name: str, mounts: list[_Mount], depth: int) -> BackingDevice:
        disks: set[str] = set()
        controllers: set[str] = set()
        problems: list[str] = []
        self._walk(name, mounts, depth, disks, controllers, problems)
        return BackingDevice(use, source, tuple(sorted(disks)), tuple(sorted(controllers)),
                             problems[0] if problems else "")

    def _walk(self, name: str, mounts: list[_Mount], depth: int, disks: set[str], controllers: set[str],
              problems: list[str]) -> None:
        if depth > _MAX_DEPTH:
            problems.append(f"{name}: devices stacked deeper than {_MAX_DEPTH} levels")
            return
        base = self._block / name
        if not base.exists():
            problems.append(f"{name} is not in sysfs")
            return
        if (base / "partition").exists():
            name = os.path.basename(os.path.dirname(os.path.realpath(base)))
            base = self._block / name
        slaves_dir = base / "slaves"
        slaves = self._list(slaves_dir)
        if slaves:
            # dm (LVM, LUKS, dm-crypt) and md RAID: the filesystem lives on every device below.
            for slave in slaves:
                self._walk(slave, mounts, depth + 1, disks, controllers, problems)
            return
        backing_file = _read(base / "loop" / "backing_file")
        if backing_file:
            inner = self._file_device(f"loop {name}", backing_file, mounts, depth + 1)
            disks.update(inner.disks)
            controllers.update(inner.controllers)
            if inner.unresolved:
                problems.append(inner.unresolved)
            return
        if name.startswith(("dm-", "md")) and not slaves_dir.is_dir():
            problems.append(f"{name}: its slaves cannot be read")
            return
        disks.add(name)
        controller = self._pci_parent(base)
        if controller:
            controllers.add(controller)

    def _pci_parent(self, block_dir: Path) -> str | None:
        """The nearest PCI device above a disk in the device tree (None for virtual and non-PCI disks)."""
        for part in reversed(Path(os.path.realpath(block_dir)).parts):
            if PCI_ADDRESS.match(part):
                return part
        return None

    @staticmethod
    def _list(directory: Path) -> list[str]:
        try:
            return sorted(os.listdir(directory))
        except OSError:
            return []


def _contains(point: str, path: str) -> bool:
    return point == "/" or path == point or path.startswith(point.rstrip("/") + "/")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""
