"""Every refusal of the planner: one sentence that names the device, process or VM, and nothing changed."""

from __future__ import annotations

import pytest

from janus_hooks.hook import CUT, MAX_LINE, one_line
from janus_hooks.schema import quote
from tests.conftest import domain_xml
from tests.core.helpers import assert_same_tree
from tests.fake import hosts
from tests.fake.builder import HostBuilder


def _refused(h, xml: str, vm: str = "win11") -> str:
    before = h.snapshot()
    code, err = h.hook(vm, "prepare", "begin", xml)
    assert code == 1
    assert "\n" not in err
    # The bound, met by the message itself: nothing was cut out of it.
    assert MAX_LINE == 300 and len(err) <= MAX_LINE and CUT not in err, err
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


LONG = "a-vm-whose-name-goes-on-" * 10  # 240 characters: libvirt takes it, the line quotes 64 of them


def _long_holder(root):
    hosts.single_nvidia(root)
    unit = "render-" + "x" * 200 + ".service"
    HostBuilder(root).process(4194304, "blender-cycles0", ["/dev/nvidia0"], cgroup=f"/system.slice/{unit}")
    return root


def _claimed(h):
    xml = domain_xml(name="b" * 250, hostdevs=("0000:02:00.0", "0000:02:00.1"), mode="passthrough")
    assert h.hook("b" * 250, "prepare", "begin", xml)[0] == 0
    return domain_xml(name=LONG, hostdevs=("0000:02:00.0", "0000:02:00.1"), mode="passthrough")


# Each refusal with the longest names a host and a VM can give it: (host, XML for LONG, what must survive).
WORST = {
    "held by a process in a long-named unit": (
        _long_holder, lambda h: domain_xml(name=LONG, hostdevs=hosts.NVIDIA_FUNCTIONS),
        ("GPU 0000:01:00.0 is held by pid 4194304 (blender-cycles0) via /dev/nvidia0", "display.stop_units")),
    "IOMMU group shared": (
        hosts.gpu_sharing_group, lambda h: domain_xml(name=LONG, hostdevs=("0000:01:00.0", "0000:01:00.1")),
        ("IOMMU group 1 of 0000:01:00.0 also holds 0000:02:00.0",)),
    "unknown device": (
        hosts.single_nvidia, lambda h: domain_xml(name=LONG, hostdevs=("0000:0a:00.0",)),
        ("PCI device 0000:0a:00.0 of VM", "does not exist on this host")),
    "claimed by a long-named VM": (
        hosts.two_identical_gpus, _claimed, ("PCI device 0000:02:00.0 is in use by VM 'bbbb", "(its journal is open)")),
    "hugepages beyond memory": (
        hosts.single_nvidia, lambda h: domain_xml(name=LONG, hostdevs=hosts.NVIDIA_FUNCTIONS, hugepages=True,
                                                  memory_mib=1 << 20),
        ("MiB more hugepages, but only 29296 MiB of memory is available",)),
    "AMD reset bug": (
        lambda root: hosts.single_polaris(root, vendor_reset=None),
        lambda h: domain_xml(name=LONG, hostdevs=hosts.POLARIS_FUNCTIONS),
        ("GPU 0000:03:00.0 (Polaris 10)", "load vendor-reset or set reset_risk = \"accept\" in the VM's profile")),
}


@pytest.mark.parametrize("case", sorted(WORST))
def test_no_refusal_passes_300_characters_with_the_longest_names(fake, case):
    build, xml, survivors = WORST[case]
    h = fake(build)
    text = xml(h)
    before = h.snapshot()
    code, err = h.hook(LONG, "prepare", "begin", text)
    assert code == 1 and "\n" not in err and len(err) <= MAX_LINE and CUT not in err, (len(err), err)
    assert err.startswith(f"janus-hooks: VM {quote(LONG)}: ")
    for part in survivors:
        assert part in err, (part, err)
    assert_same_tree(before, h.snapshot())


def test_a_longer_failure_keeps_its_head_and_its_remedy():
    # A step that failed and whose rollback failed too: two reasons, then what to run.
    text = ("janus-hooks: VM 'win11': bind 0000:01:00.0 to vfio-pci: " + "r" * 300
            + "; reverting failed too (undo unload module nvidia_drm: " + "s" * 200
            + "); run 'janus-hooks rollback win11'")
    line = one_line(text)
    assert len(line) == MAX_LINE and CUT in line
    assert line.startswith("janus-hooks: VM 'win11': bind 0000:01:00.0 to vfio-pci: ")
    assert line.endswith("); run 'janus-hooks rollback win11'")
    assert one_line("short\ntwo lines") == "short | two lines"
