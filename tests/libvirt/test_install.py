"""`janus-hooks install` / `uninstall` against a running libvirtd: the hook is seen without a restart.

libvirt caches whether a driver has any hook at all when it starts and on SIGHUP; with a non-empty
cache it lists qemu.d afresh on every call. So a first hook dropped into an empty qemu.d stays unseen
until SIGHUP, and install must send it.
"""

from __future__ import annotations

import pytest

from tests.libvirt.conftest import PREFIX, QEMU_D, SHIM, hook_log_lines

pytestmark = pytest.mark.libvirt

PHASES = ["prepare begin", "start begin", "started begin", "stopped end", "release end"]


def _clear_qemu_hooks() -> None:
    for path in QEMU_D.glob("*"):
        path.unlink()


def test_first_hook_needs_sighup_and_install_sends_it(libvirtd, janus, vms, calls):
    if janus.installed:
        janus.uninstall()
    _clear_qemu_hooks()
    libvirtd.rescan_hooks()  # libvirtd now knows of no qemu hook at all

    name = PREFIX + "sighup"
    dom = vms.define(name, mode="passthrough")  # managed, nothing to switch: janus logs prepare and release
    calls.recorder(QEMU_D / "00-probe", "probe")
    vms.start(dom)
    vms.destroy(dom)
    assert calls.phases(name, "probe") == [], "libvirt ran a hook it had not rescanned: the SIGHUP fact changed"

    log_before = len(hook_log_lines())
    janus.install()  # waits until libvirtd's daemon hook saw the reload that install asked for
    vms.start(dom)
    vms.destroy(dom)
    assert calls.phases(name, "probe") == PHASES
    new = hook_log_lines()[log_before:]
    assert any(f"VM {name}: prepared 0 step(s)" in line for line in new), new
    assert any(f"VM {name}: released, 0 change(s) reverted" in line for line in new), new


def test_uninstall_takes_the_hook_away_and_rescans(libvirtd, janus, vms, calls):
    janus.ensure_installed()
    calls.recorder(QEMU_D / "00-probe", "probe")
    name = PREFIX + "uninstalled"
    dom = vms.define(name, mode="passthrough")
    janus.uninstall()  # waits for the reload uninstall asked for
    assert not SHIM.exists()
    log_before = len(hook_log_lines())
    vms.start(dom)
    vms.destroy(dom)
    assert calls.phases(name, "probe") == PHASES  # the other drop-in still runs
    assert not [line for line in hook_log_lines()[log_before:] if name in line]
    janus.install()
