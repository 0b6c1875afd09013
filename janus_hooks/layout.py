"""Where janus-hooks keeps its own files below a root; stdlib-only so the hook's fast path can use it."""

from __future__ import annotations

import os

CONFIG_DIR = "etc/janus-hooks"
STATE_DIR = "var/lib/janus-hooks"
LOG_DIR = "var/log/janus-hooks"


def vm_filename(vm: str) -> str:
    """A VM name as one file name a person recognises: kept as is (spaces, quotes and all) but for
    "%" and "/" which are percent-encoded, and the names "." and ".."."""
    name = vm.replace("%", "%25").replace("/", "%2F")
    return name.replace(".", "%2E") if name in (".", "..") else name


def vm_from_filename(name: str) -> str:
    """The VM name a file name stands for: the inverse of ``vm_filename``."""
    return name.replace("%2F", "/").replace("%2E", ".").replace("%25", "%")


def profile_file(root: str, vm: str) -> str:
    return os.path.join(root, CONFIG_DIR, "vms", vm_filename(vm) + ".toml")


def journal_file(root: str, vm: str) -> str:
    return os.path.join(root, STATE_DIR, "journal", vm_filename(vm) + ".jsonl")
