"""What a person asks ``vm create`` for (``VmRequest``) checked against the host (``resolve`` -> ``VmPlan``).

Pure given the host tree: reads ``Host(root)`` (GPUs, IOMMU groups, memory, CPUs, block devices, firmware)
and the files the person names, changes nothing. What libvirt knows (VM names, pools) is checked by
``apply``. Every refusal is one ``VmError`` naming the value, device or path.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from janus_hooks.check import gpu_verdict, gpus
from janus_hooks.config import Config
from janus_hooks.host import Host, PciDevice
from janus_hooks.host import block as blockdev
from janus_hooks.host.firmware import offers_secure_boot, offers_uefi
from janus_hooks.snapshot import HostSnapshot
from janus_hooks.vm.values import VmError, human_size

VIDEO_MODES = ("passthrough", "single-gpu", "shared-vram", "cpu-only")
OS_KINDS = ("win11", "win10", "linux")
STORAGE_KINDS = ("file", "block")
VIRT_TYPES = ("kvm", "qemu")
GIB = 1024**3
QCOW2_MAGIC = b"QFI\xfb"
_PCI_CLASS_AUDIO = 0x04


@dataclass(frozen=True)
class VmRequest:
    """Every answer of the guided flow or flag of ``vm create``, already checked one by one (``values``)."""

    name: str
    mode: str
    iso: str
    os: str = "win11"
    virtio_iso: str | None = None
    gpu: str | None = None
    gpu_audio: str | None = None
    memory: int | None = None  # bytes; None: from the host's size
    vcpus: int | None = None  # None: from the host's size
    cpu_pin: tuple[int, ...] = ()
    hugepages: bool = False
    storage: str = "file"
    pool: str = "default"
    disk: str | None = None  # an existing image (file) or a device under /dev (block)
    disk_size: int = 64 * GIB
    unattend_user: str | None = None
    unattend_password: str | None = field(default=None, repr=False)
    virt_type: str = "kvm"
    stealth: bool = True
    network: str = "default"  # a libvirt network name, or "user" for QEMU's user-mode network

    @property
    def windows(self) -> bool:
        return self.os.startswith("win")


@dataclass(frozen=True)
class SharedGpu:
    """How a shared-vram guest reaches the host GPU: an mdev instance, a VF, or virtio-gpu with 3D."""

    kind: str  # "mdev", "vf", "virgl"
    parent: str | None = None  # the GPU's PCI address
    mdev_type: str | None = None
    mdev_uuid: str | None = None
    vf_address: str | None = None


@dataclass(frozen=True)
class VmPlan:
    request: VmRequest
    memory: int  # bytes
    vcpus: int
    gpu_functions: tuple[str, ...] = ()
    shared: SharedGpu | None = None
    secure_boot: bool = False
    tpm: bool = False
    disk_format: str = "qcow2"  # of --disk when it is an existing image
    notes: tuple[str, ...] = ()  # trade-offs the dry run states plainly

    @property
    def managed(self) -> bool:
        """janus-hooks acts when the VM starts (the profile metadata is written)."""
        return self.request.mode in ("passthrough", "single-gpu")


def default_memory(host: Host) -> int:
    """Half the host's RAM in whole GiB, between 4 GiB (Windows 11's minimum) and 16 GiB, never above it."""
    total = (host.mem_total_kb() or 0) * 1024
    half = (total // 2) // GIB * GIB
    return max(min(half, 16 * GIB), min(4 * GIB, total // GIB * GIB)) if total else 4 * GIB


def default_vcpus(host: Host) -> int:
    return max(1, min(8, len(host.cpus_online()) // 2 or 1))


def resolve(request: VmRequest, host: Host, config: Config | None = None) -> VmPlan:
    """Check ``request`` against the host; the plan ``template.build`` turns into a domain."""
    notes: list[str] = []
    _check_file(request.iso, "installation ISO")
    if request.virtio_iso:
        _check_file(request.virtio_iso, "virtio drivers ISO")
    memory, vcpus = _resources(request, host)
    if not offers_uefi(host):
        raise VmError("no UEFI firmware for q35 guests in /usr/share/qemu/firmware (Debian: apt install ovmf)")
    secure_boot = offers_secure_boot(host)
    if not secure_boot:
        notes.append("no firmware with Secure Boot and enrolled keys was found: the guest boots without it")
    tpm = request.os == "win11"
    if tpm and host.program("swtpm") is None:
        raise VmError("Windows 11 needs a TPM 2.0 and swtpm is not installed (Debian: apt install swtpm "
                      "swtpm-tools)")
    if request.unattend_user and not request.windows:
        raise VmError("--unattend-user writes a Windows Autounattend.xml; it has no meaning for --os linux")

    if request.windows and request.virt_type == "qemu":
        notes.append("--virt-type qemu (emulation, no KVM): no Hyper-V enlightenments, which QEMU offers only "
                     "with KVM; Windows will be very slow")
    functions: tuple[str, ...] = ()
    shared = None
    if request.mode in ("passthrough", "single-gpu"):
        if not request.windows and request.stealth:
            request = replace(request, stealth=False)
        functions = _gpu_functions(request, host, config or Config())
        if request.stealth:
            notes.append("stealth is on (KVM hidden, CPU 'hypervisor' bit off, a Hyper-V vendor_id): with the "
                         "hypervisor bit off Windows ignores the Hyper-V enlightenments and runs slower; "
                         "NVIDIA drivers since 465 no longer need hiding (--no-stealth turns it off)")
    elif request.mode == "shared-vram":
        shared = _shared_gpu(request, host)
        if shared.kind in ("mdev", "vf"):
            what = f"mediated device {shared.mdev_uuid} of type {shared.mdev_type}" if shared.kind == "mdev" \
                else f"virtual function {shared.vf_address}"
            notes.append(f"janus-hooks makes the {what} on {shared.parent} when the VM starts and removes it when "
                         "the VM stops; the host keeps the GPU and its desktop")
    if request.gpu and request.mode == "cpu-only":
        raise VmError("--gpu has no meaning for --mode cpu-only (the guest gets an emulated display)")

    disk_format = _storage(request, host)
    if request.hugepages:
        size = host.default_hugepage_kb()  # libvirt's <hugepages/> without a size: the kernel's default size
        if size not in host.hugepage_sizes():
            raise VmError(f"--hugepages: this host's kernel has no {size} kB hugepage pool "
                          f"({host.hugepage_dir(size, None)}); leave hugepages off")
        notes.append(f"hugepages: janus-hooks reserves {human_size(memory)} of hugepages when the VM starts and "
                     "frees them when it stops" if request.mode in ("passthrough", "single-gpu")
                     or (shared is not None and shared.kind != "virgl") else
                     "hugepages: this VM is not managed by janus-hooks (mode " + request.mode + "); the pool "
                     "must hold enough free pages before it starts")
    return VmPlan(request, memory, vcpus, functions, shared, secure_boot, tpm, disk_format, tuple(notes))


def _check_file(path: str, what: str) -> None:
    file = Path(path)
    if not file.exists():
        raise VmError(f"{what} {path} does not exist")
    if not file.is_file():
        raise VmError(f"{what} {path} is not a regular file")
    if not os.access(file, os.R_OK):
        raise VmError(f"{what} {path} is not readable")


def _resources(request: VmRequest, host: Host) -> tuple[int, int]:
    memory = check_memory(request.memory or default_memory(host), request.os, host)
    vcpus = check_vcpus(request.vcpus or default_vcpus(host), host)
    if request.cpu_pin:
        cpus = sorted(host.cpus_online())
        absent = [c for c in request.cpu_pin if c not in cpus]
        if absent:
            raise VmError(f"cannot pin to CPU {absent[0]}: not online on this host (online: "
                          f"{','.join(map(str, cpus))})")
        if len(request.cpu_pin) != vcpus:
            raise VmError(f"--cpu-pin names {len(request.cpu_pin)} CPUs for {vcpus} vCPUs: give one per vCPU")
    return memory, vcpus


def check_memory(memory: int, os_kind: str, host: Host) -> int:
    """RAM for a guest of ``os_kind``: no more than the host has, no less than the guest needs."""
    total = (host.mem_total_kb() or 0) * 1024
    if total and memory > total:
        raise VmError(f"{human_size(memory)} of RAM is more than this host has ({human_size(total)})")
    if memory < 256 * 1024**2:
        raise VmError(f"{human_size(memory)} of RAM is too little for a guest (at least 256 MiB)")
    if os_kind == "win11" and memory < 4 * GIB:
        raise VmError(f"Windows 11 needs at least 4 GiB of RAM, not {human_size(memory)}")
    return memory


def check_vcpus(vcpus: int, host: Host) -> int:
    cpus = host.cpus_online()
    if vcpus < 1 or (cpus and vcpus > len(cpus)):
        raise VmError(f"{vcpus} vCPUs: this host has {len(cpus)} CPUs online")
    return vcpus


def check_gpu(request: VmRequest, host: Host, config: Config | None = None) -> None:
    """Refuse a GPU (or a host without one) that cannot serve ``request.mode``, as ``resolve`` would."""
    if request.mode in ("passthrough", "single-gpu"):
        _gpu_functions(request, host, config or Config())
    elif request.mode == "shared-vram":
        _shared_gpu(request, host)


def _gpu_functions(request: VmRequest, host: Host, config: Config) -> tuple[str, ...]:
    if not request.gpu:
        raise VmError(f"--mode {request.mode} needs --gpu ADDR (see 'janus-hooks devices')")
    snap = HostSnapshot.read(host)
    gpu = snap.devices.get(request.gpu)
    if gpu is None:
        raise VmError(f"no PCI device {request.gpu} on this host (see 'janus-hooks devices')")
    if not gpu.is_display:
        raise VmError(f"PCI device {request.gpu} is not a GPU (class {gpu.pci_class})")
    display = gpus(snap)
    if request.mode == "passthrough" and len(display) < 2:
        raise VmError(f"GPU {gpu.address} is this host's only GPU: use --mode single-gpu (the desktop stops "
                      "while the VM runs)")
    verdict = gpu_verdict(snap, config, gpu)
    refusal = verdict.refusals.get(request.mode)
    if refusal:
        raise VmError(f"GPU {gpu.address} cannot go to a {request.mode} VM: {refusal}")
    functions = [f.address for f in verdict.functions]
    # An HDMI audio function on another slot (some laptops) or named by the person; else found in the group.
    if request.gpu_audio:
        audio = snap.devices.get(request.gpu_audio)
        if audio is None:
            raise VmError(f"no PCI device {request.gpu_audio} on this host (--gpu-audio)")
        if audio.iommu_group != gpu.iommu_group and audio.address not in functions:
            raise VmError(f"--gpu-audio {audio.address} is in IOMMU group {audio.iommu_group}, the GPU in "
                          f"{gpu.iommu_group}: it must go with its own group")
        functions.append(audio.address)
    else:
        functions += [a for a in snap.groups.get(gpu.iommu_group, ()) if a not in functions
                      and _is_audio(snap.devices.get(a))]
    return tuple(dict.fromkeys(functions))


def _is_audio(dev: PciDevice | None) -> bool:
    return dev is not None and dev.base_class == _PCI_CLASS_AUDIO


def _shared_gpu(request: VmRequest, host: Host) -> SharedGpu:
    devices = {d.address: d for d in host.pci_devices()}
    if request.gpu:
        gpu = devices.get(request.gpu)
        if gpu is None or not gpu.is_display:
            raise VmError(f"no GPU {request.gpu} on this host (see 'janus-hooks devices')")
    else:
        display = [d for d in devices.values() if d.is_display]
        gpu = next((d for d in display if d.boot_vga), display[0] if display else None)
    if gpu is not None:
        mdev_type = _mdev_type(host, gpu.address)
        if mdev_type:
            return SharedGpu("mdev", gpu.address, mdev_type=mdev_type, mdev_uuid=str(uuid.uuid4()))
        vf = _first_vf(host, gpu.address)
        if vf:
            return SharedGpu("vf", gpu.address, vf_address=vf)
    if request.windows:
        where = f"GPU {gpu.address}" if gpu else "this host (no GPU found)"
        raise VmError(f"{where} offers neither a mediated device (mdev_supported_types) nor SR-IOV virtual "
                      "functions (sriov_totalvfs): a Windows guest cannot share it; use --mode passthrough "
                      "with a second GPU, single-gpu, or cpu-only")
    return SharedGpu("virgl", gpu.address if gpu else None)


def _mdev_type(host: Host, address: str) -> str | None:
    """The first mdev type of the GPU with an instance still available."""
    base = host.pci_dir(address) / "mdev_supported_types"
    try:
        types = sorted(os.listdir(base))
    except OSError:
        return None
    for name in types:
        try:
            if int((base / name / "available_instances").read_text().strip()) > 0:
                return name
        except (OSError, ValueError):
            continue
    return None


def _first_vf(host: Host, address: str) -> str | None:
    """The address VF 0 will have once enabled: PF routing id + ``sriov_offset`` (PCIe SR-IOV)."""
    base = host.pci_dir(address)
    try:
        total = int((base / "sriov_totalvfs").read_text().strip())
        offset = int((base / "sriov_offset").read_text().strip())
    except (OSError, ValueError):
        return None
    if total < 1:
        return None
    domain, bus, rest = address.split(":")
    slot, function = rest.split(".")
    rid = (int(bus, 16) << 8) + (int(slot, 16) << 3) + int(function) + offset
    return f"{domain}:{rid >> 8:02x}:{(rid >> 3) & 0x1f:02x}.{rid & 7:x}"


def _storage(request: VmRequest, host: Host) -> str:
    if request.storage == "block":
        if not request.disk:
            raise VmError("--storage block needs --disk /dev/... (a whole disk or a partition)")
        check_block(request.disk, host)
        return "raw"
    if not request.disk:
        return "qcow2"
    if blockdev.is_device_path(request.disk):
        raise VmError(f"{request.disk} is a device: use --storage block for it")
    _check_file(request.disk, "disk image")
    with open(request.disk, "rb") as fh:
        return "qcow2" if fh.read(4) == QCOW2_MAGIC else "raw"


def check_block(path: str, host: Host) -> str:
    """A whole disk or partition under /dev that nothing on the host uses (mounts, swap, LVM, RAID, root)."""
    if not blockdev.is_device_path(path):
        raise VmError(f"--disk {path} is not under /dev: block storage takes a whole disk or a partition")
    name = blockdev.block_name(host, path)
    if name is None:
        raise VmError(f"{path} is not a block device on this host")
    found = blockdev.uses(host, name)
    if not found:
        return path
    why = "; ".join(f"{u.device} {u.how}" for u in found)
    if any(u.root for u in found):
        raise VmError(f"{path} holds the host's root filesystem ({why}); refusing to give it to a guest")
    raise VmError(f"{path} is in use on the host ({why}); refusing to give it to a guest")
