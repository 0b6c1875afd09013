"""The guest side fails under a managed hugepage VM: QEMU killed, libvirtd restarted while the VM runs."""

from __future__ import annotations

import os
import signal

import libvirt
import pytest

from tests.libvirt.conftest import PREFIX, QEMU_D, VM_TIMEOUT, hook_log_lines, journal_of, pool, wait_for

pytestmark = pytest.mark.libvirt

PAGES = 64


def _start_managed(vms, name: str):
    before = pool()
    dom = vms.define(name, memory_mib=PAGES * 2, mode="single-gpu", hugepages=True)
    vms.start(dom)
    added = max(0, PAGES - before["free"])
    assert pool()["nr"] == before["nr"] + added
    assert journal_of(name).exists()
    return dom, before


def test_qemu_killed_still_gets_release_and_the_pool_back(installed, vms, calls):
    calls.recorder(QEMU_D / "00-rec", "rec")
    name = PREFIX + "killed"
    dom, before = _start_managed(vms, name)
    os.kill(vms.qemu_pid(name), signal.SIGKILL)
    wait_for(lambda: dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF, VM_TIMEOUT, f"libvirt to notice {name} died")
    assert dom.state()[1] == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED
    # release end runs in libvirt's own clean-up of the dead QEMU: no destroy call from anyone.
    wait_for(lambda: not journal_of(name).exists(), VM_TIMEOUT, f"release end to close the journal of {name}")
    assert pool()["nr"] == before["nr"]
    assert calls.phases(name, "rec")[-2:] == ["stopped end", "release end"]


def test_libvirtd_restart_reconnects_without_rollback_and_destroy_restores(installed, libvirtd, vms, calls):
    calls.recorder(QEMU_D / "00-rec", "rec")
    name = PREFIX + "reconnect"
    _, before = _start_managed(vms, name)
    running, qemu = pool(), vms.qemu_pid(name)
    log_before = len(hook_log_lines())
    libvirtd.restart()  # skips when libvirtd is not scripts/libvirt-services' own
    # libvirtd reconnects to running QEMUs in a thread of its own, after it already answers calls: wait
    # for the hook's reconnect call and janus-hooks' note of it.
    wait_for(lambda: "reconnect begin" in calls.phases(name, "rec"), VM_TIMEOUT, f"reconnect begin for {name}")
    wait_for(lambda: any(f"VM {name}: libvirt reconnected; journal open" in line
                         for line in hook_log_lines()[log_before:]), VM_TIMEOUT, "janus-hooks to log the reconnect")
    dom = vms.lookup(name)  # through a fresh connection to the new daemon
    assert dom.isActive() and vms.qemu_pid(name) == qemu
    assert pool() == running and journal_of(name).exists(), "reconnect rolled something back"
    assert calls.phases(name, "rec")[-1] == "reconnect begin"
    vms.destroy(dom)
    assert pool()["nr"] == before["nr"]
    assert not journal_of(name).exists()
