"""janus-hooks next to other people's hooks: a classic /etc/libvirt/hooks/qemu dispatcher with per-VM scripts
(the PassthroughPOST layout) and another executable drop-in in qemu.d."""

from __future__ import annotations

import os

import pytest

from tests.libvirt.conftest import (
    HOOKS_DIR,
    PREFIX,
    QEMU_D,
    SHIM,
    fingerprint,
    hook_log_lines,
    pool,
    write_executable,
)

pytestmark = pytest.mark.libvirt

PHASES = ["prepare begin", "start begin", "started begin", "stopped end", "release end"]

# A dispatcher as single-GPU guides install it: log, then run qemu.d/<vm>/<op>/<sub>/* in name order.
DISPATCHER = """#!/bin/bash
# Classic libvirt qemu hook (janus-hooks test suite): runs qemu.d/$1/$2/$3/* for the VM.
size=$(wc -c)
printf '%s\\t%s\\t%s\\t%s\\t%s\\n' classic "$1" "$2" "$3" "$size" >> {log}
dir="$(dirname "$0")/qemu.d/$1/$2/$3"
if [ -d "$dir" ]; then
  for script in "$dir"/*; do
    if [ -f "$script" ] && [ -x "$script" ]; then "$script" "$@" </dev/null || exit 1; fi
  done
fi
exit 0
"""


@pytest.fixture
def others(libvirtd, janus, calls):
    """The dispatcher, a per-VM script for prepare and release, and another drop-in; removed afterwards."""
    janus.ensure_installed()
    janus.uninstall()  # install comes after the others, as on a machine that had them first
    vm = PREFIX + "coexist"
    dispatcher = write_executable(HOOKS_DIR / "qemu", DISPATCHER.format(log=calls.log))
    per_vm = [calls.recorder(QEMU_D / vm / op / sub / "10-gpu.sh", "per-vm")
              for op, sub in (("prepare", "begin"), ("release", "end"))]
    other = calls.recorder(QEMU_D / "50-other", "other")
    libvirtd.rescan_hooks()
    paths = (dispatcher, other, QEMU_D / vm)
    try:
        yield vm, paths
    finally:
        dispatcher.unlink(missing_ok=True)
        for script in per_vm:
            script.unlink(missing_ok=True)
        for d in sorted((p for p in (QEMU_D / vm).rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            d.rmdir()
        if (QEMU_D / vm).is_dir():
            (QEMU_D / vm).rmdir()
        janus.ensure_installed()


def test_dispatcher_and_other_drop_in_keep_running_in_order_and_uninstall_leaves_them(janus, vms, calls, others):
    vm, paths = others
    before = fingerprint(paths)
    proc = janus.install()
    assert fingerprint(paths) == before, "install touched hooks that are not its own"
    assert "has hook scripts of its own" in proc.stdout + proc.stderr  # install names the per-VM scripts

    pages = 64
    start_pool = pool()
    dom = vms.define(vm, memory_mib=pages * 2, mode="single-gpu", hugepages=True)
    log_before = len(hook_log_lines())
    vms.start(dom)
    assert pool()["nr"] == start_pool["nr"] + max(0, pages - start_pool["free"])
    vms.destroy(dom)
    assert pool()["nr"] == start_pool["nr"]

    # libvirt: the classic hook first, then the drop-ins by name (50-other < janus-hooks); the dispatcher
    # runs the VM's own scripts. Each exactly once per phase: janus-hooks neither replaced nor re-ran them.
    expected = []
    for phase in PHASES:
        expected.append(("classic", phase))
        if phase in ("prepare begin", "release end"):
            expected.append(("per-vm", phase))
        expected.append(("other", phase))
    assert [(t, f"{o} {s}") for t, _, o, s, _ in calls.entries(vm)] == expected
    assert all(size > 300 for t, *_, size in calls.entries(vm) if t != "per-vm")  # everyone got the XML
    lines = [line for line in hook_log_lines()[log_before:] if f"VM {vm}:" in line]
    assert sum("prepared 1 step(s)" in line for line in lines) == 1, lines
    assert sum("released, 1 change(s) reverted" in line for line in lines) == 1, lines

    janus.uninstall()
    assert not SHIM.exists()
    assert fingerprint(paths) == before, "uninstall touched hooks that are not its own"
    assert all(os.access(p, os.X_OK) for p in paths[:2])
    calls.clear()
    plain = vms.define(PREFIX + "coexist-after", mode=None)
    vms.start(plain)
    vms.destroy(plain)
    assert [t for t, *_ in calls.entries(PREFIX + "coexist-after")] == ["classic", "other"] * len(PHASES)
