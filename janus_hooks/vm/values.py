"""Validation of every value a person gives ``vm create``: names, sizes, PCI addresses, paths, accounts.

Each check returns the normalised value or raises ``VmError`` naming the value and why it is refused.
Values end up in XML through ElementTree (never string concatenation), so these checks are about meaning
and about what libvirt and QEMU accept, not about escaping.
"""

from __future__ import annotations

import re

from janus_hooks.cpuset import parse_cpulist
from janus_hooks.errors import JanusError

# libvirt accepts nearly any name, but the name also becomes a file name (volume, unattend ISO, logs):
# letters, digits and . _ + - only, starting with a letter or digit (no "..", no "/", no quotes).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,62}")
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", re.IGNORECASE)
_SIZE_FACTOR = {"": 1024**3, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4,
                "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}
_PCI = re.compile(r"(?:([0-9a-f]{4}):)?([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])")
# Windows local account names: at most 20 characters, none of these, not only dots or spaces.
_WINDOWS_USER_FORBIDDEN = set('"/\\[]:;|=,+*?<>@%')


class VmError(JanusError):
    """A value or a host fact that ``vm create``/``vm delete`` refuses; the message names it."""


def vm_name(text: str) -> str:
    if not _NAME.fullmatch(text) or ".." in text:
        raise VmError(f"VM name {text!r} is refused: use 1-63 letters, digits, '.', '_', '+' or '-', "
                      "starting with a letter or digit (it also names the VM's files)")
    return text


def libvirt_name(text: str, what: str) -> str:
    """A storage pool or network name: it names an existing libvirt object, so only plain names pass."""
    if not _NAME.fullmatch(text):
        raise VmError(f"{what} {text!r} is refused: use 1-63 letters, digits, '.', '_', '+' or '-', starting "
                      "with a letter or digit")
    return text


def size_bytes(text: str, what: str) -> int:
    """``8GiB``, ``8G``, ``512MiB``, ``64`` (GiB) -> bytes; binary units, ``GB``-style are decimal."""
    match = _SIZE.fullmatch(text)
    if not match:
        raise VmError(f"{what} {text!r} is not a size (examples: 8GiB, 512MiB)")
    number, unit = match.groups()
    key = (unit or "").lower().replace("ib", "")
    value = int(float(number) * _SIZE_FACTOR[key])
    if value <= 0:
        raise VmError(f"{what} {text!r} must be larger than zero")
    return value


def pci_address(text: str) -> str:
    """``01:00.0`` or ``0000:01:00.0`` -> ``0000:01:00.0``."""
    match = _PCI.fullmatch(text.strip().lower())
    if not match:
        raise VmError(f"PCI address {text!r} is not of the form 0000:01:00.0 or 01:00.0")
    domain, bus, slot, function = match.groups()
    return f"{domain or '0000'}:{bus}:{slot}.{function}"


def absolute_path(text: str, what: str) -> str:
    if not text.startswith("/") or "\0" in text or any(c in text for c in "\n\r"):
        raise VmError(f"{what} {text!r} must be an absolute path")
    return text


def windows_user(text: str) -> str:
    if not text or len(text) > 20 or set(text) & _WINDOWS_USER_FORBIDDEN or not text.strip(". ") \
            or any(ord(c) < 32 for c in text):
        raise VmError(f"account name {text!r} is refused: 1-20 characters, none of "
                      f"{''.join(sorted(_WINDOWS_USER_FORBIDDEN))}, not only dots or spaces")
    return text


def password(text: str) -> str:
    if any(ord(c) < 32 for c in text):
        raise VmError("the account password holds control characters (a line break?); refused")
    if len(text) > 127:
        raise VmError("the account password is longer than Windows accepts (127 characters)")
    return text


def cpu_list(text: str) -> list[int]:
    """``2-5`` or ``2,3,6-7`` (a kernel cpulist) -> host CPU numbers in ascending order."""
    try:
        cpus = sorted(parse_cpulist(text))
    except ValueError as err:
        raise VmError(f"CPU list {text!r} is not of the form 2-5 or 2,3,6-7") from err
    if not cpus:
        raise VmError(f"CPU list {text!r} is empty")
    return cpus


def human_size(size: int) -> str:
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2)):
        if size >= factor:
            return f"{size / factor:.4g} {unit}"
    return f"{size // 1024} KiB"
