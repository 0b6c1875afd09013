"""Every refusal of the planner: one sentence that names the device, process or VM, and nothing changed."""

from __future__ import annotations

from tests.conftest import domain_xml
from tests.core.helpers import assert_same_tree
from tests.fake import hosts
from tests.fake.builder import HostBuilder


def _refused(h, xml: str, vm: str = "win11") -> str:
    before = h.snapshot()
    code, err = h.hook(vm, "prepare", "begin", xml)
    assert code == 1
    assert "\n" not in err
    assert_same_tree(before, h.snapshot())
    assert h.kernel.ops == 0
    assert h.services.calls == []
    assert h.journal_vms() == []
    return err


def test_iommu_group_with_unrelated_device(fake):
    h = fake(hosts.gpu_sharing_group)
    err = _refused(h, domain_xml(hostdevs=("0000:01:00.0", "0000:01:00.1")))
    assert err == ("janus-hooks: VM 'win11': IOMMU group 1 of 0000:01:00.0 also holds 0000:02:00.0 "
                   "(class 0x010601), which is not given to VM 'win11'")


def test_gpu_function_left_out_of_the_vm(fake):
    h = fake(hosts.single_nvidia)
    err = _refused(h, domain_xml(hostdevs=("0000:01:00.0",)))
    assert "IOMMU group 1 of 0000:01:00.0 also holds 0000:01:00.1" in err


def test_passthrough_of_the_gpu_driving_the_display(fake):
    h = fake(hosts.single_nvidia)
    err = _refused(h, domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS, mode="passthrough"))
    assert err == ("janus-hooks: VM 'win11': GPU 0000:01:00.0 drives the host display "
                   "(pid 1200 (Xorg) via /dev/dri/card0); use mode single-gpu for it")


def test_held_by_a_process_it_may_not_stop(fake):
    h = fake(hosts.single_nvidia)
    # A CUDA job in a plain system service: not the display manager, not a known GPU service.
    HostBuilder(h.root).process(4242, "blender", ["/dev/nvidia0"], cgroup="/system.slice/render.service")
    err = _refused(h, domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS))
    assert err == ("janus-hooks: VM 'win11': GPU 0000:01:00.0 is held by pid 4242 (blender) via /dev/nvidia0 "
                   "(unit render.service), which janus-hooks may not stop; close it or list its unit in "
                   "display.stop_units")


def test_held_from_a_text_session(fake):
    h = fake(hosts.single_nvidia)
    b = HostBuilder(h.root)
    b.session("7", 1000, "tty", [{"pid": 5000, "comm": "python3", "fds": ["/dev/dri/renderD128"]}])
    err = _refused(h, domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS))
    assert "held by pid 5000 (python3) via /dev/dri/renderD128" in err


def test_device_claimed_by_another_vm(fake):
    h = fake(hosts.two_identical_gpus)
    xml = domain_xml(name="first", hostdevs=("0000:02:00.0", "0000:02:00.1"), mode="passthrough")
    assert h.hook("first", "prepare", "begin", xml)[0] == 0
    h.kernel.ops = 0
    h.services.calls.clear()
    other = domain_xml(name="second", hostdevs=("0000:02:00.0", "0000:02:00.1"), mode="passthrough")
    before = h.snapshot()
    code, err = h.hook("second", "prepare", "begin", other)
    assert code == 1
    assert err == "janus-hooks: VM 'second': PCI device 0000:02:00.0 is in use by VM 'first' (its journal is open)"
    assert_same_tree(before, h.snapshot())
    assert h.journal_vms() == ["first"]


def test_unknown_pci_address(fake):
    h = fake(hosts.single_nvidia)
    err = _refused(h, domain_xml(hostdevs=("0000:0a:00.0",)))
    assert err == "janus-hooks: VM 'win11': PCI device 0000:0a:00.0 of VM 'win11' does not exist on this host"


def test_no_iommu(fake, tmp_path):
    h = fake(hosts.single_nvidia)
    for address in hosts.NVIDIA_FUNCTIONS:
        (h.root / f"sys/bus/pci/devices/{address}/iommu_group").unlink()
    err = _refused(h, domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS))
    assert "0000:01:00.0 has no IOMMU group: enable the IOMMU" in err


def test_hostile_xml_is_refused(fake):
    h = fake(hosts.single_nvidia)
    xml = '<!DOCTYPE d [<!ENTITY a "aaaa">]>' + domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS)
    err = _refused(h, xml)
    assert err == "janus-hooks: VM 'win11': domain XML with a DOCTYPE or ENTITY declaration is refused"
