"""Fake hosts for ``vm create``: the GPUs of tests/fake plus what a VM needs from a host (CPUs, firmware
descriptors, swtpm, block devices with their mounts, swap and holders), and installation media."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from janus_hooks.host import Host
from tests.fake.builder import HostBuilder
from tests.fake.hosts import amd_dgpu_with_igpu, single_nvidia
from tests.fake.world import write

ROOT_DISK, FREE_DISK, LVM_DISK, RAID_DISK, SWAP_DISK = "sda", "sdb", "sdc", "sdd", "sde"


def _firmware(root: Path, secure: bool = True) -> None:
    def descriptor(name: str, features: list[str]) -> None:
        write(root / "usr/share/qemu/firmware" / name, json.dumps({
            "interface-types": ["uefi"], "mapping": {"device": "flash"},
            "targets": [{"architecture": "x86_64", "machines": ["pc-q35-*"]}], "features": features}))

    if secure:
        descriptor("40-edk2-x86_64-secure-enrolled.json", ["enrolled-keys", "requires-smm", "secure-boot"])
    descriptor("60-edk2-x86_64.json", ["acpi-s3"])


def vm_facts(root: Path, secure: bool = True, swtpm: bool = True) -> Path:
    """CPUs 0-7, 32 GB RAM (the builder's meminfo), an empty 2 MiB hugepage pool, OVMF descriptors, swtpm and
    five disks:
    sda (sda1 on /, sda2 swap), sdb free, sdc1 under LVM dm-0 on /home, sdd under RAID md0, sde swap."""
    write(root / "sys/devices/system/cpu/online", "0-7\n")
    pool = root / "sys/kernel/mm/hugepages/hugepages-2048kB"
    if not pool.is_dir():  # the kernel's default pool, empty (a tree built with hugepages keeps its own)
        for name in ("nr_hugepages", "free_hugepages"):
            write(pool / name, "0\n")
    _firmware(root, secure)
    if swtpm:
        write(root / "usr/bin/swtpm", "#!/bin/sh\n")
        (root / "usr/bin/swtpm").chmod(0o755)
    b = HostBuilder(root)  # only its storage steps: the tree's world (GPUs, units) stays as built
    sata = "0000:00:17.0"
    b.disk(ROOT_DISK, sata, partitions=2).disk(FREE_DISK, sata, partitions=1, minor=16)
    b.disk(LVM_DISK, sata, partitions=1, minor=32).disk(RAID_DISK, sata, minor=48).disk(SWAP_DISK, sata, minor=64)
    b.stacked("dm-0", ("sdc1",), minor=0, dm_name="vg-home")
    write(root / "sys/class/block/dm-0/dm/uuid", "LVM-abcdef\n")
    b.stacked("md0", (RAID_DISK,), minor=0)
    b.mount("/", "/dev/sda1").mount("/home", "/dev/mapper/vg-home", devnum="253:0")
    b.mount("/sys", "sysfs", fstype="sysfs", devnum="0:22")
    b.swap("/dev/sda2").swap("/dev/sde")
    return root


def with_mdev(root: Path, gpu: str, available: int = 2) -> None:
    base = root / "sys/bus/pci/devices" / gpu / "mdev_supported_types/i915-GVTg_V5_4"
    write(base / "available_instances", f"{available}\n")
    write(base / "create", "")
    (root / "sys/bus/mdev/devices").mkdir(parents=True, exist_ok=True)  # the mdev bus, loaded with the types


def with_vfs(root: Path, gpu: str) -> None:
    base = root / "sys/bus/pci/devices" / gpu
    write(base / "sriov_totalvfs", "7\n")
    write(base / "sriov_offset", "1\n")


@dataclass
class VmHost:
    root: Path
    iso: str
    virtio_iso: str

    @property
    def host(self) -> Host:
        return Host(self.root)


def _media(tmp_path: Path) -> tuple[str, str]:
    media = tmp_path / "media"
    media.mkdir()
    (media / "Win11_24H2.iso").write_bytes(b"\0" * 4096)
    (media / "virtio-win.iso").write_bytes(b"\0" * 4096)
    return str(media / "Win11_24H2.iso"), str(media / "virtio-win.iso")


@pytest.fixture
def two_gpus(tmp_path: Path) -> VmHost:
    """An AMD dGPU 0000:03:00.0 (+ audio .1) for the VM, an iGPU 0000:0c:00.0 for the desktop."""
    root = vm_facts(amd_dgpu_with_igpu(tmp_path / "two/host"))
    return VmHost(root, *_media(tmp_path / "two"))


@pytest.fixture
def one_gpu(tmp_path: Path) -> VmHost:
    """One NVIDIA card 0000:01:00.0-.3 driving the desktop."""
    root = vm_facts(single_nvidia(tmp_path / "one/host"))
    return VmHost(root, *_media(tmp_path / "one"))
