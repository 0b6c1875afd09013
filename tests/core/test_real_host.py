"""Host reads this machine's real /sys and /proc (no GPU here, but real PCI devices, nodes and hugepages)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from janus_hooks.host import Host
from janus_hooks.snapshot import HostSnapshot

REAL = Host("/")


def test_real_pci_devices_and_pools_are_read():
    if not Path("/sys/bus/pci/devices").is_dir():
        pytest.skip("no PCI bus visible on this machine")
    devices = REAL.pci_devices()
    assert devices and all(len(d.address) == 12 and d.vendor.startswith("0x") for d in devices)
    assert REAL.boot_id() != "unknown"
    assert 2048 in REAL.hugepage_sizes()
    pool = REAL.hugepage_pool(2048)
    assert pool is not None and pool.total >= 0
    snap = HostSnapshot.read(REAL)
    assert set(snap.devices) == {d.address for d in devices}


def test_real_process_holding_a_node_is_found_and_opath_is_not(tmp_path):
    """A real child process with /dev/null open as O_RDWR and O_PATH: only real opens count as holds."""
    # /dev/null stands in for a GPU node: the prefixes are matched on what /proc/<pid>/fd links say.
    code = ("import os, sys, time; a = os.open('/dev/null', os.O_RDWR); b = os.open('/dev/zero', os.O_PATH);"
            "print(a, b, flush=True); sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        rw, opath = child.stdout.readline().split()
        fd_dir = f"/proc/{child.pid}/fd"
        assert os.readlink(f"{fd_dir}/{rw}") == "/dev/null"
        assert not REAL._fd_is_opath(child.pid, rw)
        assert REAL._fd_is_opath(child.pid, opath)
    finally:
        child.stdin.close()
        child.wait(timeout=10)
