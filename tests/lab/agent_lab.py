"""The event agent INSIDE the real-kernel lab, in either flavour (see tests/lab/README.md):

    tests/lab/run -- .venv/bin/python tests/lab/agent_lab.py                      # runit: kernel uevents
    tests/lab/run --flavour desktop -- .venv/bin/python tests/lab/agent_lab.py    # systemd: udev, its unit

What it does, for real: `janus-hooks install`; the agent started (runit: in the background; desktop: its
installed unit, Type=notify with the watchdog, hardened, through systemctl); a managed VM's GPU switched to
vfio-pci by the installed hook (runit: the lab GPU 00:02.0, single-GPU; desktop: the second GPU 00:06.0,
passthrough) with a stand-in QEMU process (`-name guest=VM`) since no guest can run a bochs VGA here; then a
host driver binding that GPU behind the VM's back (driver_override cleared, vfio-pci unbound, the host
driver probed): the agent must report it from the real uevent, and `status` must show it. Then the stand-in
QEMU dies with nobody to call `release end`: the agent must roll the VM back (pidfd) and the host driver must
have the GPU again. Desktop only: a refused start while the user's session is up: the agent must show its
reason as a notification on the user's session bus (a recording service owns org.freedesktop.Notifications).

Every figure comes from the lab's /sys, its processes and the agent's own log. Results:
$LAB_OUT/agent-<flavour>.json.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import scenario
from scenario import VENV_BIN, run, say, stop_process, wait_for

FLAVOUR = os.environ.get("LAB_FLAVOUR", "runit")
OUT = scenario.OUT
HOOK = scenario.HOOK
VM = "lab-agent"
JOURNAL = Path("/var/lib/janus-hooks/journal") / f"{VM}.jsonl"
UNIT = "janus-hooks-agent.service"
DESK_UID = 1500
RECORD = Path(f"/run/user/{DESK_UID}/janus-lab-notifications.jsonl")
AGENT_LOG = OUT / "agent.log"
if FLAVOUR == "desktop":
    GPU, MODE, HOST_DRIVER, HOST_MODULE = "0000:00:06.0", "passthrough", "bochs-drm", "bochs"
else:
    GPU, MODE, HOST_DRIVER, HOST_MODULE = "0000:00:02.0", "single-gpu", "bochs-drm", "bochs"


def domain(name: str, address: str, mode: str) -> str:
    dom, bus, rest = address.split(":")
    slot, fn = rest.split(".")
    return (f"<domain type='qemu'><name>{name}</name><metadata><janus:profile xmlns:janus='{scenario.PROFILE_NS}' "
            f"mode='{mode}'/></metadata><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>"
            "<emulator>/usr/bin/qemu-system-x86_64</emulator><hostdev mode='subsystem' type='pci' managed='yes'>"
            f"<source><address domain='0x{dom}' bus='0x{bus}' slot='0x{slot}' function='0x{fn}'/></source>"
            "</hostdev></devices></domain>")


def driver(address: str) -> str | None:
    try:
        return os.path.basename(os.readlink(f"/sys/bus/pci/devices/{address}/driver"))
    except OSError:
        return None


def write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def hook(vm: str, op: str, sub: str, xml: str) -> subprocess.CompletedProcess:
    # As libvirt runs it: its clean environment, the XML on stdin.
    return subprocess.run([str(HOOK), vm, op, sub, "-"], input=xml, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": "/root"},
                          check=False)


class AgentLog:
    """The agent's log lines: its unit's journal (desktop) or its stderr file (runit)."""

    def lines(self) -> list[str]:
        if FLAVOUR == "desktop":
            proc = run(["journalctl", "-u", UNIT, "-o", "cat", "--no-pager"], check=False)
            return proc.stdout.splitlines()
        try:
            return AGENT_LOG.read_text().splitlines()
        except FileNotFoundError:
            return []

    def has(self, text: str) -> bool:
        return any(text in line for line in self.lines())


def start_agent(result: dict) -> subprocess.Popen | None:
    if FLAVOUR == "desktop":
        result["unit_file"] = run(["systemctl", "cat", UNIT], check=False).stdout[-300:]
        if not result["unit_file"]:
            result["unit_files"] = sorted(os.listdir("/etc/systemd/system"))
            run(["systemctl", "daemon-reload"])
        start = time.monotonic()
        # Type=notify: systemctl start returns once the agent said READY=1.
        run(["systemctl", "start", UNIT], timeout=180)
        result["agent_start_s"] = time.monotonic() - start
        show = run(["systemctl", "show", UNIT, "-p", "Type,ActiveState,SubState,StatusText,WatchdogUSec,"
                    "NRestarts,MainPID"]).stdout
        result["unit"] = dict(line.split("=", 1) for line in show.splitlines() if "=" in line)
        say(f"agent unit: {result['unit']}")
        return None
    log = AGENT_LOG.open("w")
    proc = subprocess.Popen([str(VENV_BIN / "janus-hooks"), "agent", "--no-libvirt"], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wait_for(lambda: AgentLog().has("agent: ready"), 120, "the agent to be ready")
    return proc


def notification(result: dict, log: AgentLog) -> None:
    """A refused start while desk's session is up reaches desk's session bus."""
    env = {"PATH": "/usr/bin:/bin", "DBUS_SESSION_BUS_ADDRESS": f"unix:path=/run/user/{DESK_UID}/bus",
           "XDG_RUNTIME_DIR": f"/run/user/{DESK_UID}", "HOME": "/home/desk"}
    RECORD.unlink(missing_ok=True)
    recorder = subprocess.Popen(["/usr/sbin/runuser", "-u", "desk", "--", "/usr/bin/python3",
                                 str(scenario.REPO / "tests/lab/notify_recorder.py"), str(RECORD)],
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: Path(f"{RECORD}.ready").exists() or recorder.poll() is not None, 60,
                 "the notification recorder to own org.freedesktop.Notifications")
        if recorder.poll() is not None:
            raise SystemExit(f"the recorder died: {recorder.stdout.read().decode(errors='replace')}")
        refused = hook("lab-broken", "prepare", "begin", domain("lab-broken", "0000:00:09.0", "passthrough"))
        result["refused"] = {"returncode": refused.returncode, "stderr": refused.stderr.strip()}
        say(f"refused start: {refused.stderr.strip()}")
        try:
            result["notify_s"] = wait_for(lambda: RECORD.exists() and RECORD.read_text().strip(), 90,
                                          "the notification to reach desk's session bus")
        except SystemExit as err:
            result["notify_error"] = str(err)
        result["notifications"] = ([json.loads(line) for line in RECORD.read_text().splitlines()]
                                   if RECORD.exists() else [])
        result["failure_record"] = json.loads(Path("/var/lib/janus-hooks/failures/lab-broken.json").read_text())
        result["agent_desktop_lines"] = [line for line in log.lines() if "desktop:" in line or "lab-broken" in line]
    finally:
        recorder.terminate()
        try:
            recorder.wait(10)
        except subprocess.TimeoutExpired:
            recorder.kill()


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    result: dict = {"flavour": FLAVOUR, "gpu": GPU}
    for private in ("/var/lib/janus-hooks", "/var/log/janus-hooks"):
        if Path(private).is_dir():
            os.chmod(private, 0o700)
    installed = run([str(VENV_BIN / "janus-hooks"), "install", "--yes"])
    result["install"] = installed.stdout.splitlines()[-8:]
    Path("/etc/janus-hooks/janus.toml").write_text("log_level = \"info\"\n[timeouts]\ndriver = 20.0\nmodule = 20.0\n")
    log = AgentLog()
    try:
        agent = start_agent(result)
    except SystemExit as err:
        result["agent_start_error"] = str(err)
        (OUT / f"agent-{FLAVOUR}.json").write_text(json.dumps(result, indent=2))
        raise
    result["udev_source"] = next((line for line in log.lines() if "devices: following" in line), None)
    try:
        if FLAVOUR == "desktop":
            try:
                notification(result, log)
            except (OSError, SystemExit) as err:
                result["notify_error"] = repr(err)
        result["driver_before"] = driver(GPU)
        # The stand-in for QEMU (libvirt's -name guest=VM is how janus-hooks recognises a VM's process),
        # started before the prepare: with no libvirt in the lab, no STARTED event tells the agent when a
        # QEMU appears, so it finds this one when the journal is written.
        qemu = subprocess.Popen(["/usr/bin/python3", "-c", "import time; time.sleep(900)", "-name",
                                 f"guest={VM},debug-threads=on"], stdin=subprocess.DEVNULL)
        switched = hook(VM, "prepare", "begin", domain(VM, GPU, MODE))
        result["prepare"] = {"returncode": switched.returncode, "stderr": switched.stderr.strip()}
        if switched.returncode != 0:
            raise SystemExit(f"prepare failed: {switched.stderr.strip()}")
        result["driver_switched"] = driver(GPU)
        say(f"{GPU} switched: {result['driver_before']} -> {result['driver_switched']}")
        wait_for(lambda: log.has(f"VM {VM}: following QEMU pid {qemu.pid}"), 60, "the agent to follow the VM's QEMU")
        # A host driver takes the GPU behind the VM's back.
        write(f"/sys/bus/pci/devices/{GPU}/driver_override", "\n")
        write("/sys/bus/pci/drivers/vfio-pci/unbind", GPU)
        run(["modprobe", HOST_MODULE])
        if driver(GPU) is None:
            write("/sys/bus/pci/drivers_probe", GPU)
        wait_for(lambda: driver(GPU) == HOST_DRIVER, 30, f"{HOST_DRIVER} to bind {GPU}")
        expected = f"devices: host driver {HOST_DRIVER} bound {GPU} while VM {VM} (QEMU pid {qemu.pid}) holds it"
        try:
            result["reported_s"] = wait_for(lambda: log.has(expected), 60, "the agent to report the host driver")
        except SystemExit as err:
            result["report_error"] = str(err)
        result["status"] = run([str(VENV_BIN / "janus-hooks"), "status"], check=False).stdout
        # QEMU dies; nobody will call release end (no libvirt here): the agent rolls the VM back.
        died = time.monotonic()
        qemu.send_signal(signal.SIGKILL)
        qemu.wait(30)
        try:
            wait_for(lambda: not JOURNAL.exists(), 120, "the agent to roll the VM back")
            result["rollback_s"] = time.monotonic() - died
            # The agent logs the outcome once its worker is done, just after the journal went.
            wait_for(lambda: log.has(f"VM {VM}: rolled back"), 30, "the agent to log the rollback")
        except SystemExit as err:
            result["rollback_error"] = str(err)
        result["driver_after"] = driver(GPU)
        result["agent_lines"] = [line for line in log.lines() if VM in line or "devices:" in line][-40:]
    finally:
        if agent is not None:
            result["agent_exit"] = stop_process(agent)
        elif FLAVOUR == "desktop":
            run(["systemctl", "stop", UNIT], timeout=120, check=False)
            result["unit_after_stop"] = run(["systemctl", "show", UNIT, "-p", "ActiveState,Result"],
                                            check=False).stdout.split()
        (OUT / f"agent-{FLAVOUR}.json").write_text(json.dumps(result, indent=2))
    say(json.dumps({k: v for k, v in result.items() if k not in ("status", "agent_lines")}, indent=2))
    return 0



if __name__ == "__main__":
    sys.exit(main())
