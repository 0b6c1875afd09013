"""Block devices and who uses them: what ``vm create`` reads before it gives a disk to a guest.

A disk is in use when a mounted filesystem or a swap area lives on it (the host's storage map,
``storage.py``, follows them through device-mapper, md and partitions down to whole disks), or when another
block device is stacked on it or on one of its partitions (``/sys/class/block/<name>/holders``: LVM, LUKS,
RAID members are used even while nothing on them is mounted). Reads only, below ``Host(root)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from janus_hooks.host.sysfs import Host


@dataclass(frozen=True)
class BlockUse:
    device: str  # the disk, partition or holder that is used (sda2, dm-0)
    how: str  # "mounted on /", "swap", "LVM (dm-0)"...
    root: bool = False  # holds the host's root filesystem


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _list(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def is_device_path(path: str) -> bool:
    """A path a person gives for a device node (``/dev/sdb``, ``/dev/disk/by-id/...``), not an image file."""
    return path.startswith("/dev/")


def block_name(host: Host, dev_path: str) -> str | None:
    """The kernel's name (sda1, dm-0, nvme0n1p2) of a /dev path, following its links within the root;
    None when it is not a block device the kernel knows."""
    root = os.path.realpath(host.root)
    resolved = os.path.realpath(host.path(dev_path.lstrip("/")))
    if os.path.commonpath([root, resolved]) != root:
        return None
    name = os.path.basename(resolved)
    return name if host.path("sys/class/block", name).exists() else None


def _dev_number(host: Host, name: str) -> str:
    return _read(host.path("sys/class/block", name, "dev"))


def partitions(host: Host, disk: str) -> list[str]:
    base = host.path("sys/class/block", disk)
    return [p for p in _list(base) if (base / p / "partition").exists()]


def is_partition(host: Host, name: str) -> bool:
    return host.path("sys/class/block", name, "partition").exists()


def size_bytes(host: Host, name: str) -> int:
    """The device's size (``size`` counts 512-byte sectors whatever the logical block size)."""
    text = _read(host.path("sys/class/block", name, "size"))
    return int(text) * 512 if text.isdigit() else 0


def _holder_kind(host: Host, holder: str) -> str:
    if holder.startswith("md"):
        return "RAID"
    uuid = _read(host.path("sys/class/block", holder, "dm", "uuid"))
    for prefix, kind in (("LVM-", "LVM"), ("CRYPT-", "LUKS/dm-crypt"), ("mpath-", "multipath")):
        if uuid.startswith(prefix):
            return kind
    return "device-mapper" if holder.startswith("dm-") else "another block device"


def whole_disk(host: Host, name: str) -> str:
    """The disk a partition is on (sda for sda2); a disk or a stacked device is its own."""
    if not is_partition(host, name):
        return name
    return os.path.basename(os.path.dirname(os.path.realpath(host.path("sys/class/block", name))))


def uses(host: Host, name: str) -> list[BlockUse]:
    """Everything that uses block device ``name``: a mounted filesystem or swap area the storage map
    (``host.storage_backing()``) follows down to it, and any device stacked on it or on its partitions
    (LVM, LUKS, RAID members are used even while nothing on them is mounted)."""
    disk = whole_disk(host, name)
    found: list[BlockUse] = []
    for backing in host.storage_backing():
        if disk not in backing.disks:
            continue
        # A whole disk is used by whatever lives on any part of it; a partition only by what sits on it.
        if disk == name or block_name(host, backing.source) == name or _holders(host, name):
            found.append(BlockUse(name, f"holds {backing.describe()}", root=backing.use == "filesystem /"))

    def stacked(dev: str) -> None:
        for holder in _holders(host, dev):
            found.append(BlockUse(dev, f"in use by {_holder_kind(host, holder)} ({holder})"))
        for part in partitions(host, dev):
            stacked(part)

    stacked(name)
    return found


def _holders(host: Host, name: str) -> list[str]:
    return _list(host.path("sys/class/block", name, "holders"))
