"""Two hugepage VMs started one after the other before either QEMU took its pages: each gets its own."""

from __future__ import annotations

from janus_hooks.domain import parse_domain
from tests.conftest import domain_xml
from tests.fake import hosts
from tests.fake.world import write
from tests.hostile import tally

GLOBAL = "sys/kernel/mm/hugepages/hugepages-2048kB/"


def _xml(vm: str) -> str:
    return domain_xml(name=vm, hugepages=True, memory_mib=1024)


def _added(h, vm: str) -> int:
    plan = h.janus().plan(parse_domain(_xml(vm)))
    return sum(a.pages for a in plan.actions if a.kind == "allocate-hugepages")


def test_pages_another_vm_added_and_has_not_taken_are_not_free(fake):
    h = fake(hosts.numa_two_nodes)
    before = h.snapshot()
    assert h.hook("vm-a", "prepare", "begin", _xml("vm-a")) == (0, "")
    assert h.read(GLOBAL + "nr_hugepages") == "512" and h.read(GLOBAL + "free_hugepages") == "512"
    # vm-a's QEMU has not started: its 512 free pages are promised, vm-b needs its own.
    assert _added(h, "vm-b") == 512
    assert h.hook("vm-b", "prepare", "begin", _xml("vm-b")) == (0, "")
    assert h.read(GLOBAL + "nr_hugepages") == "1024"
    for vm in ("vm-b", "vm-a"):
        assert h.hook(vm, "release", "end", _xml(vm)) == (0, "")
    tally.check_host(before, h.snapshot())
    tally.record("races run")


def test_reserved_pages_are_not_free(fake):
    """A running QEMU's mapping reserves its pages: free_hugepages still counts them, resv_hugepages says so."""
    h = fake(hosts.numa_two_nodes)
    write(h.root / GLOBAL / "nr_hugepages", "512\n")
    write(h.root / GLOBAL / "free_hugepages", "512\n")
    write(h.root / GLOBAL / "resv_hugepages", "512\n")
    assert _added(h, "vm-b") == 512
    write(h.root / GLOBAL / "resv_hugepages", "256\n")
    assert _added(h, "vm-b") == 256
    write(h.root / GLOBAL / "resv_hugepages", "0\n")
    assert _added(h, "vm-b") == 0
