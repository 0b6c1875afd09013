from tests.conftest import domain_xml
from tests.fake import hosts


def test_single_nvidia_roundtrip(fake):
    h = fake(hosts.single_nvidia)
    before = h.snapshot()
    xml = domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS, hugepages=True)
    j = h.janus()
    from janus_hooks.domain import parse_domain
    print(j.plan(parse_domain(xml)).render())
    code, err = h.hook("win11", "prepare", "begin", xml)
    assert code == 0, err
    for a in hosts.NVIDIA_FUNCTIONS:
        assert h.driver(a) == "vfio-pci"
    code, err = h.hook("win11", "release", "end", xml)
    assert code == 0, err
    after = h.snapshot()
    diff = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert not diff, sorted(diff)[:20]
