"""Where janus-hooks keeps its own files below a root; stdlib-only so the hook's fast path can use it."""

from __future__ import annotations

import os

CONFIG_DIR = "etc/janus-hooks"
STATE_DIR = "var/lib/janus-hooks"
LOG_DIR = "var/log/janus-hooks"
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def vm_filename(vm: str) -> str:
    """A VM name as one safe file name: anything but [A-Za-z0-9._-] percent-encoded (spaces, quotes, /)."""
    name = "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in vm)
    # "." and ".." are names libvirt accepts but no file can have.
    return name.replace(".", "%2E") if name in (".", "..") else name


def profile_file(root: str, vm: str) -> str:
    return os.path.join(root, CONFIG_DIR, "vms", vm_filename(vm) + ".toml")


def journal_file(root: str, vm: str) -> str:
    return os.path.join(root, STATE_DIR, "journal", vm_filename(vm) + ".jsonl")
