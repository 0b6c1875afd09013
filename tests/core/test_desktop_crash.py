"""Crash safety on the systemd desktop: logind's fd store, a lingering user's units, the GPU's audio function,
hugepages. A real kill -9 after every journal append and every change, a fault at every kernel operation;
each time the host tree ends byte-identical to what it was before the start."""

from __future__ import annotations

from pathlib import Path

import pytest

from janus_hooks.domain import parse_domain
from tests.conftest import FAST_TIMEOUTS, FakeHost, domain_xml
from tests.core.helpers import assert_same_tree, kill_hook_at
from tests.fake import hosts

XML = domain_xml(hostdevs=hosts.DESKTOP_FUNCTIONS, hugepages=True, memory_mib=1024)


def _desktop(root: Path) -> FakeHost:
    hosts.systemd_desktop(root, linger=True)
    h = FakeHost(root)
    h.config(FAST_TIMEOUTS)
    return h


def test_plan_covers_the_desktop(tmp_path):
    plan = _desktop(tmp_path / "probe").janus().plan(parse_domain(XML))
    assert [a.kind for a in plan.actions] == [
        "allocate-hugepages", "stop-user-units", "stop-unit", "end-session", "wait-released", "unbind-vtconsole",
        "unload-module", "load-module", "load-module", "bind-vfio", "bind-vfio"]


@pytest.mark.parametrize("event", ["intent", "applied"])
def test_kill_9_at_every_point_then_release_restores(tmp_path, event):
    steps = len(_desktop(tmp_path / "probe").janus().plan(parse_domain(XML)).actions)
    xml_file = tmp_path / "domain.xml"
    xml_file.write_text(XML)
    for step in range(steps):
        h = _desktop(tmp_path / f"{event}-{step}")
        before = h.snapshot()
        kill_hook_at(h.root, "win11", xml_file, event, step)
        code, err = h.hook("win11", "release", "end", XML)
        assert code == 0, f"{event} {step}: {err}"
        assert_same_tree(before, h.snapshot())
        assert h.journal_vms() == []


def test_fault_at_every_kernel_operation_rolls_back(tmp_path):
    probe = _desktop(tmp_path / "probe")
    assert probe.hook("win11", "prepare", "begin", XML)[0] == 0
    operations = probe.kernel.ops
    assert operations >= 8
    for fail_at in range(1, operations + 1):
        root = tmp_path / f"fault-{fail_at}"
        hosts.systemd_desktop(root, linger=True)
        h = FakeHost(root, fail_at=fail_at)
        h.config(FAST_TIMEOUTS)
        before = h.snapshot()
        code, err = h.hook("win11", "prepare", "begin", XML)
        assert code == 1 and f"injected fault at operation {fail_at}" in err and "\n" not in err, fail_at
        assert_same_tree(before, h.snapshot())
        assert h.journal_vms() == []


def test_fault_at_every_kernel_operation_of_the_release_then_a_rollback(tmp_path):
    probe = _desktop(tmp_path / "probe")
    assert probe.hook("win11", "prepare", "begin", XML)[0] == 0
    start = probe.kernel.ops
    assert probe.hook("win11", "release", "end", XML)[0] == 0
    for nth in range(1, probe.kernel.ops - start + 1):
        h = _desktop(tmp_path / f"release-{nth}")
        before = h.snapshot()
        assert h.hook("win11", "prepare", "begin", XML)[0] == 0
        h.kernel = type(h.kernel)(h.root, fail_at=nth)
        code, err = h.hook("win11", "release", "end", XML)
        assert code == 1 and "could not be reverted" in err, nth
        assert h.journal_vms() == ["win11"]
        h.kernel = type(h.kernel)(h.root)
        assert h.hook("win11", "release", "end", XML) == (0, ""), nth
        assert_same_tree(before, h.snapshot())
