"""Block devices and who uses them: what ``vm create`` reads before it gives a disk to a guest.

A disk is in use when it or one of its partitions is mounted (``/proc/self/mountinfo``, by device number
and by source), is active swap (``/proc/swaps``), or is held by another block device (device-mapper for
LVM or LUKS, md for RAID: ``/sys/class/block/<name>/holders``), following holders down to their mounts.
Reads only, below ``Host(root)``, so that tests build the whole picture as a tree of files.
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


def _mounts(host: Host) -> list[tuple[str, str, str]]:
    """(major:minor, mount point, source) of every mount."""
    found = []
    for line in _read(host.path("proc/self/mountinfo")).splitlines():
        fields = line.split()
        if len(fields) < 10 or "-" not in fields:
            continue
        sep = fields.index("-")
        found.append((fields[2], _unescape(fields[4]), _unescape(fields[sep + 2])))
    return found


def _unescape(text: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        text = text.replace(code, char)
    return text


def _swaps(host: Host) -> list[str]:
    lines = _read(host.path("proc/swaps")).splitlines()[1:]
    return [line.split()[0] for line in lines if line.split()]


def uses(host: Host, name: str) -> list[BlockUse]:
    """Everything that uses block device ``name``, one of its partitions or what holds them."""
    mounts = _mounts(host)
    swaps = {block_name(host, s) for s in _swaps(host) if s.startswith("/dev/")}
    found: list[BlockUse] = []
    seen: set[str] = set()

    def visit(dev: str, via: str | None) -> None:
        if dev in seen:
            return
        seen.add(dev)
        number = _dev_number(host, dev)
        for dev_no, point, source in mounts:
            by_source = source.startswith("/dev/") and block_name(host, source) == dev
            if (number and dev_no == number) or by_source:
                found.append(BlockUse(dev, f"mounted on {point}" + (f" through {via}" if via else ""),
                                      root=point == "/"))
        if dev in swaps:
            found.append(BlockUse(dev, "active swap" + (f" through {via}" if via else "")))
        for holder in _list(host.path("sys/class/block", dev, "holders")):
            found.append(BlockUse(dev, f"in use by {_holder_kind(host, holder)} ({holder})"))
            visit(holder, holder)
        for part in partitions(host, dev):
            visit(part, via)

    visit(name, None)
    return found
