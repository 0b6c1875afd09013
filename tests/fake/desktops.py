"""Whole desktops for the CLI tests: the fake kernel's PCI world plus what `check` reads around it
(CPU flags, kvm and vfio modules on disk, hugetlbfs, libvirt installed and running, a kernel release).
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.fake.builder import HostBuilder
from tests.fake.hosts import nvidia_modules
from tests.fake.world import spawn_process, write

KERNEL_RELEASE = "6.1.0-27-amd64"
LIBVIRTD_PID = 777
NVIDIA_VGA = "0000:01:00.0"
NVIDIA_AUDIO = "0000:01:00.1"
NVIDIA_CARD = (NVIDIA_VGA, NVIDIA_AUDIO)
INTEL_IGPU = "0000:00:02.0"
USB_CONTROLLER = "0000:00:14.0"


def _base(b: HostBuilder, usb_group: int) -> HostBuilder:
    """Chipset devices of an Intel desktop: host bridge, the GPU slot's root port, USB, onboard audio."""
    b.module("pcieport", drivers=("pcieport",))
    b.module("snd_hda_intel", drivers=("snd_hda_intel",))
    b.module("xhci_pci", drivers=("xhci_hcd",))
    b.module("kvm").module("kvm_intel", deps=("kvm",))
    b.vfio_modules()
    b.pci("0000:00:00.0", "0x8086", "0x4660", "0x060000", None, 0)
    b.pci("0000:00:01.0", "0x8086", "0x460d", "0x060400", "pcieport", 1)
    b.pci(USB_CONTROLLER, "0x8086", "0x7ae0", "0x0c0330", "xhci_hcd", usb_group)
    b.pci("0000:00:1f.3", "0x8086", "0x7ad0", "0x040300", "snd_hda_intel", 9)
    b.hugepages({0: 8192})
    b.hugepages({0: 8}, size_kb=1048576)
    return b


def _system_files(root: Path) -> None:
    """Around the PCI world: the kernel release and its modules on disk, hugetlbfs, libvirt running."""
    write(root / "proc/sys/kernel/osrelease", KERNEL_RELEASE + "\n")
    modules = root / "lib/modules" / KERNEL_RELEASE
    write(modules / "modules.dep",
          "kernel/drivers/vfio/vfio.ko.xz:\n"
          "kernel/drivers/vfio/pci/vfio-pci-core.ko.xz: kernel/drivers/vfio/vfio.ko.xz\n"
          "kernel/drivers/vfio/pci/vfio-pci.ko.xz: kernel/drivers/vfio/pci/vfio-pci-core.ko.xz\n"
          "kernel/arch/x86/kvm/kvm.ko.xz:\n")
    write(modules / "modules.builtin", "kernel/drivers/pci/pcieport.ko\n")
    write(root / "proc/mounts", "sysfs /sys sysfs rw 0 0\nhugetlbfs /dev/hugepages hugetlbfs rw,pagesize=2M 0 0\n")
    daemon = root / "usr/sbin/libvirtd"
    write(daemon, "#!/bin/sh\necho 'libvirtd (libvirt) 9.0.0'\n")
    os.chmod(daemon, 0o755)
    write(root / "run/libvirtd.pid", f"{LIBVIRTD_PID}\n")
    spawn_process(root, {"pid": LIBVIRTD_PID, "comm": "libvirtd", "fds": [],
                         "cgroup": "/system.slice/libvirtd.service"})


def nvidia_desktop(root: Path) -> Path:
    """One NVIDIA card (VGA + HDMI audio) behind the CPU's root port, driving a GNOME desktop under gdm3:
    efifb at boot, fbcon on it, Xorg holding card0 and /dev/nvidia*, nvidia-persistenced running."""
    b = _base(HostBuilder(root), usb_group=5)
    nvidia_modules(b)
    b.pci(NVIDIA_VGA, "0x10de", "0x2484", "0x030000", "nvidia", 1, boot_vga=True)
    b.pci(NVIDIA_AUDIO, "0x10de", "0x228b", "0x040300", "snd_hda_intel", 1)
    b.drm(0, NVIDIA_VGA)
    b.nvidia_minor(NVIDIA_VGA, 0)
    b.fbcon()
    b.framebuffer("efifb")
    b.unit("gdm3.service", [{"pid": 1200, "comm": "Xorg", "fds": ["/dev/dri/card0", "/dev/nvidiactl", "/dev/nvidia0"]},
                            {"pid": 1201, "comm": "gdm3", "fds": []}])
    b.display_manager("gdm3.service")
    b.unit("nvidia-persistenced.service", [{"pid": 900, "comm": "nvidia-persiste", "fds": ["/dev/nvidiactl"]}])
    b.session("2", 1000, "x11")
    b.process(3000, "bash", ["/dev/pts/0"], cgroup="/user.slice/user-1000.slice/session-2.scope", uid=1000)
    b.build()
    _system_files(root)
    return root


def igpu_and_dgpu_sharing_usb(root: Path) -> Path:
    """The desktop on the Intel iGPU; an NVIDIA card whose IOMMU group also holds the chipset's USB
    controller (a board without ACS between them), so it cannot be given to a VM on its own."""
    b = _base(HostBuilder(root), usb_group=1)
    b.module("drm")
    b.module("i915", drivers=("i915",), deps=("drm",))
    nvidia_modules(b)
    b.pci(INTEL_IGPU, "0x8086", "0x4680", "0x030000", "i915", 2, boot_vga=True)
    b.pci(NVIDIA_VGA, "0x10de", "0x2484", "0x030000", "nvidia", 1, boot_vga=False)
    b.pci(NVIDIA_AUDIO, "0x10de", "0x228b", "0x040300", "snd_hda_intel", 1)
    b.drm(0, INTEL_IGPU).drm(1, NVIDIA_VGA)
    b.fbcon()
    b.framebuffer("simpledrm")
    b.unit("sddm.service", [{"pid": 1300, "comm": "Xorg", "fds": ["/dev/dri/card0"]}])
    b.display_manager("sddm.service")
    b.build()
    _system_files(root)
    return root


def no_iommu_desktop(root: Path) -> Path:
    """The NVIDIA desktop booted without intel_iommu=on: no IOMMU groups at all."""
    nvidia_desktop(root)
    write(root / "proc/cmdline", "BOOT_IMAGE=/vmlinuz root=/dev/sda1 quiet\n")
    for dev in (root / "sys/bus/pci/devices").iterdir():
        (dev / "iommu_group").unlink()
    for group in (root / "sys/kernel/iommu_groups").iterdir():
        for member in (group / "devices").iterdir():
            member.unlink()
        (group / "devices").rmdir()
        group.rmdir()
    return root
