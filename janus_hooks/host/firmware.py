"""QEMU firmware descriptors (``/usr/share/qemu/firmware/*.json``, overridden from ``/etc/qemu/firmware``):
what UEFI firmware the host offers to a q35 guest, the same files libvirt chooses from."""

from __future__ import annotations

import fnmatch
import json
import os

from janus_hooks.host.sysfs import Host

_DIRS = ("usr/share/qemu/firmware", "etc/qemu/firmware")


def uefi_features(host: Host, machine: str = "pc-q35-7.2") -> list[set[str]]:
    """The feature sets of every UEFI firmware for x86_64 ``machine``; a file in /etc hides one of the same
    name in /usr/share, as in QEMU's own lookup."""
    files: dict[str, object] = {}
    for directory in _DIRS:
        base = host.path(directory)
        try:
            names = sorted(os.listdir(base))
        except OSError:
            continue
        files.update({n: base / n for n in names if n.endswith(".json")})
    found = []
    for name in sorted(files):
        try:
            data = json.loads(files[name].read_text())  # type: ignore[attr-defined]
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or "uefi" not in data.get("interface-types", []):
            continue
        for target in data.get("targets", []):
            if target.get("architecture") == "x86_64" and any(
                    fnmatch.fnmatch(machine, pattern) for pattern in target.get("machines", [])):
                found.append(set(data.get("features", [])))
                break
    return found


def offers_secure_boot(host: Host) -> bool:
    """A firmware with Secure Boot on and Microsoft's keys enrolled exists (Debian: the ovmf package)."""
    return any({"secure-boot", "enrolled-keys"} <= features for features in uefi_features(host))


def offers_uefi(host: Host) -> bool:
    return bool(uefi_features(host))
