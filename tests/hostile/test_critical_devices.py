"""Host-critical devices are refused with the reason, whatever the VM asks: the controller under a
mounted filesystem or swap (through dm/md/LUKS), a bridge or root port, the default route's NIC."""

from __future__ import annotations

import pytest

from tests.conftest import FakeHost, domain_xml
from tests.fake.builder import HostBuilder
from tests.fake.world import link, write
from tests.hostile import tally

NVME = "0000:02:00.0"
SATA = "0000:00:17.0"
NIC = "0000:05:00.0"
ROOT_PORT = "0000:00:1c.0"


def _host(root, storage: str = "luks") -> None:
    b = HostBuilder(root)
    b.vfio_modules()
    b.module("nvme", drivers=("nvme",)).module("ahci", drivers=("ahci",)).module("igc", drivers=("igc",))
    b.module("pcieport", drivers=("pcieport",))
    b.pci(ROOT_PORT, "0x8086", "0x7ab8", "0x060400", "pcieport", 3)
    b.pci(NVME, "0x144d", "0xa80a", "0x010802", "nvme", 10)
    b.pci(SATA, "0x8086", "0x7ae2", "0x010601", "ahci", 11)
    b.pci(NIC, "0x8086", "0x125c", "0x020000", "igc", 12)
    b.disk("nvme0n1", NVME, partitions=2, major=259).disk("sda", SATA, partitions=1)
    if storage == "luks":
        b.stacked("dm-0", ("nvme0n1p2",), minor=0, dm_name="luks-root")
        b.mount("/", "/dev/mapper/luks-root").mount("/boot", "/dev/nvme0n1p1", "vfat").swap("/dev/sda1")
    elif storage == "zfs":
        b.mount("/", "rpool/ROOT/debian", "zfs", devnum="0:30")
    write(root / "proc/net/route", "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n"
          "enp5s0\t00000000\t0100A8C0\t0003\t0\t0\t100\t00000000\n")
    link(root / "sys/class/net/enp5s0/device", f"../../../devices/pci0000:00/{ROOT_PORT}/{NIC}")
    b.build()


@pytest.mark.parametrize("address, storage, reason", [
    (NVME, "luks", f"PCI device {NVME} of VM 'vm' cannot be taken from the host: it holds the host's "
                   "filesystem / (/dev/mapper/luks-root)"),
    (SATA, "luks", f"PCI device {SATA} of VM 'vm' cannot be taken from the host: it holds the host's "
                   "swap /dev/sda1 (/dev/sda1)"),
    (NIC, "luks", f"PCI device {NIC} of VM 'vm' cannot be taken from the host: it carries the host's default "
                  "route (enp5s0)"),
    (ROOT_PORT, "luks", f"PCI device {ROOT_PORT} of VM 'vm' is a bridge or root port: every device behind it "
                        "would lose its path; pass the devices behind it instead"),
    (SATA, "zfs", f"PCI device {SATA} may hold the host's storage, which could not be followed to "
                  "its controllers (filesystem / (rpool/ROOT/debian): zfs does not show its disks in sysfs)"),
])
def test_host_critical_device_is_refused_before_anything_changes(tmp_path, address, storage, reason):
    root = tmp_path / "host"
    _host(root, storage)
    h = FakeHost(root)
    before = h.snapshot()
    code, err = h.hook("vm", "prepare", "begin", domain_xml("vm", hostdevs=(address,), mode="passthrough"))
    assert (code, err) == (1, f"janus-hooks: VM 'vm': {reason}")
    assert h.kernel.ops == 0
    tally.check_host(before, h.snapshot())
    tally.record("inputs tried")
    tally.record("host states checked")


def test_a_disk_controller_the_host_does_not_use_can_be_passed(tmp_path):
    root = tmp_path / "host"
    _host(root, "luks")
    (root / "proc/swaps").unlink()  # sda now holds nothing the host has mounted
    h = FakeHost(root)
    xml = domain_xml("vm", hostdevs=(SATA,), mode="passthrough")
    assert h.hook("vm", "prepare", "begin", xml) == (0, "")
    assert h.driver(SATA) == "vfio-pci"
    assert h.hook("vm", "release", "end", xml) == (0, "")
