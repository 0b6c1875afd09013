"""Who holds the GPU decides what stops: graphical sessions, hosts without systemd, stuck display managers."""

from __future__ import annotations

from janus_hooks.domain import parse_domain
from tests.conftest import domain_xml
from tests.core.helpers import assert_same_tree, diff
from tests.fake import hosts
from tests.fake.builder import HostBuilder


def test_graphical_session_holding_the_gpu_is_ended(fake):
    h = fake(hosts.single_nvidia)
    # A Wayland compositor in the user's systemd instance (outside the session scope), as modern GNOME runs.
    HostBuilder(h.root).session("2", 1000, "wayland")
    HostBuilder(h.root).process(2100, "gnome-shell", ["/dev/dri/card0"], uid=1000,
                                cgroup="/user.slice/user-1000.slice/user@1000.service/session.slice/"
                                       "org.gnome.Shell@wayland.service")
    xml = domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS)
    # The compositor goes with the session in real life; here the fake ends it with session 2's processes.
    world = h.root / ".fake/world.json"
    world.write_text(world.read_text().replace(
        '"session_processes": {}',
        '"session_processes": {"2": [{"pid": 2100}]}'))
    before = h.snapshot()
    assert h.hook("win11", "prepare", "begin", xml) == (0, "")
    assert ("terminate-session", "2") in h.services.calls
    assert h.hook("win11", "release", "end", xml) == (0, "")
    # Everything is back except the ended session and its compositor: the display manager offers a login.
    assert diff(before, h.snapshot()) == sorted(
        k for k in before if k.startswith(("proc/2100", "run/systemd/sessions/2")))


def test_no_systemd_without_stop_command_goes_ahead_when_nothing_holds(fake):
    def build(root):
        b = HostBuilder(root, systemd=False)
        b.module("drm")
        b.module("bochs", drivers=("bochs-drm",), deps=("drm",))
        b.vfio_modules()
        b.pci("0000:00:02.0", "0x1234", "0x1111", "0x030000", "bochs-drm", 2, boot_vga=True, reset="")
        b.drm(0, "0000:00:02.0")
        b.fbcon()
        return b.build()

    h = fake(build)
    before = h.snapshot()
    xml = domain_xml(hostdevs=("0000:00:02.0",))
    plan = h.janus().plan(parse_domain(xml))
    assert any("reports no reset method" in n for n in plan.notes)
    assert h.hook("win11", "prepare", "begin", xml) == (0, "")
    assert h.driver("0000:00:02.0") == "vfio-pci"
    assert h.services.calls == []
    assert h.hook("win11", "release", "end", xml) == (0, "")
    assert_same_tree(before, h.snapshot())


def _runit_desktop(root, stops: bool = True):
    """A host without systemd whose Xorg is a runit service: ``sv down xorg`` / ``sv up xorg``."""
    b = HostBuilder(root, systemd=False)
    b.module("drm")
    b.module("bochs", drivers=("bochs-drm",), deps=("drm",))
    b.vfio_modules()
    b.pci("0000:00:02.0", "0x1234", "0x1111", "0x030000", "bochs-drm", 2, boot_vga=True)
    b.drm(0, "0000:00:02.0")
    b.fbcon()
    xorg = {"pid": 700, "comm": "Xorg", "fds": ["/dev/dri/card0"]}
    b.process(700, "Xorg", ["/dev/dri/card0"])
    # A server that ignores the stop request: sv exits 0, Xorg keeps the card open.
    b.command("/usr/bin/sv down xorg", kill=[xorg] if stops else [])
    b.command("/usr/bin/sv up xorg", spawn=[xorg])
    return b.build()


RUNIT_CONFIG = """
[display]
stop_command = ["/usr/bin/sv", "down", "xorg"]
start_command = ["/usr/bin/sv", "up", "xorg"]
[timeouts]
release = 0.3
driver = 0.3
module = 0.3
unit_stop = 0.3
"""


def test_no_systemd_display_server_stopped_by_configured_command(fake):
    h = fake(_runit_desktop)
    h.config(RUNIT_CONFIG)
    before = h.snapshot()
    xml = domain_xml(hostdevs=("0000:00:02.0",))
    assert h.hook("win11", "prepare", "begin", xml) == (0, "")
    assert h.runner.calls == [("/usr/bin/sv", "down", "xorg")]
    assert not (h.root / "proc/700").exists()
    assert h.hook("win11", "release", "end", xml) == (0, "")
    assert h.runner.calls[-1] == ("/usr/bin/sv", "up", "xorg")
    assert_same_tree(before, h.snapshot())


def test_display_server_that_does_not_stop_refuses_the_start_and_keeps_the_desktop(fake):
    h = fake(_runit_desktop, stops=False)
    h.config(RUNIT_CONFIG)
    before = h.snapshot()
    code, err = h.hook("win11", "prepare", "begin", domain_xml(hostdevs=("0000:00:02.0",)))
    assert code == 1
    assert err == ("janus-hooks: VM 'win11': wait until no process holds /dev/dri/card0, /dev/dri/renderD128: "
                   "pid 700 (Xorg) via /dev/dri/card0 still holds the GPU")
    assert h.runner.calls == [("/usr/bin/sv", "down", "xorg"), ("/usr/bin/sv", "up", "xorg")]
    assert_same_tree(before, h.snapshot())


def test_stuck_display_manager_refuses_and_restores(fake):
    def build(root):
        hosts.single_nvidia(root)
        world = root / ".fake/world.json"
        world.write_text(world.read_text().replace('"stuck": false', '"stuck": true', 1))
        return root

    h = fake(build)
    before = h.snapshot()
    code, err = h.hook("win11", "prepare", "begin", domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS))
    assert code == 1
    assert "did not finish within" in err and "systemctl stop" in err
    assert_same_tree(before, h.snapshot())
