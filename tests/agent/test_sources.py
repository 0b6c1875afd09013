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


# --- hotplug -------------------------------------------------------------------------------------------------
AMD_GPU, AMD_AUDIO = "0000:03:00.0", "0000:03:00.1"


def _unplug(root, address: str, stash) -> None:
    """The function leaves the bus: its sysfs directory and its driver's link go (kept aside to come back)."""
    import shutil

    dev = root / "sys/bus/pci/devices" / address
    shutil.copytree(dev, stash / address, symlinks=True)
    driver = dev / "driver"
    if driver.is_symlink():
        (root / "sys/bus/pci/drivers" / os.path.basename(os.readlink(driver)) / address).unlink()
    shutil.rmtree(dev)


def _plug(root, address: str, stash, driver: str | None) -> None:
    """The function comes back, as the kernel adds it: driver_override empty, ``driver`` bound if a loaded host
    driver probed it first (with udevd's rule not applied)."""
    import shutil

    dev = root / "sys/bus/pci/devices" / address
    shutil.copytree(stash / address, dev, symlinks=True)
    shutil.rmtree(stash / address)
    write(dev / "driver_override", "(null)\n")
    (dev / "driver").unlink(missing_ok=True)
    if driver:
        (dev / "driver").symlink_to(f"../../../../bus/pci/drivers/{driver}")
        (root / "sys/bus/pci/drivers" / driver / address).symlink_to(f"../../../../devices/{address}")


def _reserve(h, address: str) -> None:
    from janus_hooks import reserve
    from janus_hooks.host import Host

    host = Host(h.root, h.kernel)
    _reservation, changes = reserve.plan_reserve(host, address)
    reserve.apply(changes)


def _status(h) -> str:
    from click.testing import CliRunner

    from janus_hooks.cli import Env, cli
    from janus_hooks.host import Host

    env = Env(geteuid=lambda: 0, runner=h.runner, make_host=lambda root: Host(root, h.kernel),
              connect=lambda uri, ro: (_ for _ in ()).throw(RuntimeError("no libvirt here")))
    result = CliRunner().invoke(cli, ["status", "--root", str(h.root)], obj=env)
    assert result.exit_code == 0, result.output
    return result.output


def test_a_reserved_gpu_hot_added_goes_to_vfio_even_without_udevs_rule(fake, run_agent, caplog, tmp_path):
    h = fake(hosts.amd_dgpu_with_igpu)
    _reserve(h, AMD_GPU)
    rules = (h.root / "etc/udev/rules.d/40-janus-hooks-reserve.rules").read_text()
    agent = run_agent(h, libvirt=False)
    stash = tmp_path / "unplugged"
    for address in (AMD_GPU, AMD_AUDIO):  # the eGPU is unplugged while the host runs
        _unplug(h.root, address, stash)
    agent.post(DeviceEvent("remove", "pci", AMD_GPU, None, "30000"))
    agent.post(DeviceEvent("remove", "pci", AMD_AUDIO, None, "40300"))
    agent.idle()
    # Plugged in again: amdgpu (loaded) probed the GPU before anything could stop it; the audio function is
    # still unbound. vfio-pci is not loaded yet.
    assert not (h.root / "sys/module/vfio_pci/refcnt").exists()
    _plug(h.root, AMD_GPU, stash, "amdgpu")
    _plug(h.root, AMD_AUDIO, stash, None)
    agent.post(DeviceEvent("add", "pci", AMD_GPU, None, "30000"))
    agent.post(DeviceEvent("add", "pci", AMD_AUDIO, None, "40300"))
    _wait(lambda: "devices: 0000:03:00.1 added" in caplog.text, 10, "the audio function to be handled")
    agent.idle()
    for address in (AMD_GPU, AMD_AUDIO):
        assert _host(h).pci_driver(address) == "vfio-pci", address
        assert _host(h).pci_driver_override(address) == "vfio-pci", address
    assert (f"devices: {AMD_GPU} added, a function of GPU 0000:03:00 reserved for VMs: put on vfio-pci by the agent "
            "(udev's rule did not apply, taken from amdgpu)") in caplog.text
    # The reservation's rule is the only persistent change; the agent wrote none.
    assert (h.root / "etc/udev/rules.d/40-janus-hooks-reserve.rules").read_text() == rules
    assert not (h.root / "etc/modprobe.d/vfio.conf").exists()
    status = _status(h)
    assert "Devices that came or went (seen by the agent, newest last):" in status
    assert f"{AMD_GPU} removed: GPU left the PCI bus" in status
    assert (f"{AMD_GPU} added: reserved for VMs: put on vfio-pci by the agent (udev's rule did not apply, taken "
            "from amdgpu)") in status
    # A GPU that is not reserved is only noted.
    agent.post(DeviceEvent("add", "pci", "0000:0c:00.0", "amdgpu", "30000"))
    agent.idle()
    assert "0000:0c:00.0 added: GPU (not reserved for VMs)" in _status(h)
    assert _host(h).pci_driver("0000:0c:00.0") == "amdgpu"


def test_a_reserved_function_a_process_holds_is_not_taken_and_status_says_so(fake, run_agent, caplog, tmp_path):
    from tests.fake.world import spawn_process

    h = fake(hosts.amd_dgpu_with_igpu)
    _reserve(h, AMD_GPU)
    agent = run_agent(h, libvirt=False)
    _unplug(h.root, AMD_GPU, tmp_path)
    _plug(h.root, AMD_GPU, tmp_path, "amdgpu")
    spawn_process(h.root, {"pid": 1700, "comm": "kwin_wayland", "fds": ["/dev/dri/card1"], "cgroup": "/", "uid": 1000,
                           "opath": False})
    agent.post(DeviceEvent("add", "pci", AMD_GPU, None, "30000"))
    _wait(lambda: "devices: reserved GPU 0000:03:00:" in caplog.text, 10, "the refusal")
    agent.idle()
    assert _host(h).pci_driver(AMD_GPU) == "amdgpu"
    assert f"{AMD_GPU} (reserved for VMs) was taken by amdgpu and is held by pid 1700 (kwin_wayland)" in caplog.text
    assert f"{AMD_GPU} added: reserved for VMs, NOT on vfio-pci: {AMD_GPU} (reserved for VMs) was taken" in _status(h)


def test_a_gpu_a_running_vm_holds_falls_off_the_bus_status_names_the_vm(fake, run_agent, caplog, tmp_path):
    h = fake(hosts.single_nvidia)
    assert h.hook("win11", "prepare", "begin", domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS))[0] == 0
    write(h.root / "proc/4242/cmdline", "qemu-system-x86_64\0-name\0guest=win11\0")
    agent = run_agent(h, libvirt=False)
    _unplug(h.root, hosts.NVIDIA_FUNCTIONS[0], tmp_path)
    agent.post(DeviceEvent("remove", "pci", hosts.NVIDIA_FUNCTIONS[0], None, "30000"))
    agent.idle()
    _wait(lambda: "removed" in (h.root / "var/lib/janus-hooks/devices.json").read_text()
          if (h.root / "var/lib/janus-hooks/devices.json").exists() else False, 10, "the note")
    status = _status(h)
    gpu = hosts.NVIDIA_FUNCTIONS[0]
    assert f"    WARNING: {gpu} is gone from the PCI bus while VM win11 runs (QEMU pid 4242)" in status
    assert f"{gpu} removed: GPU held by VM win11: gone from the PCI bus while its journal is open" in status
    assert h.journal_vms() == ["win11"]  # reported, never rolled back for it


def _host(h):
    from janus_hooks.host import Host

    return Host(h.root, h.kernel)


def test_a_host_driver_that_probed_before_udevs_rule_ran_is_named(fake, tmp_path):
    from janus_hooks.agent.hotplug import claim_reserved

    h = fake(hosts.amd_dgpu_with_igpu)
    _reserve(h, AMD_GPU)
    _unplug(h.root, AMD_GPU, tmp_path)
    _plug(h.root, AMD_GPU, tmp_path, "amdgpu")
    write(h.root / "sys/bus/pci/devices" / AMD_GPU / "driver_override", "vfio-pci\n")  # the rule ran, too late
    done = claim_reserved(_host(h), AMD_GPU, timeout=1.0)
    assert done == "put on vfio-pci by the agent (amdgpu bound it before udev's rule ran)"
    assert _host(h).pci_driver(AMD_GPU) == "vfio-pci"
    assert claim_reserved(_host(h), AMD_GPU, timeout=1.0) == "on vfio-pci (udev's rule applied)"
