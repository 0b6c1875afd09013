"""sd_notify over a real datagram socket, config edits on a real directory (inotify), device events,
and the desktop notification of a failed start."""

from __future__ import annotations

import os
import socket
import time

import pytest

from janus_hooks.agent.events import DeviceEvent
from janus_hooks.agent.sdnotify import SdNotify
from janus_hooks.agent.udev_source import device_event
from janus_hooks.failures import FailureStore
from tests.conftest import domain_xml
from tests.fake import hosts
from tests.fake.world import write


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up after {timeout:g} s waiting for {what}"
        time.sleep(0.01)


# --- sd_notify ---------------------------------------------------------------------------------------------
@pytest.fixture
def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(10)
    yield str(path), sock
    sock.close()


def test_sd_notify_ready_watchdog_and_stopping_reach_the_socket(notify_socket):
    path, sock = notify_socket
    sd = SdNotify({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())})
    assert sd.watchdog_interval == 30.0
    assert sd.ready("following x")
    assert sock.recv(4096) == b"READY=1\nSTATUS=following x"
    assert sd.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert sd.stopping()
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping"


def test_sd_notify_abstract_socket_and_a_watchdog_meant_for_another_pid():
    name = f"janus-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        sd = SdNotify({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"})
        assert sd.watchdog_interval is None  # WATCHDOG_PID names another process
        assert sd.ready("x")
        assert sock.recv(4096).startswith(b"READY=1")
    assert not SdNotify({}).enabled and not SdNotify({}).ready("x")


def test_the_agent_says_ready_and_pings_from_its_loop(fake, run_agent, notify_socket):
    path, sock = notify_socket
    h = fake(hosts.single_nvidia)
    # A watchdog of 0.2 s: pings every 0.1 s, from the event loop.
    sd = SdNotify({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    run_agent(h, sd=sd, libvirt=False)
    assert sock.recv(4096).startswith(b"READY=1\nSTATUS=following ")
    assert [sock.recv(4096) for _ in range(3)] == [b"WATCHDOG=1"] * 3


# --- config --------------------------------------------------------------------------------------------------
def test_config_edits_are_validated_and_the_last_good_config_stays(fake, run_agent, caplog):
    h = fake(hosts.single_nvidia)
    agent = run_agent(h, libvirt=False)
    config = h.root / "etc/janus-hooks/janus.toml"
    assert agent.agent.config.timeouts.lock == 2  # the fast timeouts the fixture wrote
    # An editor's save: a new file renamed over the old one.
    tmp = config.with_name(".janus.toml.swp")
    tmp.write_text('log_level = "debug"\n[timeouts]\nlock = 7\n')
    os.replace(tmp, config)
    _wait(lambda: agent.agent.config.timeouts.lock == 7, 10, "the valid edit to be read")
    assert agent.agent.config.log_level == "debug"
    config.write_text('[timeouts]\nlock = "soon"\n')  # in place, invalid
    _wait(lambda: "the last good config stays in force" in caplog.text, 10, "the invalid edit to be refused")
    assert f"config: {config}: timeouts.lock: 'soon' is not a number" in caplog.text
    assert agent.agent.config.timeouts.lock == 7
    profile = h.root / "etc/janus-hooks/vms/win11.toml"
    profile.parent.mkdir(exist_ok=True)
    profile.write_text('mode = "sometimes"\n')  # a new directory and an invalid profile in it
    _wait(lambda: f"{profile}: mode: 'sometimes' is not one of" in caplog.text, 10, "the invalid profile to be named")


# --- devices -------------------------------------------------------------------------------------------------
class _Device:
    """What pyudev's Monitor hands out, for device_event()."""

    def __init__(self, action, subsystem, sys_name, device_path, properties):
        self.action, self.subsystem, self.sys_name = action, subsystem, sys_name
        self.device_path, self.properties = device_path, properties


def test_uevents_become_device_events():
    bind = _Device("bind", "pci", "0000:01:00.0", "/devices/pci0000:00/0000:00:01.0/0000:01:00.0",
                   {"DRIVER": "nvidia", "PCI_CLASS": "30000"})
    assert device_event(bind) == DeviceEvent("bind", "pci", "0000:01:00.0", "nvidia", "30000")
    card = _Device("add", "drm", "card0", "/devices/pci0000:00/0000:00:02.0/drm/card0", {})
    assert device_event(card) == DeviceEvent("add", "drm", "card0", parent="0000:00:02.0")
    assert device_event(_Device("add", "drm", "card0-HDMI-A-1", "/x/drm/card0/card0-HDMI-A-1", {})) is None
    assert device_event(_Device("add", "usb", "1-1", "/x", {})) is None


def test_a_host_driver_binding_a_device_of_a_running_vm_is_reported(fake, run_agent, caplog):
    h = fake(hosts.single_nvidia)
    assert h.hook("win11", "prepare", "begin", domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS))[0] == 0
    write(h.root / "proc/4242/cmdline", "qemu-system-x86_64\0-name\0guest=win11\0")
    agent = run_agent(h, libvirt=False)
    agent.post(DeviceEvent("bind", "pci", hosts.NVIDIA_FUNCTIONS[1], "snd_hda_intel", "40300"))
    agent.post(DeviceEvent("remove", "pci", hosts.NVIDIA_FUNCTIONS[0], None, "30000"))
    agent.post(DeviceEvent("add", "pci", "0000:05:00.0", None, "30000"))
    agent.post(DeviceEvent("add", "drm", "card1", parent="0000:05:00.0"))
    agent.idle()
    assert (f"devices: host driver snd_hda_intel bound {hosts.NVIDIA_FUNCTIONS[1]} while VM win11 (QEMU pid 4242) "
            "holds it") in caplog.text
    assert f"devices: {hosts.NVIDIA_FUNCTIONS[0]}, held by VM win11, left the bus" in caplog.text
    assert "devices: GPU 0000:05:00.0 add" in caplog.text
    assert "devices: DRM card1 add on 0000:05:00.0" in caplog.text
    assert h.journal_vms() == ["win11"]  # reported, never rolled back for it


# --- the person sees why -------------------------------------------------------------------------------------
class _Recorder:
    def __init__(self, status: int = 0) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.status = status

    def run(self, argv, timeout):
        from janus_hooks.host.runner import Result

        self.calls.append(tuple(argv))
        return Result(tuple(argv), self.status, "", "" if self.status == 0 else "Call failed: no such name")


def test_a_failed_start_is_shown_once_a_graphical_session_is_active_on_seat0(fake, run_agent, caplog):
    h = fake(hosts.single_nvidia)
    (h.root / "run/systemd/sessions").mkdir(parents=True)  # logind runs, nobody is logged in
    code, line = h.hook("broken", "prepare", "begin", domain_xml("broken", hostdevs=("0000:09:00.0",)))
    assert code == 1
    runner = _Recorder()
    agent = run_agent(h, notifier_runner=runner, libvirt=False)
    sessions = h.root / "run/systemd/sessions"
    assert agent.agent.files.watched.get("sessions") == sessions
    agent.idle()
    assert runner.calls == []  # the desktop is not back yet
    write(sessions / "c7", "UID=1000\nUSER=ann\nACTIVE=1\nTYPE=tty\nSEAT=seat0\n")  # a text console
    write(sessions / "c8", "UID=1001\nUSER=bob\nACTIVE=1\nTYPE=wayland\n")  # remote, no seat
    time.sleep(0.3)
    agent.idle()
    assert runner.calls == []
    write(sessions / "c9", "UID=1000\nUSER=ann\nACTIVE=1\nTYPE=wayland\nSEAT=seat0\n")
    _wait(lambda: runner.calls, 10, "the notification")
    agent.idle()
    assert runner.calls == [("busctl", "--user", "--machine=1000@.host", "--", "call", "org.freedesktop.Notifications",
                             "/org/freedesktop/Notifications", "org.freedesktop.Notifications", "Notify",
                             "susssasa{sv}i", "janus-hooks", "0", "dialog-error", "VM broken did not start", line,
                             "0", "0", "-1")]
    assert FailureStore(h.root / "var/lib/janus-hooks").read("broken").notified
    write(sessions / "c10", "UID=1000\nUSER=ann\nACTIVE=0\nTYPE=wayland\nSEAT=seat0\n")
    time.sleep(0.3)
    agent.idle()
    assert len(runner.calls) == 1  # shown once


def test_a_notification_that_cannot_be_delivered_is_tried_again(fake, run_agent, caplog):
    h = fake(hosts.single_nvidia)
    write(h.root / "run/systemd/sessions/c9", "UID=1000\nUSER=ann\nACTIVE=1\nTYPE=x11\nSEAT=seat0\n")
    runner = _Recorder(status=1)
    agent = run_agent(h, notifier_runner=runner, libvirt=False)
    assert h.hook("broken", "prepare", "begin", domain_xml("broken", hostdevs=("0000:09:00.0",)))[0] == 1
    _wait(lambda: "could not show why its start failed" in caplog.text, 10, "the failed delivery")
    agent.idle()
    assert not FailureStore(h.root / "var/lib/janus-hooks").read("broken").notified
    runner.status = 0
    write(h.root / "run/systemd/sessions/c9", "UID=1000\nUSER=ann\nACTIVE=1\nTYPE=x11\nSEAT=seat0\nSTATE=active\n")
    _wait(lambda: FailureStore(h.root / "var/lib/janus-hooks").read("broken").notified, 10, "the second try")
