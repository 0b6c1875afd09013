"""The hook under real libvirt with awkward inputs: a neighbour that ignores stdin, a big XML, odd names, many VMs."""

from __future__ import annotations

import time

import pytest

from tests.libvirt.conftest import PREFIX, QEMU_D, hook_log_lines, journal_of, pool, write_executable

pytestmark = pytest.mark.libvirt

PHASES = ["prepare begin", "start begin", "started begin", "stopped end", "release end"]


def test_a_hook_that_never_reads_stdin_with_an_xml_bigger_than_a_pipe(installed, vms, calls):
    # janus-hooks' own fast path exits without reading stdin too (on every phase it ignores); the XML is made
    # four times a pipe's 64 KiB so that libvirt's writer really meets a reader that went away.
    write_executable(QEMU_D / "10-silent", "#!/bin/sh\nexit 0\n")
    calls.paths.append(QEMU_D / "10-silent")
    calls.recorder(QEMU_D / "zz-rec", "rec")
    name = PREFIX + "silent-neighbour"
    dom = vms.define(name, memory_mib=128, mode="single-gpu", hugepages=True, description="x" * 256 * 1024)
    before = pool()
    for _ in range(3):
        vms.start(dom)
        vms.destroy(dom)
        assert pool()["nr"] == before["nr"]
    entries = calls.entries(name)
    assert [f"{o} {s}" for *_, o, s, _ in entries] == PHASES * 3
    assert all(size > 256 * 1024 for *_, size in entries)  # the recorder after them still got all of it


def test_a_vm_name_with_spaces_and_quotes(installed, vms, calls):
    calls.recorder(QEMU_D / "00-rec", "rec")
    name = PREFIX + """it's a "quoted" vm"""
    dom = vms.define(name, memory_mib=128, mode="single-gpu", hugepages=True)
    before, log_before = pool(), len(hook_log_lines())
    vms.start(dom)
    journal = journal_of(name)
    assert journal.exists(), journal
    vms.destroy(dom)
    assert pool()["nr"] == before["nr"] and not journal.exists()
    assert calls.phases(name, "rec") == PHASES  # the name reached hooks as one argument, unchanged
    lines = hook_log_lines()[log_before:]
    assert any(f"VM {name}: released, " in line for line in lines), lines


def test_twenty_unmanaged_vms_in_a_loop(installed, vms, calls):
    calls.recorder(QEMU_D / "zz-rec", "rec")
    names = [f"{PREFIX}loop-{i:02d}" for i in range(20)]
    doms = [vms.define(name) for name in names]
    failures, started = [], time.monotonic()
    for name, dom in zip(names, doms, strict=True):
        try:
            vms.start(dom)
            vms.destroy(dom)
        except Exception as err:  # noqa: BLE001 - count every failure, report them all
            failures.append(f"{name}: {err}")
    assert not failures, failures
    assert all(calls.phases(name, "rec") == PHASES for name in names)
    assert time.monotonic() - started < 20 * 10, "a start/stop took more than 10 s on average"
