"""Hostile or impossible values are refused with one clear message naming them, before anything exists."""

from __future__ import annotations

import shutil
from dataclasses import replace
from xml.etree import ElementTree

import pytest

from janus_hooks.errors import ConfigError
from janus_hooks.host import Host
from janus_hooks.host import block as blockdev
from janus_hooks.vm import template, values
from janus_hooks.vm.request import VmRequest, resolve
from janus_hooks.vm.values import VmError
from tests.fake.builder import HostBuilder
from tests.vm.conftest import vm_facts, with_mdev, with_vfs
from tests.vm.variants import DGPU, IGPU


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", "it's", 'say "hi"', "..", "-rf", "", "x" * 64,
                                  "a..b", "名前", "a b"])
def test_hostile_vm_names_are_refused(name):
    with pytest.raises(VmError, match="VM name"):
        values.vm_name(name)


@pytest.mark.parametrize("name", ["win11", "Gaming-PC_2", "a.b+c"])
def test_plain_vm_names_pass(name):
    assert values.vm_name(name) == name


@pytest.mark.parametrize(("text", "size"), [("8GiB", 8 * 1024**3), ("8G", 8 * 1024**3), ("512MiB", 512 * 1024**2),
                                            ("64", 64 * 1024**3), ("1.5GiB", 3 * 1024**3 // 2), ("2GB", 2 * 10**9)])
def test_sizes(text, size):
    assert values.size_bytes(text, "RAM") == size


@pytest.mark.parametrize("text", ["lots", "-1GiB", "0", "8 PiB", "1e3G"])
def test_bad_sizes(text):
    with pytest.raises(VmError, match="RAM"):
        values.size_bytes(text, "RAM")


def test_pci_addresses_are_normalised_or_refused():
    assert values.pci_address("01:00.0") == "0000:01:00.0"
    assert values.pci_address("0000:0A:00.1") == "0000:0a:00.1"
    for bad in ("01:00", "1:0.0", "0000:01:00.8", "../01:00.0"):
        with pytest.raises(VmError, match="PCI address"):
            values.pci_address(bad)


@pytest.mark.parametrize("user", ["", "a" * 21, "bad/name", "x@y", "...", "a\nb"])
def test_windows_account_names(user):
    with pytest.raises(VmError, match="account name"):
        values.windows_user(user)


def test_a_value_can_never_become_markup():
    evil = "/isos/</source><hostdev/>&\"'.iso"
    domain = template.base("windows")
    template.inject(domain, "installation-iso", {"path": evil})
    source = ElementTree.fromstring(template.serialize(domain)).find("devices/disk/source")
    assert source.get("file") == evil
    assert domain.find("devices/hostdev") is None


def test_placeholders_are_whole_values_and_all_filled():
    with pytest.raises(ConfigError, match=r"no value for placeholder \{path\}"):
        template.inject(template.base("windows"), "installation-iso", {})
    element = ElementTree.fromstring('<a b="x{path}"/>')
    with pytest.raises(ConfigError, match="whole value"):
        template.fill(element, {"path": "/p"}, "test")


def _request(vm_host, **changes) -> VmRequest:
    request = VmRequest(name="win", mode="passthrough", iso=vm_host.iso, gpu=DGPU, memory=8 * 1024**3, vcpus=4,
                        virt_type="qemu")
    return replace(request, **changes)


def test_missing_iso(two_gpus):
    with pytest.raises(VmError, match=r"installation ISO /nonexistent/win.iso does not exist"):
        resolve(_request(two_gpus, iso="/nonexistent/win.iso"), two_gpus.host)


def test_more_ram_than_the_host_has(two_gpus):
    with pytest.raises(VmError, match=r"64 GiB of RAM is more than this host has \(31.25 GiB\)"):
        resolve(_request(two_gpus, memory=64 * 1024**3), two_gpus.host)


def test_more_vcpus_than_the_host_has_and_pinning(two_gpus):
    with pytest.raises(VmError, match="16 vCPUs: this host has 8 CPUs online"):
        resolve(_request(two_gpus, vcpus=16), two_gpus.host)
    with pytest.raises(VmError, match="cannot pin to CPU 9"):
        resolve(_request(two_gpus, vcpus=2, cpu_pin=(2, 9)), two_gpus.host)
    with pytest.raises(VmError, match="names 2 CPUs for 4 vCPUs"):
        resolve(_request(two_gpus, cpu_pin=(2, 3)), two_gpus.host)


@pytest.mark.parametrize(("disk", "reason"), [
    ("/dev/sda", r"/dev/sda holds the host's root filesystem \(sda holds filesystem / \(/dev/sda1\); "
                 r"sda holds swap /dev/sda2 \(/dev/sda2\)\)"),
    ("/dev/sda1", r"/dev/sda1 holds the host's root filesystem \(sda1 holds filesystem / \(/dev/sda1\)\)"),
    ("/dev/sda2", r"/dev/sda2 is in use on the host \(sda2 holds swap /dev/sda2"),
    ("/dev/sdc", r"in use on the host \(sdc holds filesystem /home \(/dev/mapper/vg-home\); "
                 r"sdc1 in use by LVM \(dm-0\)\)"),
    ("/dev/sdc1", r"sdc1 in use by LVM \(dm-0\)"),
    ("/dev/sdd", r"in use on the host \(sdd in use by RAID \(md0\)\)"),
    ("/dev/sde", r"in use on the host \(sde holds swap /dev/sde \(/dev/sde\)\)"),
    ("/dev/nvme9n1", "/dev/nvme9n1 is not a block device on this host"),
    ("/home/disk.img", "not under /dev"),
])
def test_block_devices_in_use_are_refused(two_gpus, disk, reason):
    with pytest.raises(VmError, match=reason):
        resolve(_request(two_gpus, storage="block", disk=disk), two_gpus.host)


def test_a_free_disk_or_partition_is_accepted(two_gpus):
    for disk in ("/dev/sdb", "/dev/sdb1"):
        assert resolve(_request(two_gpus, storage="block", disk=disk), two_gpus.host).disk_format == "raw"


def test_a_free_partition_beside_a_mounted_one_is_accepted_but_not_its_disk(two_gpus):
    # btrfs shows an anonymous device number: the source still names the partition.
    HostBuilder(two_gpus.root).mount("/srv", "/dev/sdb1", fstype="btrfs", devnum="0:45")
    assert blockdev.uses(two_gpus.host, "sdb1") == [blockdev.BlockUse("sdb1", "holds filesystem /srv (/dev/sdb1)")]
    assert blockdev.uses(two_gpus.host, "sdb") == [blockdev.BlockUse("sdb", "holds filesystem /srv (/dev/sdb1)")]


def test_gpu_modes(two_gpus, one_gpu):
    with pytest.raises(VmError, match="0000:01:00.0 is this host's only GPU: use --mode single-gpu"):
        resolve(_request(one_gpu, gpu="0000:01:00.0"), one_gpu.host)
    with pytest.raises(VmError, match="needs --gpu ADDR"):
        resolve(_request(two_gpus, gpu=None), two_gpus.host)
    with pytest.raises(VmError, match="no PCI device 0000:09:00.0"):
        resolve(_request(two_gpus, gpu="0000:09:00.0"), two_gpus.host)
    with pytest.raises(VmError, match="0000:03:00.1 is not a GPU"):
        resolve(_request(two_gpus, gpu="0000:03:00.1"), two_gpus.host)
    with pytest.raises(VmError, match="--gpu has no meaning for --mode cpu-only"):
        resolve(_request(two_gpus, mode="cpu-only"), two_gpus.host)


def test_shared_vram(two_gpus):
    with pytest.raises(VmError, match=f"GPU {IGPU} offers neither a mediated device .* a Windows guest cannot"):
        resolve(_request(two_gpus, mode="shared-vram", gpu=None), two_gpus.host)
    linux = resolve(_request(two_gpus, mode="shared-vram", gpu=None, os="linux"), two_gpus.host)
    assert (linux.shared.kind, linux.shared.parent) == ("virgl", IGPU)
    with_vfs(two_gpus.root, IGPU)
    vf = resolve(_request(two_gpus, mode="shared-vram", gpu=None), two_gpus.host)
    assert (vf.shared.kind, vf.shared.vf_address) == ("vf", "0000:0c:00.1")
    with_mdev(two_gpus.root, IGPU)
    mdev = resolve(_request(two_gpus, mode="shared-vram", gpu=None), two_gpus.host)
    assert (mdev.shared.kind, mdev.shared.mdev_type) == ("mdev", "i915-GVTg_V5_4")
    assert any("when the VM starts and removes it" in note for note in mdev.notes)


def test_firmware_and_tpm(tmp_path, two_gpus):
    bare = vm_facts(tmp_path / "bare", secure=False, swtpm=False)
    (bare / "proc").mkdir(exist_ok=True)
    (bare / "proc/meminfo").write_text("MemTotal: 16000000 kB\n")
    host = Host(bare)
    request = _request(two_gpus, mode="cpu-only", gpu=None)
    with pytest.raises(VmError, match="Windows 11 needs a TPM 2.0 and swtpm is not installed"):
        resolve(request, host)
    plan = resolve(replace(request, os="win10"), host)
    assert not plan.secure_boot and not plan.tpm
    assert any("without it" in note for note in plan.notes)


def test_stealth_says_its_trade_off(two_gpus):
    plan = resolve(_request(two_gpus), two_gpus.host)
    assert any("Windows ignores the Hyper-V enlightenments" in n and "465" in n for n in plan.notes)
    assert not any("stealth" in n for n in resolve(_request(two_gpus, stealth=False), two_gpus.host).notes)


def test_gpu_audio_goes_with_the_gpu_only_from_its_iommu_group(two_gpus):
    b = HostBuilder(two_gpus.root)
    b.pci("0000:0c:00.6", "0x1002", "0x1640", "0x040300", "snd_hda_intel", 13)  # the iGPU's HDMI audio
    found = resolve(_request(two_gpus), two_gpus.host).gpu_functions
    named = resolve(_request(two_gpus, gpu_audio="0000:03:00.1"), two_gpus.host).gpu_functions
    assert found == named == (DGPU, "0000:03:00.1")
    with pytest.raises(VmError, match=r"--gpu-audio 0000:0c:00.6 is in IOMMU group 13, the GPU in 3: it must go "
                                      "with its own group"):
        resolve(_request(two_gpus, gpu_audio="0000:0c:00.6"), two_gpus.host)
    with pytest.raises(VmError, match=r"no PCI device 0000:0d:00.1 on this host \(--gpu-audio\)"):
        resolve(_request(two_gpus, gpu_audio="0000:0d:00.1"), two_gpus.host)


def test_hugepages_on_a_kernel_without_a_pool_of_its_default_size(two_gpus):
    assert resolve(_request(two_gpus, hugepages=True), two_gpus.host).request.hugepages
    shutil.rmtree(two_gpus.root / "sys/kernel/mm/hugepages/hugepages-2048kB")
    with pytest.raises(VmError, match=r"--hugepages: this host's kernel has no 2048 kB hugepage pool "):
        resolve(_request(two_gpus, hugepages=True), two_gpus.host)
    assert not resolve(_request(two_gpus), two_gpus.host).request.hugepages
