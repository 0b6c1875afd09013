"""Every generated variant of ``vm create``: 4 video profiles x file/block storage x unattended on/off x
hugepages on/off (32, Windows 11; shared-vram through a mediated device), plus shared-vram's other two ways
(an SR-IOV virtual function for Windows, virtio-gpu with 3D for Linux), planned on fake host trees and built as
libvirt would get them (shared by the fast suite, which validates them against libvirt's schema, and the
libvirt suite, which defines them for real)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from janus_hooks.host import Host
from janus_hooks.vm import apply as vmapply
from janus_hooks.vm.build import build_domain
from janus_hooks.vm.request import STORAGE_KINDS, VIDEO_MODES, VmPlan, VmRequest, resolve
from tests.fake.builder import HostBuilder
from tests.fake.hosts import amd_dgpu_with_igpu, single_nvidia
from tests.vm.conftest import FREE_DISK, vm_facts, with_mdev, with_vfs

DGPU, IGPU, NVIDIA = "0000:03:00.0", "0000:0c:00.0", "0000:01:00.0"


@dataclass(frozen=True)
class Variant:
    mode: str
    storage: str
    unattend: bool
    hugepages: bool
    sharing: str = "mdev"  # shared-vram: how the host's GPU offers itself (the host tree differs)
    os: str = "win11"

    @property
    def host(self) -> str:
        """The fake host this variant is planned on."""
        return self.mode if self.mode != "shared-vram" or self.sharing == "mdev" else f"{self.mode}-{self.sharing}"

    @property
    def slug(self) -> str:
        return (f"{self.host}-{self.storage}-{'unattend' if self.unattend else 'manual'}-"
                f"{'huge' if self.hugepages else 'small'}{'-' + self.os if self.os != 'win11' else ''}")


VARIANTS = [Variant(*v) for v in itertools.product(VIDEO_MODES, STORAGE_KINDS, (False, True), (False, True))]
# shared-vram without a mediated device: a Windows guest through the GPU's SR-IOV virtual function, a Linux
# guest (no Autounattend.xml) through virtio-gpu with 3D acceleration.
SHARED_VARIANTS = [
    *(Variant("shared-vram", storage, unattend, hugepages, "vf") for storage, unattend, hugepages in
      (("file", True, True), ("block", False, False))),
    *(Variant("shared-vram", storage, False, hugepages, "virgl", "linux") for storage, hugepages in
      (("file", True), ("block", False))),
]


def hosts(base: Path, block: str = FREE_DISK) -> dict[str, Path]:
    """One fake host per video profile; ``block`` is a free disk in each (a real loop device's name in the
    libvirt suite)."""
    roots = {}
    for name in (*VIDEO_MODES, "shared-vram-vf", "shared-vram-virgl"):
        root = base / name
        if name == "single-gpu":
            single_nvidia(root)
        else:
            amd_dgpu_with_igpu(root)
        vm_facts(root)
        if name == "shared-vram":
            with_mdev(root, IGPU)
        elif name == "shared-vram-vf":
            with_vfs(root, IGPU)
        if block != FREE_DISK:
            HostBuilder(root).disk(block, None, major=7, minor=99)
        roots[name] = root
    return roots


def plan_of(variant: Variant, root: Path, name: str, iso: str, block_path: str, virt_type: str = "qemu",
            pool: str = "default") -> VmPlan:
    gpu = {"passthrough": DGPU, "single-gpu": NVIDIA, "shared-vram": IGPU}.get(variant.mode)
    request = VmRequest(
        name=name, mode=variant.mode, iso=iso, os=variant.os, gpu=gpu, memory=4 * 1024**3, vcpus=2,
        hugepages=variant.hugepages, storage=variant.storage, pool=pool,
        disk=block_path if variant.storage == "block" else None, disk_size=1024**3,
        unattend_user="alice" if variant.unattend else None,
        unattend_password="secret" if variant.unattend else None, virt_type=virt_type, network="user")
    return resolve(request, Host(root))


def xml_of(plan: VmPlan, pool_path: str) -> str:
    return build_domain(plan, vmapply.placement(plan, vmapply.Target(pool_path)))
