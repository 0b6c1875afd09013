"""Realistic fake hosts, each as a desktop of that kind would look to janus-hooks."""

from __future__ import annotations

from pathlib import Path

from tests.fake.builder import HostBuilder
from tests.fake.world import write

NVIDIA_GPU = "0000:01:00.0"
NVIDIA_FUNCTIONS = ("0000:01:00.0", "0000:01:00.1", "0000:01:00.2", "0000:01:00.3")


def _common(b: HostBuilder) -> HostBuilder:
    """What every desktop has: a root port, onboard audio and USB, the vfio modules on disk."""
    b.module("pcieport", drivers=("pcieport",))
    b.module("snd_hda_intel", drivers=("snd_hda_intel",))
    b.module("xhci_pci", drivers=("xhci_hcd",))
    b.vfio_modules()
    b.pci("0000:00:00.0", "0x8086", "0x4660", "0x060000", None, 0)
    b.pci("0000:00:01.0", "0x8086", "0x460d", "0x060400", "pcieport", 1)
    b.pci("0000:00:14.0", "0x8086", "0x7ae0", "0x0c0330", "xhci_hcd", 5)
    b.pci("0000:00:1f.3", "0x8086", "0x7ad0", "0x040300", "snd_hda_intel", 9)
    b.hugepages({0: 8192})
    return b


def nvidia_modules(b: HostBuilder) -> None:
    b.module("drm")
    b.module("nvidia", drivers=("nvidia",), deps=("drm",))
    b.module("nvidia_modeset", deps=("nvidia",))
    b.module("nvidia_uvm", deps=("nvidia",))
    b.module("nvidia_drm", deps=("nvidia_modeset", "drm"))
    b.module("i2c_nvidia_gpu", drivers=("nvidia-gpu",))
    b.node("/dev/nvidiactl", "nvidia").node("/dev/nvidia-modeset", "nvidia_modeset").node("/dev/nvidia0", NVIDIA_GPU)


def single_nvidia(root: Path, fb: str | None = "efifb", dm: str = "gdm3.service") -> Path:
    """One NVIDIA card (VGA + HDMI audio + USB-C + UCSI) driving the desktop, Xorg under the DM."""
    return _single_nvidia(HostBuilder(root), fb, dm).build()


def pinned_nvidia(root: Path, systemd: bool = True, irqbalance: bool = True, **cpus) -> Path:
    """``single_nvidia`` with 8 SMT threads (4 cores), cpufreq, cgroup v2, IRQs and workqueue masks, as a
    gaming desktop that pins its VM looks; ``systemd`` False: an init without systemd (cgroups by hand)."""
    b = _single_nvidia(HostBuilder(root, systemd=systemd), "efifb", "gdm3.service")
    b.cpus(**cpus)
    if irqbalance and systemd:
        b.unit("irqbalance.service", [{"pid": 700, "comm": "irqbalance", "fds": []}])
    elif irqbalance:
        b.process(700, "irqbalance", [], cgroup="/openrc.irqbalance")
        write(root / "run/irqbalance.pid", "700\n")
    if not systemd:
        # A service in its own top-level group, as OpenRC's unified hierarchy has it.
        b.process(710, "sshd", [], cgroup="/openrc.sshd")
    return b.build()


def _single_nvidia(b: HostBuilder, fb: str | None, dm: str) -> HostBuilder:
    _common(b)
    nvidia_modules(b)
    b.pci("0000:01:00.0", "0x10de", "0x2484", "0x030000", "nvidia", 1, boot_vga=True)
    b.pci("0000:01:00.1", "0x10de", "0x228b", "0x040300", "snd_hda_intel", 1)
    b.pci("0000:01:00.2", "0x10de", "0x1aec", "0x0c0330", "xhci_hcd", 1)
    b.pci("0000:01:00.3", "0x10de", "0x1aed", "0x0c8000", "nvidia-gpu", 1)
    b.drm(0, NVIDIA_GPU)
    b.nvidia_minor(NVIDIA_GPU, 0)
    b.fbcon()
    if fb:
        b.framebuffer(fb)
    b.unit(dm, [{"pid": 1200, "comm": "Xorg", "fds": ["/dev/dri/card0", "/dev/nvidiactl", "/dev/nvidia0"]},
                {"pid": 1201, "comm": dm.split(".")[0], "fds": []}])
    b.display_manager(dm)
    b.unit("nvidia-persistenced.service", [{"pid": 900, "comm": "nvidia-persiste", "fds": ["/dev/nvidiactl"]}])
    # A terminal in the session: no GPU node open, must survive.
    b.process(3000, "bash", ["/dev/pts/0"], cgroup="/user.slice/user-1000.slice/session-2.scope", uid=1000)
    return b


def single_vendor(root: Path, vendor: str) -> Path:
    """A single GPU of another vendor family (amdgpu, i915, nouveau, radeon, bochs=generic) under sddm."""
    ids = {"amdgpu": ("0x1002", "0x73bf", "amdgpu", "amdgpu"),
           "i915": ("0x8086", "0x4680", "i915", "i915"),
           "nouveau": ("0x10de", "0x1b80", "nouveau", "nouveau"),
           "radeon": ("0x1002", "0x6798", "radeon", "radeon"),
           "bochs": ("0x1234", "0x1111", "bochs-drm", "bochs")}
    vid, did, driver, module = ids[vendor]
    b = _common(HostBuilder(root))
    b.module("drm")
    b.module(module, drivers=(driver,), deps=("drm",))
    address = "0000:00:02.0" if vendor in ("i915", "bochs") else "0000:03:00.0"
    group = 2 if address == "0000:00:02.0" else 3
    b.pci(address, vid, did, "0x030000", driver, group, boot_vga=True)
    if vendor == "amdgpu":
        b.pci("0000:03:00.1", "0x1002", "0xab28", "0x040300", "snd_hda_intel", 3)
        b.node("/dev/kfd", "amdgpu")
    b.drm(0, address)
    b.fbcon()
    b.framebuffer("simpledrm")
    fds = ["/dev/dri/card0"] + (["/dev/kfd"] if vendor == "amdgpu" else [])
    b.unit("sddm.service", [{"pid": 1300, "comm": "Xorg", "fds": fds}])
    b.display_manager("sddm.service")
    return b.build()


POLARIS_GPU = "0000:03:00.0"
POLARIS_FUNCTIONS = ("0000:03:00.0", "0000:03:00.1")


def single_polaris(root: Path, vendor_reset: bool | None = True, reset: str | None = "bus") -> Path:
    """An RX 580 (Polaris 10, AMD's reset bug) driving the desktop under sddm. ``vendor_reset``: the module
    loaded (True), installed only (False), or absent (None); ``reset``: its reset_method (None: a kernel
    before 5.15, which has no such attribute)."""
    b = _common(HostBuilder(root))
    b.module("drm")
    b.module("amdgpu", drivers=("amdgpu",), deps=("drm",))
    b.pci(POLARIS_GPU, "0x1002", "0x67df", "0x030000", "amdgpu", 3, boot_vga=True, reset=reset or "")
    b.pci("0000:03:00.1", "0x1002", "0xaaf0", "0x040300", "snd_hda_intel", 3)
    if reset is None:
        (root / "sys/bus/pci/devices" / POLARIS_GPU / "reset_method").unlink()
    if vendor_reset is not None:
        b.vendor_reset(POLARIS_GPU, loaded=vendor_reset)
    b.node("/dev/kfd", "amdgpu")
    b.drm(0, POLARIS_GPU)
    b.fbcon()
    b.framebuffer("simpledrm")
    b.unit("sddm.service", [{"pid": 1300, "comm": "Xorg", "fds": ["/dev/dri/card0", "/dev/kfd"]}])
    b.display_manager("sddm.service")
    return b.build()


def amd_dgpu_with_igpu(root: Path, dgpu: str = "0x73bf") -> Path:
    """An AMD dGPU for the VM and an AMD iGPU (boot VGA) for the desktop: both on amdgpu. ``dgpu``: its
    device id (0x73bf, a Navi 21, resets cleanly; 0x67df, a Polaris 10, does not without vendor-reset)."""
    b = _common(HostBuilder(root))
    b.module("drm")
    b.module("amdgpu", drivers=("amdgpu",), deps=("drm",))
    b.pci("0000:03:00.0", "0x1002", dgpu, "0x030000", "amdgpu", 3, boot_vga=False)
    b.pci("0000:03:00.1", "0x1002", "0xab28", "0x040300", "snd_hda_intel", 3)
    b.pci("0000:0c:00.0", "0x1002", "0x164e", "0x030000", "amdgpu", 12, boot_vga=True)
    b.drm(0, "0000:0c:00.0").drm(1, "0000:03:00.0")
    b.node("/dev/kfd", "amdgpu")
    b.fbcon()
    b.unit("gdm.service", [{"pid": 1400, "comm": "gnome-shell", "fds": ["/dev/dri/card0"]}])
    b.display_manager("gdm.service")
    return b.build()


def gpu_sharing_group(root: Path) -> Path:
    """A GPU whose IOMMU group also holds an unrelated SATA controller (a poor ACS topology)."""
    b = _common(HostBuilder(root))
    nvidia_modules(b)
    b.module("ahci", drivers=("ahci",))
    b.pci("0000:01:00.0", "0x10de", "0x2484", "0x030000", "nvidia", 1, boot_vga=True)
    b.pci("0000:01:00.1", "0x10de", "0x228b", "0x040300", "snd_hda_intel", 1)
    b.pci("0000:02:00.0", "0x1022", "0x7901", "0x010601", "ahci", 1)
    b.drm(0, NVIDIA_GPU)
    b.fbcon()
    return b.build()


def two_identical_gpus(root: Path) -> Path:
    """Two identical NVIDIA cards: the desktop on the first, the second for the VM (passthrough)."""
    b = _common(HostBuilder(root))
    nvidia_modules(b)
    b.pci("0000:01:00.0", "0x10de", "0x2484", "0x030000", "nvidia", 1, boot_vga=True)
    b.pci("0000:01:00.1", "0x10de", "0x228b", "0x040300", "snd_hda_intel", 1)
    b.pci("0000:02:00.0", "0x10de", "0x2484", "0x030000", "nvidia", 2, boot_vga=False)
    b.pci("0000:02:00.1", "0x10de", "0x228b", "0x040300", "snd_hda_intel", 2)
    b.drm(0, "0000:01:00.0").drm(1, "0000:02:00.0")
    b.fbcon()
    b.framebuffer("efifb")
    b.unit("gdm3.service", [{"pid": 1200, "comm": "Xorg", "fds": ["/dev/dri/card0", "/dev/nvidiactl"]}])
    b.display_manager("gdm3.service")
    return b.build()


def numa_two_nodes(root: Path, node_pages: dict[int, int] | None = None,
                   fragmented: dict[int, int] | None = None) -> Path:
    """A 2-node workstation with 2 MiB and 1 GiB pools on both nodes, no GPU in the VM."""
    b = HostBuilder(root)
    b.module("vfio", loaded=False)
    b.pci("0000:00:00.0", "0x8086", "0x2020", "0x060000", None, 0, numa=0)
    b.hugepages(node_pages or {0: 4096, 1: 4096}, fragmented=fragmented)
    b.hugepages({0: 4, 1: 4}, size_kb=1048576)
    write_nodes = root / "sys/devices/system/node"
    for n in (0, 1):
        (write_nodes / f"node{n}").mkdir(parents=True, exist_ok=True)
    return b.build()


DESKTOP_GPU = "0000:00:02.0"
DESKTOP_AUDIO = "0000:00:02.1"
SECOND_GPU = "0000:00:03.0"
DESKTOP_USER = 1000
DESKTOP_FUNCTIONS = (DESKTOP_GPU, DESKTOP_AUDIO)


def systemd_desktop(root: Path, second_gpu: bool = False, linger: bool = False) -> Path:
    """What the desktop lab runs: systemd as PID 1 with logind, greetd's autologin starting weston in a
    wayland session on seat0; weston took card0 through logind (TakeDevice), so logind and PID 1's fd store
    hold the very same open file. The GPU has an HDA audio function (card 0) in its IOMMU group, which
    WirePlumber in the user's systemd instance holds. ``second_gpu``: a secondary-vga on bochs-drm in its
    own IOMMU group. ``linger``: the user's manager outlives the session."""
    b = _common(HostBuilder(root))
    b.module("drm")
    b.module("bochs", drivers=("bochs-drm",), deps=("drm",))
    b.pci(DESKTOP_GPU, "0x1234", "0x1111", "0x030000", "bochs-drm", 2, boot_vga=True, reset="")
    b.pci(DESKTOP_AUDIO, "0x8086", "0x293e", "0x040300", "snd_hda_intel", 2, reset="")
    b.drm(0, DESKTOP_GPU)
    b.sound(0, DESKTOP_AUDIO)
    if second_gpu:
        b.pci(SECOND_GPU, "0x1234", "0x1111", "0x030000", "bochs-drm", 3, boot_vga=False, reset="")
        b.drm(1, SECOND_GPU)
    b.fbcon()
    b.unit("greetd.service", [{"pid": 1100, "comm": "greetd", "fds": []}])
    b.display_manager("greetd.service")
    b.user_manager(DESKTOP_USER, {
        "pipewire.service": [{"pid": 1210, "comm": "pipewire", "fds": ["/dev/snd/seq"]}],
        "wireplumber.service": [{"pid": 1211, "comm": "wireplumber", "fds": ["/dev/snd/controlC0"]}],
    }, linger=linger)
    b.session("1", DESKTOP_USER, "wayland", unit="greetd.service", devices=("/dev/dri/card0",),
              processes=[{"pid": 1150, "comm": "weston", "fds": ["/dev/dri/card0"]}])
    return b.build()
