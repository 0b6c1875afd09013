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
    """A real process holding a GPU node (read and write) and another node with O_PATH: gpu_holders finds the
    first, not the second. The node lives in the process's own mount namespace (a private tmpfs on /dev), so
    this machine's /dev is not touched; /proc shows the path as the process sees it, as on a desktop."""
    code = ("import os, subprocess, sys\n"
            "subprocess.run(['mount', '-t', 'tmpfs', 'janus-test', '/dev'], check=True)\n"
            "os.makedirs('/dev/dri')\n"
            "for n in ('card0', 'renderD128'): open('/dev/dri/' + n, 'w').close()\n"
            "a = os.open('/dev/dri/card0', os.O_RDWR); b = os.open('/dev/dri/renderD128', os.O_PATH)\n"
            "print(os.getpid(), a, b, flush=True); sys.stdin.read()\n")
    try:
        child = subprocess.Popen(["unshare", "-m", "--propagation", "private", sys.executable, "-c", code],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        pytest.skip("unshare is not installed")
    try:
        line = child.stdout.readline().split()
        if not line:
            pytest.skip(f"no private mount namespace here: {child.stderr.read().strip()[:200]}")
        pid, rw, opath = (int(x) for x in line)
        assert os.readlink(f"/proc/{pid}/fd/{rw}") == "/dev/dri/card0"
        assert REAL._fd_is_opath(pid, str(opath)) and not REAL._fd_is_opath(pid, str(rw))
        holds = [h for h in REAL.gpu_holders() if h.pid == pid]
        assert [h.node for h in holds] == ["/dev/dri/card0"]
        assert holds[0].uid == 0 and holds[0].describe().startswith(f"pid {pid} (")
    finally:
        child.stdin.close()
        child.wait(timeout=10)
