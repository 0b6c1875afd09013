"""The boot framebuffer on the way back: gone with the native driver's handover, or refusing to re-attach."""

from __future__ import annotations

from tests.conftest import domain_xml
from tests.core.helpers import assert_same_tree, diff
from tests.fake import hosts
from tests.fake.builder import HostBuilder
from tests.fake.kernel import FakeKernel

BOCHS = "0000:00:02.0"
XML = domain_xml(hostdevs=(BOCHS,))


def _bochs(root, handover: bool):
    """The lab's GPU: bochs-drm on the boot VGA, simpledrm's boot framebuffer detached at the start."""
    b = HostBuilder(root)
    b.module("drm")
    b.module("bochs", drivers=("bochs-drm",), deps=("drm",))
    b.vfio_modules()
    b.pci(BOCHS, "0x1234", "0x1111", "0x030000", "bochs-drm", 2, boot_vga=True)
    b.drm(0, BOCHS)
    b.fbcon()
    b.framebuffer("simpledrm", handover=handover)
    b.unit("sddm.service", [{"pid": 1300, "comm": "Xorg", "fds": ["/dev/dri/card0"]}])
    b.display_manager("sddm.service")
    return b.build()


def test_framebuffer_removed_by_the_native_driver_counts_as_restored(fake):
    h = fake(_bochs, handover=True)
    before = h.snapshot()
    assert h.hook("win11", "prepare", "begin", XML) == (0, "")
    assert h.hook("win11", "release", "end", XML) == (0, "")
    # bochs-drm took the aperture back and removed simple-framebuffer.0: nothing else differs.
    assert diff(before, h.snapshot()) == sorted(k for k in before if k.startswith(
        "sys/bus/platform/devices/simple-framebuffer.0"))
    assert h.journal_vms() == []
    assert h.janus().store.notes("win11") == []


def test_framebuffer_that_does_not_re_attach_is_a_warning_not_an_open_journal(fake):
    h = fake(hosts.single_nvidia, fb="efifb")
    before = h.snapshot()
    xml = domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS)
    assert h.hook("win11", "prepare", "begin", xml) == (0, "")
    # efifb refuses to bind again, as it does when the card's BAR moved.
    h.kernel = FakeKernel(h.root, fault=lambda n, op, target: target.endswith("efi-framebuffer/bind"))
    assert h.hook("win11", "release", "end", xml) == (0, "")
    assert h.journal_vms() == []
    assert diff(before, h.snapshot()) == ["sys/bus/platform/devices/efi-framebuffer.0/driver"]
    notes = h.janus().store.notes("win11")
    assert len(notes) == 1 and notes[0].startswith(
        "boot framebuffer efi-framebuffer.0 could not be re-attached to efi-framebuffer (injected fault")
    log = (h.root / "var/log/janus-hooks/hook.log").read_text()
    assert " WARNING janus_hooks.actions.base: boot framebuffer efi-framebuffer.0 could not be re-attached" in log
    # The next clean release of that VM forgets the warning.
    h.kernel = FakeKernel(h.root)
    assert h.hook("win11", "prepare", "begin", xml) == (0, "")
    assert h.hook("win11", "release", "end", xml) == (0, "")
    assert h.janus().store.notes("win11") == []
    assert_same_tree({k: v for k, v in before.items() if "efi-framebuffer.0/driver" not in k},
                     {k: v for k, v in h.snapshot().items() if "efi-framebuffer.0/driver" not in k})
