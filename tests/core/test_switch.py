"""End to end through the hook entry on fake hosts: every vendor backend, framebuffer kind and mode."""

from __future__ import annotations

import pytest

from janus_hooks.domain import parse_domain
from tests.conftest import domain_xml
from tests.core.helpers import assert_same_tree
from tests.fake import hosts


def _roundtrip(h, xml: str, vm: str = "win11"):
    before = h.snapshot()
    code, err = h.hook(vm, "prepare", "begin", xml)
    assert code == 0, err
    during = h.snapshot()
    code, err = h.hook(vm, "release", "end", xml)
    assert code == 0, err
    assert_same_tree(before, h.snapshot())
    assert h.journal_vms() == []
    return during


@pytest.mark.parametrize("fb", ["efifb", "simplefb", "simpledrm", "vesafb", None])
def test_single_nvidia_each_framebuffer(fake, fb):
    h = fake(hosts.single_nvidia, fb=fb)
    xml = domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS)
    during = _roundtrip(h, xml)
    for address in hosts.NVIDIA_FUNCTIONS:
        assert during[f"sys/bus/pci/devices/{address}/driver"] == ("link", "../../../../bus/pci/drivers/vfio-pci")
    assert during["sys/class/vtconsole/vtcon0/bind"] == ("file", "0\n")
    assert during["run/fake-systemd/gdm3.service"] == ("file", "inactive\n")
    assert during["run/fake-systemd/nvidia-persistenced.service"] == ("file", "inactive\n")
    assert "proc/1200" not in during  # Xorg is gone
    assert "proc/3000" in during  # the terminal that held nothing survives
    for module in ("nvidia", "nvidia_drm", "nvidia_modeset", "nvidia_uvm"):
        assert f"sys/module/{module}" not in during
    if fb:
        device = {"efifb": "efi-framebuffer.0", "vesafb": "vesa-framebuffer.0"}.get(fb, "simple-framebuffer.0")
        assert f"sys/bus/platform/devices/{device}/driver" not in during


def test_nvidia_modules_unload_in_holders_order(fake):
    h = fake(hosts.single_nvidia)
    plan = h.janus().plan(parse_domain(domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS)))
    unloads = [a.module for a in plan.actions if a.kind == "unload-module"]
    assert unloads == ["nvidia_drm", "nvidia_modeset", "nvidia_uvm", "nvidia"]
    # The kernel would refuse any other order while holders exist; the fake plays that rule.
    assert h.hook("win11", "prepare", "begin", domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS))[0] == 0


@pytest.mark.parametrize("vendor", ["amdgpu", "i915", "nouveau", "radeon", "bochs"])
def test_single_gpu_each_vendor(fake, vendor):
    h = fake(hosts.single_vendor, vendor=vendor)
    address = "0000:00:02.0" if vendor in ("i915", "bochs") else "0000:03:00.0"
    devs = (address, "0000:03:00.1") if vendor == "amdgpu" else (address,)
    during = _roundtrip(h, domain_xml(hostdevs=devs))
    assert during[f"sys/bus/pci/devices/{address}/driver"][1].endswith("/vfio-pci")
    module = {"amdgpu": "amdgpu", "i915": "i915", "nouveau": "nouveau", "radeon": "radeon", "bochs": "bochs"}[vendor]
    # Intel graphics is unbound but its module stays; the others are unloaded.
    assert (f"sys/module/{module}" in during) == (vendor == "i915")
    assert "proc/1300" not in during


@pytest.mark.parametrize("managed", ["yes", "no"])
def test_managed_yes_and_no(fake, managed):
    h = fake(hosts.single_nvidia)
    during = _roundtrip(h, domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS, managed=managed))
    assert during[f"sys/bus/pci/devices/{hosts.NVIDIA_GPU}/driver"][1].endswith("/vfio-pci")


def test_single_gpu_with_hugepages(fake):
    h = fake(hosts.single_nvidia)
    xml = domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS, hugepages=True, memory_mib=8192)
    during = _roundtrip(h, xml)
    assert during["sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"] == ("file", "4096\n")


def test_passthrough_secondary_amd_keeps_desktop(fake):
    h = fake(hosts.amd_dgpu_with_igpu)
    during = _roundtrip(h, domain_xml(hostdevs=("0000:03:00.0", "0000:03:00.1"), mode="passthrough"))
    assert during["sys/bus/pci/devices/0000:03:00.0/driver"][1].endswith("/vfio-pci")
    assert during["sys/bus/pci/devices/0000:0c:00.0/driver"][1].endswith("/amdgpu")
    assert "sys/module/amdgpu" in during  # shared with the iGPU: unbound, never unloaded
    assert during["run/fake-systemd/gdm.service"] == ("file", "active\n")
    assert during["sys/class/vtconsole/vtcon0/bind"] == ("file", "1\n")


def test_two_identical_gpus_only_the_named_one_moves(fake):
    h = fake(hosts.two_identical_gpus)
    during = _roundtrip(h, domain_xml(hostdevs=("0000:02:00.0", "0000:02:00.1"), mode="passthrough"))
    assert during["sys/bus/pci/devices/0000:02:00.0/driver"][1].endswith("/vfio-pci")
    assert during["sys/bus/pci/devices/0000:01:00.0/driver"][1].endswith("/nvidia")
    assert during["sys/bus/pci/devices/0000:01:00.1/driver"][1].endswith("/snd_hda_intel")
    assert not any(op == "write" and target.endswith("new_id") for op, target, _ in h.kernel.log)


def test_gpu_already_on_vfio_is_left_alone(fake):
    h = fake(hosts.two_identical_gpus)
    xml = domain_xml(name="a", hostdevs=("0000:02:00.0", "0000:02:00.1"), mode="passthrough")
    assert h.hook("a", "prepare", "begin", xml)[0] == 0
    assert h.hook("a", "release", "end", xml)[0] == 0
    # Bind by hand, as a person with vfio-pci.ids= on the kernel command line would have it.
    for address in ("0000:02:00.0", "0000:02:00.1"):
        h.kernel.write(h.root / f"sys/bus/pci/devices/{address}/driver_override", "vfio-pci")
    h.kernel.load_module("vfio_pci")
    for address in ("0000:02:00.0", "0000:02:00.1"):
        driver = h.driver(address)
        h.kernel.write(h.root / f"sys/bus/pci/drivers/{driver}/unbind", address)
        h.kernel.write(h.root / "sys/bus/pci/drivers_probe", address)
    plan = h.janus().plan(parse_domain(xml))
    assert not any(a.kind == "bind-vfio" for a in plan.actions)
    assert any("already bound to vfio-pci" in n for n in plan.notes)
    manual = h.snapshot()
    assert h.hook("a", "prepare", "begin", xml) == (0, "")
    assert h.hook("a", "release", "end", xml) == (0, "")
    # The manual binding is not janus's to undo: after a start and a stop it is exactly as the person left it.
    assert [h.driver(a) for a in ("0000:02:00.0", "0000:02:00.1")] == ["vfio-pci", "vfio-pci"]
    assert_same_tree(manual, h.snapshot())


def test_unmanaged_vm_changes_nothing(fake):
    h = fake(hosts.single_nvidia)
    before = h.snapshot()
    xml = domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS, mode=None)
    for op, sub in (("prepare", "begin"), ("start", "begin"), ("started", "begin"), ("stopped", "end"),
                    ("release", "end")):
        assert h.hook("plain", op, sub, xml) == (0, "")
    assert h.kernel.ops == 0
    assert_same_tree(before, h.snapshot())


def test_profile_toml_marks_vm_managed(fake):
    h = fake(hosts.single_nvidia)
    vms = h.root / "etc/janus-hooks/vms"
    vms.mkdir(parents=True)
    (vms / "gaming rig.toml").write_text("mode = 'single-gpu'\n")
    xml = domain_xml(name="gaming rig", hostdevs=hosts.NVIDIA_FUNCTIONS, mode=None)
    during = _roundtrip(h, xml, vm="gaming rig")
    assert during[f"sys/bus/pci/devices/{hosts.NVIDIA_GPU}/driver"][1].endswith("/vfio-pci")
