"""Hugepages: global pool, per NUMA node, partial grants, compaction, pages already free."""

from __future__ import annotations

from janus_hooks.domain import parse_domain
from tests.conftest import domain_xml
from tests.core.helpers import assert_same_tree
from tests.fake import hosts

GLOBAL = "sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
NODE = "sys/devices/system/node/node{}/hugepages/hugepages-{}kB/nr_hugepages"


def test_one_node_global_pool(fake):
    h = fake(hosts.numa_two_nodes)
    xml = domain_xml(name="vm", hugepages=True, memory_mib=1024)
    before = h.snapshot()
    assert h.hook("vm", "prepare", "begin", xml) == (0, "")
    assert h.read(GLOBAL) == "512"
    assert h.hook("vm", "release", "end", xml) == (0, "")
    assert_same_tree(before, h.snapshot())


def test_two_nodes_from_guest_cells(fake):
    h = fake(hosts.numa_two_nodes)
    xml = domain_xml(name="vm", hugepages=True, memory_mib=3072, cells=((0, 1024, "0"), (1, 2048, "1")))
    before = h.snapshot()
    assert h.hook("vm", "prepare", "begin", xml) == (0, "")
    assert h.read(NODE.format(0, 2048)) == "512"
    assert h.read(NODE.format(1, 2048)) == "1024"
    assert h.hook("vm", "release", "end", xml) == (0, "")
    assert_same_tree(before, h.snapshot())


def test_numatune_single_node_and_gigantic_pages(fake):
    h = fake(hosts.numa_two_nodes)
    xml = domain_xml(name="vm", hugepages=True, memory_mib=2048, page_kb=1048576, nodeset="1")
    assert h.hook("vm", "prepare", "begin", xml) == (0, "")
    assert h.read(NODE.format(1, 1048576)) == "2"
    assert h.read(NODE.format(0, 1048576)) == "0"
    assert h.hook("vm", "release", "end", xml) == (0, "")
    assert h.read(NODE.format(1, 1048576)) == "0"


def test_partial_grant_is_rolled_back_with_a_clear_message(fake):
    h = fake(hosts.numa_two_nodes, node_pages={0: 300, 1: 4096})
    xml = domain_xml(name="vm", hugepages=True, memory_mib=1024, nodeset="0")
    before = h.snapshot()
    code, err = h.hook("vm", "prepare", "begin", xml)
    assert code == 1
    assert err == (
        "janus-hooks: VM 'vm': add 512 x 2048 kB hugepages on node 0 (1024 MiB): "
        "only 300 of 512 2048 kB hugepages on node 0 could be allocated (600 of 1024 MiB)"
    )
    assert_same_tree(before, h.snapshot())
    assert h.journal_vms() == []


def test_fragmented_memory_is_compacted_then_granted(fake):
    h = fake(hosts.numa_two_nodes, node_pages={0: 100, 1: 100}, fragmented={0: 1000, 1: 1000})
    xml = domain_xml(name="vm", hugepages=True, memory_mib=1024, nodeset="0")
    assert h.hook("vm", "prepare", "begin", xml) == (0, "")
    assert h.read(NODE.format(0, 2048)) == "512"
    assert ("write", "proc/sys/vm/compact_memory", "1") in h.kernel.log


def test_free_pages_are_used_before_asking_for_more(fake):
    h = fake(hosts.numa_two_nodes)
    h.kernel.write(h.root / GLOBAL, "200")
    plan = h.janus().plan(parse_domain(domain_xml(name="vm", hugepages=True, memory_mib=1024)))
    [step] = [a for a in plan.actions if a.kind == "allocate-hugepages"]
    assert step.pages == 312


def test_release_gives_back_only_what_it_added(fake):
    """Two VMs grow the same pool; whichever stops first, the pool ends where it began."""
    h = fake(hosts.numa_two_nodes)
    a = domain_xml(name="a", hugepages=True, memory_mib=1024)
    b = domain_xml(name="b", hugepages=True, memory_mib=512)
    assert h.hook("a", "prepare", "begin", a)[0] == 0
    # VM a's QEMU would now use its pages; the fake marks them used by shrinking free_hugepages.
    (h.root / "sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages").write_text("0\n")
    assert h.hook("b", "prepare", "begin", b)[0] == 0
    assert h.read(GLOBAL) == "768"
    assert h.hook("a", "release", "end", a)[0] == 0
    assert h.read(GLOBAL) == "256"
    assert h.hook("b", "release", "end", b)[0] == 0
    assert h.read(GLOBAL) == "0"


def test_missing_pool_size_is_refused(fake):
    h = fake(hosts.numa_two_nodes)
    code, err = h.hook("vm", "prepare", "begin", domain_xml(name="vm", hugepages=True, page_kb=16384))
    assert code == 1
    assert "this host has no 16384 kB hugepage pool" in err


def test_more_than_the_available_memory_is_refused_before_asking(fake):
    h = fake(hosts.numa_two_nodes, node_pages={0: 100000, 1: 100000})
    before = h.snapshot()
    code, err = h.hook("vm", "prepare", "begin", domain_xml(name="vm", hugepages=True, memory_mib=40960))
    assert (code, err) == (1, "janus-hooks: VM 'vm': VM 'vm' needs 40960 MiB more hugepages, but only 29296 MiB "
                              "of memory is available")
    assert h.kernel.ops == 0
    assert_same_tree(before, h.snapshot())
