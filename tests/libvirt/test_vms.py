"""VMs started and destroyed through libvirt-python with janus-hooks installed: unmanaged, hugepage-backed, refused."""

from __future__ import annotations

import math
import os
from pathlib import Path

import libvirt
import pytest

from tests.libvirt.conftest import (
    CONFIG_DIR,
    JOURNAL_DIR,
    PREFIX,
    QEMU_D,
    fingerprint,
    hook_log_lines,
    journal_of,
    pool,
    pools,
    set_pool,
)

pytestmark = pytest.mark.libvirt

PHASES = ["prepare begin", "start begin", "started begin", "stopped end", "release end"]
GUEST_MIB = 128
PAGES = GUEST_MIB * 1024 // 2048


def _host_state() -> dict:
    """What janus-hooks could change on this host without a GPU: the pools, its config, its journals."""
    return {"pools": {size: p["nr"] for size, p in pools().items()}, "config": fingerprint((CONFIG_DIR,)),
            "journals": sorted(p.name for p in JOURNAL_DIR.glob("*"))}


def test_unmanaged_vm_runs_every_phase_and_nothing_changes(installed, vms, calls):
    calls.recorder(QEMU_D / "00-before", "before")
    calls.recorder(QEMU_D / "zz-after", "after")
    name = PREFIX + "unmanaged"
    dom = vms.define(name, hugepages=False)
    before, log_before = _host_state(), len(hook_log_lines())
    vms.start(dom)
    assert dom.isActive()
    vms.destroy(dom)
    # janus-hooks sits between the two recorders (00-before < janus-hooks < zz-after): both saw every phase,
    # in libvirt's order, with the whole domain XML on stdin each time.
    for tag in ("before", "after"):
        assert calls.phases(name, tag) == PHASES
    assert [t for t, *_ in calls.entries(name)] == ["before", "after"] * len(PHASES)
    assert all(size > 300 for *_, size in calls.entries(name))
    assert _host_state() == before
    assert not [line for line in hook_log_lines()[log_before:] if name in line], "fast path logged"
    assert not journal_of(name).exists()


def _managed_cycle(vms, name: str, preset: int = 0) -> None:
    """Start a managed 128 MiB hugepage VM with ``preset`` pages already in the pool, check, destroy, check."""
    if preset:
        set_pool(pool()["nr"] + preset)
    before = pool()
    missing = max(0, PAGES - before["free"])
    dom = vms.define(name, memory_mib=GUEST_MIB, mode="single-gpu", hugepages=True)
    log_before = len(hook_log_lines())
    vms.start(dom)
    running = pool()
    assert running["nr"] == before["nr"] + missing, (before, running)
    # QEMU maps its RAM from hugetlbfs and libvirt has it preallocated: the pages are in use, not just there.
    assert running["free"] == before["free"] + missing - PAGES, (before, running)
    assert journal_of(name).exists()
    vms.destroy(dom)
    after = pool()
    assert after["nr"] == before["nr"], (before, after)
    assert after["free"] == before["free"]
    assert not journal_of(name).exists()
    lines = hook_log_lines()[log_before:]
    if missing:
        assert any(f"VM {name}: prepared 1 step(s)" in line for line in lines), lines
        assert any(f"VM {name}: released, 1 change(s) reverted" in line for line in lines), lines
    else:
        assert any(f"VM {name}: prepared 0 step(s)" in line for line in lines), lines


def test_managed_hugepage_vm_allocates_for_real_and_gives_back(installed, vms):
    _managed_cycle(vms, PREFIX + "hugepages")


def test_free_pages_already_in_the_pool_are_used_and_the_pool_is_left_as_it_was(installed, vms):
    start = pool()["nr"]
    try:
        _managed_cycle(vms, PREFIX + "hugepages-preset", preset=PAGES // 4)
    finally:
        set_pool(start)


def _refused(vms, name: str, **kwargs) -> str:
    before, log_before = _host_state(), len(hook_log_lines())
    dom = vms.define(name, mode="single-gpu", hugepages=True, **kwargs)
    with pytest.raises(libvirt.libvirtError) as err:
        vms.start(dom)
    assert not dom.isActive()
    assert _host_state() == before
    assert not journal_of(name).exists()
    return str(err.value), hook_log_lines()[log_before:]


def test_start_refused_when_the_page_size_has_no_pool(installed, vms):
    name = PREFIX + "refused-page-size"
    message, _ = _refused(vms, name, memory_mib=GUEST_MIB, page_kb=4096)  # x86 has 2 MiB and 1 GiB pages only
    # libvirt's error carries janus-hooks' one line (libvirt adds its own prefix and the child's command).
    assert message.rstrip().endswith(
        f"janus-hooks: VM '{name}': this host has no 4096 kB hugepage pool (VM '{name}' asks for 4096 kB pages)"
    ), message
    assert "Hook script execution failed" in message


def test_start_refused_when_the_numa_node_does_not_exist(installed, vms):
    nodes = sorted(int(n[4:]) for n in os.listdir("/sys/devices/system/node") if n[4:].isdigit())
    missing = max(nodes) + 1
    name = PREFIX + "refused-node"
    message, _ = _refused(vms, name, memory_mib=GUEST_MIB, nodeset=str(missing))
    assert f"janus-hooks: VM '{name}': NUMA node {missing} has no 2048 kB hugepage pool" in message, message


def test_libvirt_failing_after_prepare_still_gets_the_pool_back(installed, vms):
    """1 GiB pages: janus-hooks allocates them on prepare, then libvirt finds no 1 GiB hugetlbfs mount and
    aborts the start itself; its `release end` must give the page back."""
    gib = pool(1048576)
    if not gib:
        pytest.skip("this kernel has no 1 GiB hugepage pool")
    with open("/proc/mounts") as mounts:
        if any("hugetlbfs" in line and "pagesize=1024M" in line for line in mounts):
            pytest.skip("a 1 GiB hugetlbfs is mounted: libvirt would not fail after prepare")
    name = PREFIX + "gigantic"
    log_before = len(hook_log_lines())
    message, _ = _refused(vms, name, memory_mib=GUEST_MIB, page_kb=1048576)
    lines = hook_log_lines()[log_before:]
    if "janus-hooks:" in message:
        # The kernel had no free contiguous GiB: janus-hooks refused and rolled back itself. Still fine.
        assert "1048576 kB hugepages" in message, message
    else:
        assert "Unable to find any usable hugetlbfs mount for 1048576 KiB" in message, message
        assert any(f"VM {name}: released, 1 change(s) reverted" in line for line in lines), lines


def test_start_refused_when_the_host_cannot_have_the_pages(installed, vms):
    """A VM larger than the host's RAM: janus-hooks refuses before asking the kernel (asking would squeeze
    the running desktop for pages it cannot get), with one line, and the pool stays as it was."""
    with open("/proc/meminfo") as meminfo:
        total_kb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    mib = math.ceil(total_kb / 1024) + 1024
    name = PREFIX + "too-big"
    message, _ = _refused(vms, name, memory_mib=mib)
    assert f"janus-hooks: VM '{name}': " in message and "MiB of memory is available" in message, message


def test_a_refused_start_stays_in_status_until_a_start_succeeds(installed, vms):
    """The record of a refused start (status, the agent's notification) is cleared by libvirt's `started`
    phase of a later start that worked, and by nothing before it."""
    from janus_hooks.layout import failure_file

    name = PREFIX + "refused-then-fixed"
    message, _ = _refused(vms, name, memory_mib=GUEST_MIB, page_kb=4096)
    record = Path(failure_file("/", name))
    assert record.exists(), f"the refused start left no record at {record}"
    shown = _status_of(installed, name)
    assert any(line.startswith("    last failed start: ") and "no 4096 kB hugepage pool" in line
               for line in shown), shown
    vms.lookup(name).undefine()
    dom = vms.define(name, memory_mib=GUEST_MIB, mode="single-gpu", hugepages=True)  # fixed: 2 MiB pages
    vms.start(dom)
    assert dom.isActive()
    assert not record.exists(), "the record of the refused start outlived a start that worked"
    shown = _status_of(installed, name)
    assert shown and not any("last failed start" in line for line in shown), shown
    vms.destroy(dom)


def _status_of(janus, vm: str) -> list[str]:
    """The lines `status` shows for one VM: its own line and the indented ones under it."""
    lines = janus.command("status").stdout.splitlines()
    at = next((i for i, line in enumerate(lines) if line.startswith(f"  {vm} ")), None)
    if at is None:
        return []
    block = [lines[at]]
    for line in lines[at + 1:]:
        if not line.startswith("    "):
            break
        block.append(line)
    return block
