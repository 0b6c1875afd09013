"""Crash safety: a real kill -9 after every journal append and every change, and a fault at every write.

Each time, recovery (libvirt's ``release end``, or the next ``prepare``) must leave the host tree exactly as
it was before the VM started.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from janus_hooks.domain import parse_domain
from tests.conftest import FAST_TIMEOUTS, FakeHost, domain_xml
from tests.core.helpers import assert_same_tree, diff, kill_hook_at
from tests.fake import hosts
from tests.hostile import tally

REPO = Path(__file__).resolve().parents[2]
XML = domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS, hugepages=True, memory_mib=4096)


def _steps(fake) -> int:
    h = fake(hosts.single_nvidia)
    return len(h.janus().plan(parse_domain(XML)).actions)


def test_plan_is_realistic(fake):
    # Hugepages, two units, a wait, console, framebuffer, four modules, two vfio modules, four functions.
    assert _steps(fake) == 16


@pytest.mark.parametrize("event", ["intent", "applied"])
def test_kill_9_at_every_point_then_release_restores(fake, tmp_path, event):
    steps = _steps(fake)
    for step in range(steps):
        root = tmp_path / f"{event}-{step}"
        hosts.single_nvidia(root)
        h = FakeHost(root)
        h.config(FAST_TIMEOUTS)
        before = h.snapshot()
        xml_file = tmp_path / "domain.xml"
        xml_file.write_text(XML)
        kill_hook_at(root, "win11", xml_file, event, step, timeout=60)
        assert h.journal_vms() == ["win11"]
        # libvirt calls release end even when the start failed half-way.
        code, err = h.hook("win11", "release", "end", XML)
        assert code == 0, f"{event} {step}: {err}"
        tally.check_host(before, h.snapshot())
        assert h.journal_vms() == []
        tally.record("crash points recovered")


def test_kill_9_then_next_start_recovers_first(fake, tmp_path):
    h = fake(hosts.single_nvidia)
    before = h.snapshot()
    xml_file = tmp_path / "domain.xml"
    xml_file.write_text(XML)
    subprocess.run([sys.executable, "-m", "tests.core.crash_child", str(h.root), "win11", str(xml_file),
                    "applied", "9"], cwd=REPO, capture_output=True, timeout=60)
    assert h.hook("win11", "prepare", "begin", XML) == (0, "")
    assert h.hook("win11", "release", "end", XML) == (0, "")
    assert_same_tree(before, h.snapshot())


def test_fault_at_every_kernel_operation_rolls_back(fake, tmp_path):
    probe = fake(hosts.single_nvidia)
    assert probe.hook("win11", "prepare", "begin", XML)[0] == 0
    operations = probe.kernel.ops
    assert operations > 15
    for fail_at in range(1, operations + 1):
        root = tmp_path / f"fault-{fail_at}"
        hosts.single_nvidia(root)
        h = FakeHost(root, fail_at=fail_at)
        h.config(FAST_TIMEOUTS)
        before = h.snapshot()
        code, err = h.hook("win11", "prepare", "begin", XML)
        assert code == 1, fail_at
        assert f"injected fault at operation {fail_at}" in err
        assert "\n" not in err
        tally.check_host(before, h.snapshot())
        assert h.journal_vms() == []
        tally.record("faults injected")


def test_fault_during_release_keeps_journal_until_a_later_rollback(fake, tmp_path):
    probe = fake(hosts.single_nvidia)
    assert probe.hook("win11", "prepare", "begin", XML)[0] == 0
    start = probe.kernel.ops
    assert probe.hook("win11", "release", "end", XML)[0] == 0
    operations = probe.kernel.ops - start
    release_ops = probe.kernel.log[start:]
    for nth in range(1, operations + 1):
        root = tmp_path / f"release-fault-{nth}"
        hosts.single_nvidia(root)
        h = FakeHost(root)
        h.config(FAST_TIMEOUTS)
        before = h.snapshot()
        assert h.hook("win11", "prepare", "begin", XML)[0] == 0
        h.kernel = type(h.kernel)(root, fail_at=nth)
        code, err = h.hook("win11", "release", "end", XML)
        if release_ops[nth - 1][1].endswith("efi-framebuffer/bind"):
            # A boot framebuffer that does not re-attach is a warning, never an open journal.
            assert code == 0 and h.journal_vms() == [], nth
            assert h.janus().store.notes("win11"), nth
            assert diff(before, h.snapshot()) == ["sys/bus/platform/devices/efi-framebuffer.0/driver"]
            continue
        assert code == 1 and "could not be reverted" in err, nth
        assert h.journal_vms() == ["win11"]
        # What could be reverted was; the rest waits in the journal for the next try.
        h.kernel = type(h.kernel)(root)
        assert h.hook("win11", "release", "end", XML) == (0, ""), nth
        tally.check_host(before, h.snapshot())
        tally.record("faults injected")


def test_failure_whose_rollback_also_fails_says_both_and_keeps_the_journal(fake, tmp_path):
    root = tmp_path / "double"
    hosts.single_nvidia(root)
    h = FakeHost(root)
    h.config(FAST_TIMEOUTS)
    before = h.snapshot()
    # The first vfio probe fails, and so does reloading nvidia_drm on the way back.
    h.kernel = type(h.kernel)(root, fault=lambda n, op, target: (op, target) in (
        ("write", "sys/bus/pci/drivers_probe"), ("load", "nvidia_drm")))
    code, err = h.hook("win11", "prepare", "begin", XML)
    assert code == 1 and "\n" not in err
    assert err.startswith("janus-hooks: VM 'win11': bind 0000:01:00.0 to vfio-pci: injected fault at operation ")
    assert "; reverting failed too (undo unload module nvidia_drm: injected fault" in err
    assert err.endswith("run 'janus-hooks rollback win11'")
    assert h.journal_vms() == ["win11"]
    h.kernel = type(h.kernel)(root)
    assert h.hook("win11", "release", "end", XML) == (0, "")
    assert_same_tree(before, h.snapshot())
