"""Mount -> disk -> PCI controller: the storage map that host-critical refusals and VM creation rely on."""

from __future__ import annotations

from pathlib import Path

import pytest

from janus_hooks.host import Host
from tests.fake.builder import HostBuilder
from tests.fake.world import link, write

SATA = "0000:00:17.0"
NVME = "0000:02:00.0"
NVME2 = "0000:03:00.0"
USB = "0000:00:14.0"


def _uses(root: Path) -> dict[str, tuple[tuple[str, ...], tuple[str, ...], str]]:
    return {d.use: (d.disks, d.controllers, d.unresolved) for d in Host(root).storage_backing()}


def test_plain_partitions_swap_and_virtual_devices(tmp_path):
    b = HostBuilder(tmp_path).disk("sda", SATA, partitions=3).disk("nvme0n1", NVME, partitions=1, major=259)
    b.disk("zram0", None, major=252)
    b.mount("/", "/dev/nvme0n1p1").mount("/boot", "/dev/sda1", "vfat").mount("/srv/my data", "/dev/sda3")
    b.mount("/proc", "proc", "proc", devnum="0:21").mount("/run", "tmpfs", "tmpfs", devnum="0:25")
    b.swap("/dev/sda2").swap("/dev/zram0")
    b.build()
    assert _uses(tmp_path) == {
        "filesystem /": (("nvme0n1",), (NVME,), ""),
        "filesystem /boot": (("sda",), (SATA,), ""),
        "filesystem /srv/my data": (("sda",), (SATA,), ""),
        "swap /dev/sda2": (("sda",), (SATA,), ""),
        "swap /dev/zram0": (("zram0",), (), ""),  # a virtual disk: resolved, no controller to protect
    }
    assert Host(tmp_path).storage_controllers() == {
        NVME: ["filesystem /"],
        SATA: ["filesystem /boot", "filesystem /srv/my data", "swap /dev/sda2"],
    }


def test_luks_on_lvm_on_raid_is_followed_down_to_every_disk(tmp_path):
    b = HostBuilder(tmp_path).disk("nvme0n1", NVME, partitions=2, major=259).disk("nvme1n1", NVME2, 2, 259, 10)
    b.stacked("md0", ("nvme0n1p2", "nvme1n1p2"), minor=0)
    b.stacked("dm-0", ("md0",), minor=0, dm_name="luks-3f1a")
    b.stacked("dm-1", ("dm-0",), minor=1, dm_name="vg-root")
    b.stacked("dm-2", ("dm-0",), minor=2, dm_name="vg-swap")
    b.mount("/", "/dev/mapper/vg-root").swap("/dev/mapper/vg-swap").mount("/boot", "/dev/nvme0n1p1")
    b.build()
    uses = _uses(tmp_path)
    assert uses["filesystem /"] == (("nvme0n1", "nvme1n1"), (NVME, NVME2), "")
    assert uses["swap /dev/mapper/vg-swap"] == (("nvme0n1", "nvme1n1"), (NVME, NVME2), "")
    assert uses["filesystem /boot"] == (("nvme0n1",), (NVME,), "")


def test_btrfs_anonymous_device_number_and_by_uuid_links(tmp_path):
    b = HostBuilder(tmp_path).disk("sdb", USB, partitions=1, major=8, minor=16)
    link(tmp_path / "dev/disk/by-uuid/77aa", "../../sdb1")
    b.mount("/", "/dev/disk/by-uuid/77aa", "btrfs", devnum="0:33")
    b.build()
    assert _uses(tmp_path) == {"filesystem /": (("sdb",), (USB,), "")}


def test_swap_file_and_loop_file_land_on_the_filesystem_that_holds_them(tmp_path):
    b = HostBuilder(tmp_path).disk("sda", SATA, partitions=1).disk("nvme0n1", NVME, 1, 259)
    b.disk("loop0", None, major=7)
    write(tmp_path / "sys/devices/virtual/block/loop0/loop/backing_file", "/var/images/root.img\n")
    b.mount("/", "/dev/sda1").mount("/var", "/dev/nvme0n1p1").mount("/srv", "/dev/loop0", "squashfs")
    b.swap("/var/swapfile", kind="file")
    b.build()
    uses = _uses(tmp_path)
    assert uses["swap /var/swapfile"] == (("nvme0n1",), (NVME,), "")
    assert uses["filesystem /srv"] == (("nvme0n1",), (NVME,), "")


@pytest.mark.parametrize("case", ["zfs", "missing-device", "unreadable-slaves", "no-mount-table"])
def test_what_cannot_be_followed_says_so(tmp_path, case):
    b = HostBuilder(tmp_path).disk("sda", SATA, partitions=1)
    if case == "zfs":
        b.mount("/", "rpool/ROOT/debian", "zfs", devnum="0:30")
        expected = "zfs does not show its disks in sysfs"
    elif case == "missing-device":
        b.mount("/", "/dev/sdz1", "ext4", devnum="8:200")
        expected = "/dev/sdz1 is not in sysfs"
    elif case == "unreadable-slaves":
        b.stacked("dm-0", ("sda1",), minor=0, dm_name="root")
        (tmp_path / "sys/devices/virtual/block/dm-0/slaves/sda1").unlink()
        (tmp_path / "sys/devices/virtual/block/dm-0/slaves").rmdir()
        b.mount("/", "/dev/mapper/root")
        expected = "dm-0: its slaves cannot be read"
    b.build()
    backing = Host(tmp_path).storage_backing()
    if case == "no-mount-table":
        assert [d.unresolved for d in backing] == ["the mount table cannot be read"]
    else:
        assert [(d.use, d.unresolved) for d in backing] == [("filesystem /", expected)]


def test_absolute_dev_link_stays_below_the_root(tmp_path):
    """An absolute /dev/disk link is followed inside the host tree, never into the caller's /dev."""
    b = HostBuilder(tmp_path).disk("sda", SATA, partitions=1)
    link(tmp_path / "dev/disk/by-label/root", "/dev/sda1")
    b.mount("/", "/dev/disk/by-label/root", "btrfs", devnum="0:33").build()
    assert _uses(tmp_path) == {"filesystem /": (("sda",), (SATA,), "")}


def test_this_machine_root_filesystem_is_followed_to_a_real_pci_device():
    real = Host("/")
    root = [d for d in real.storage_backing() if d.use == "filesystem /"]
    if not root:
        pytest.skip("the root filesystem here is not on a local block device")
    assert not root[0].unresolved, root[0]
    assert root[0].controllers and all(real.pci_device(a) is not None for a in root[0].controllers)
