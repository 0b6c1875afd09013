"""A managed VM with a GPU hostdev, started through the real libvirtd, switched on a fake host tree.

This machine has no GPU. A second copy of the hook, rendered by janus-hooks' own install code with its
host root set to a fake tree (an AMD dGPU with its HDMI audio function, an AMD iGPU for the desktop), runs
beside the installed one; the VM is managed only by a profile in that tree, so the real install ignores it.
Real here: libvirt's hook calls with their arguments and the domain XML with its ``<hostdev>`` entries,
the plan, the journal, the engine's writes and waits, and the release libvirt runs when it gives up on a
device this host does not have. The kernel's part on the tree is played by tests/libvirt/animator.py.
"""

from __future__ import annotations

import re

import libvirt
import pytest

from janus_hooks.install import Identity, render_shim
from janus_hooks.resources import data_file
from tests.fake.builder import HostBuilder
from tests.fake.world import snapshot_tree
from tests.libvirt.animator import KernelAnimator
from tests.libvirt.conftest import PREFIX, QEMU_D, hook_log_lines, write_executable

pytestmark = pytest.mark.libvirt

DGPU, AUDIO = "0000:03:00.0", "0000:03:00.1"


def _amd_desktop(root):
    """A dGPU for the VM, an iGPU (boot VGA) for the desktop, both on amdgpu; vfio already loaded.

    Without systemd and with every module the switch needs already loaded, the plan holds only sysfs
    writes: nothing reaches this machine's own systemctl or modprobe."""
    b = HostBuilder(root)
    b.systemd = False
    b.module("pcieport", drivers=("pcieport",))
    b.module("snd_hda_intel", drivers=("snd_hda_intel",))
    b.module("vfio")
    b.module("vfio_pci_core", deps=("vfio",))
    b.module("vfio_pci", drivers=("vfio-pci",), deps=("vfio_pci_core",))
    b.module("vfio_iommu_type1", deps=("vfio",))
    b.module("drm")
    b.module("amdgpu", drivers=("amdgpu",), deps=("drm",))
    b.pci("0000:00:00.0", "0x1022", "0x14d8", "0x060000", None, 0)
    b.pci("0000:00:01.1", "0x1022", "0x14db", "0x060400", "pcieport", 3)
    b.pci(DGPU, "0x1002", "0x73bf", "0x030000", "amdgpu", 3, boot_vga=False)
    b.pci(AUDIO, "0x1002", "0xab28", "0x040300", "snd_hda_intel", 3)
    b.pci("0000:0c:00.0", "0x1002", "0x164e", "0x030000", "amdgpu", 12, boot_vga=True)
    b.drm(0, "0000:0c:00.0").drm(1, DGPU)
    b.fbcon()
    b.unit("gdm.service", [{"pid": 1400, "comm": "gnome-shell", "fds": ["/dev/dri/card0"]}])
    return b.build()


def _hostdev(address: str) -> str:
    dom, bus, rest = address.split(":")
    slot, fn = rest.split(".")
    # managed='no': with 'yes' libvirt checks this host for VFIO support before any hook runs.
    return (f"<hostdev mode='subsystem' type='pci' managed='no'><source><address domain='0x{dom}' bus='0x{bus}'"
            f" slot='0x{slot}' function='0x{fn}'/></source></hostdev>")


def test_gpu_hostdev_switched_and_released_on_a_fake_tree(installed, libvirtd, vms, tmp_path):
    root = _amd_desktop(tmp_path / "host")
    root.chmod(0o755)
    name = PREFIX + "gpu"
    (root / "etc/janus-hooks/vms").mkdir(parents=True)
    (root / "etc/janus-hooks/vms" / f"{name}.toml").write_text('mode = "passthrough"\n')
    shim = QEMU_D / "janus-hooks-fakeroot"
    write_executable(shim, render_shim(data_file("hooks", "qemu").read_text(), Identity.current(root)))
    try:
        dom = vms.define(name, devices="".join(_hostdev(a) for a in (DGPU, AUDIO)))
        before, real_log = snapshot_tree(root), len(hook_log_lines())
        with KernelAnimator(root) as kernel:
            with pytest.raises(libvirt.libvirtError) as err:
                vms.start(dom)
    finally:
        shim.unlink()
    # janus-hooks switched both functions; then libvirt itself gave up on a device this host lacks and
    # called release end, which put the tree back.
    message = str(err.value)
    assert "janus-hooks" not in message, message
    assert not kernel.errors, kernel.errors
    for address, driver in ((DGPU, "amdgpu"), (AUDIO, "snd_hda_intel")):
        switch = [(f"sys/bus/pci/devices/{address}/driver_override", "vfio-pci"),
                  (f"sys/bus/pci/drivers/{driver}/unbind", address), ("sys/bus/pci/drivers_probe", address)]
        back = [(f"sys/bus/pci/devices/{address}/driver_override", ""),
                ("sys/bus/pci/drivers/vfio-pci/unbind", address), ("sys/bus/pci/drivers_probe", address)]
        assert _in_order(kernel.handled, switch + back), kernel.handled
    log = (root / "var/log/janus-hooks/hook.log").read_text()
    prepared = re.findall(rf"VM {name}: prepared (\d+) step", log)
    released = re.findall(rf"VM {name}: released, (\d+) change", log)
    assert prepared and released and prepared == released and int(prepared[0]) >= 2, log
    assert snapshot_tree(root) == before
    assert not list((root / "var/lib/janus-hooks/journal").glob("*"))
    assert not [line for line in hook_log_lines()[real_log:] if name in line], "the real install acted on it"


def _in_order(seen: list, wanted: list) -> bool:
    it = iter(seen)
    return all(any(item == w for item in it) for w in wanted)
