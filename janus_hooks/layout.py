"""Where janus-hooks keeps its own files below a root; stdlib-only so the hook's fast path can use it."""

from __future__ import annotations

import os

CONFIG_DIR = "etc/janus-hooks"
STATE_DIR = "var/lib/janus-hooks"
LOG_DIR = "var/log/janus-hooks"


# File systems take 255 bytes per name; the longest suffix (".jsonl", a discard time stamp) must still fit.
MAX_NAME_BYTES = 200
HASHED = "%~"  # never produced by the encoding ("%" itself becomes "%25"): marks a shortened name


def vm_filename(vm: str) -> str:
    """A VM name as one file name a person recognises: kept as is (spaces, quotes and all) but for
    "%" and "/" which are percent-encoded, and the names "." and "..". A name too long for a file name
    keeps a readable beginning and gets a hash of the whole name (``is_hashed``)."""
    name = vm.replace("%", "%25").replace("/", "%2F")
    name = name.replace(".", "%2E") if name in (".", "..") else name
    encoded = name.encode(errors="surrogateescape")
    if len(encoded) <= MAX_NAME_BYTES:
        return name
    import hashlib

    digest = hashlib.sha256(vm.encode(errors="surrogateescape")).hexdigest()[:32]
    return encoded[:120].decode(errors="ignore") + HASHED + digest


def is_hashed(name: str) -> bool:
    """A file name shortened by ``vm_filename``: the VM's name is only in the file itself."""
    return HASHED in name


def vm_from_filename(name: str) -> str:
    """The VM name a file name stands for: the inverse of ``vm_filename`` (for a shortened name, only its
    beginning: read the name from the file)."""
    return name.replace("%2F", "/").replace("%2E", ".").replace("%25", "%")


def profile_file(root: str, vm: str) -> str:
    return os.path.join(root, CONFIG_DIR, "vms", vm_filename(vm) + ".toml")


def journal_file(root: str, vm: str) -> str:
    return os.path.join(root, STATE_DIR, "journal", vm_filename(vm) + ".jsonl")


def failure_file(root: str, vm: str) -> str:
    """The record of the VM's last failed start (``failures.FailureStore``)."""
    return os.path.join(root, STATE_DIR, "failures", vm_filename(vm) + ".json")
