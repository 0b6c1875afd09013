"""FakeServices and FakeRunner: systemd, logind and display-server commands played on the fake tree.

A unit's processes (from the world description) exist in ``proc/`` while it is active; stopping it
removes them, starting it brings them back. A unit marked ``stuck`` refuses to stop, as a hung display
manager would.

``set-property --runtime X AllowedCPUs=...`` does what systemd 252 does: a drop-in under
``run/systemd/system.control`` (kept, with an empty assignment, when the value is reset), the cpuset
controller enabled for the top-level groups while a unit needs it, and the unit's ``cpuset.cpus`` written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from janus_hooks.cpuset import format_cpulist, parse_cpulist
from janus_hooks.errors import CommandFailed
from janus_hooks.host.runner import Result
from tests.fake.world import (
    LOGIND_PID,
    close_files,
    kill_process,
    load_world,
    open_fd,
    session_device_file,
    session_file,
    spawn_process,
    unlink,
    write,
)

UNIT_STATE = "run/fake-systemd"


class FakeServices:
    """``fault(call, target)``, when given, makes a call fail as systemctl would (a failing unit, a timeout)."""

    def __init__(self, root: Path, fault: Callable[[str, str], bool] | None = None) -> None:
        self.root = Path(root)
        self.calls: list[tuple[str, str]] = []
        self._fault = fault

    def _call(self, call: str, target: str) -> None:
        self.calls.append((call, target))
        if self._fault and self._fault(call, target):
            raise CommandFailed(f"injected fault: systemctl {call} {target}")

    def _state(self, unit: str) -> Path:
        return self.root / UNIT_STATE / unit

    def is_active(self, unit: str) -> bool:
        path = self._state(unit)
        return path.exists() and path.read_text().strip() == "active"

    def stop(self, unit: str, timeout: float) -> None:
        self._call("stop", unit)
        spec = load_world(self.root).get("units", {}).get(unit)
        if spec is None:
            raise CommandFailed(f"systemctl stop {unit} failed: Unit {unit} not loaded.")
        if spec.get("stuck"):
            raise CommandFailed(f"systemctl stop {unit} did not finish within {timeout:g} s")
        for proc in spec.get("processes", []):
            kill_process(self.root, proc["pid"])
        write(self._state(unit), "inactive\n")
        for sid in self._sessions_of(unit):
            self._end_session(sid)

    def start(self, unit: str, timeout: float) -> None:
        self._call("start", unit)
        spec = load_world(self.root).get("units", {}).get(unit)
        if spec is None:
            raise CommandFailed(f"systemctl start {unit} failed: Unit {unit} not found.")
        for proc in spec.get("processes", []):
            spawn_process(self.root, proc)
        write(self._state(unit), "active\n")
        for sid in self._sessions_of(unit):
            self._begin_session(sid)

    def terminate_session(self, session_id: str, timeout: float) -> None:
        self.calls.append(("terminate-session", session_id))
        self._end_session(session_id)

    def _sessions_of(self, unit: str) -> list[str]:
        sessions = load_world(self.root).get("sessions", {})
        return sorted(sid for sid, spec in sessions.items() if spec.get("unit") == unit)

    def _end_session(self, sid: str) -> None:
        """The session's processes go; logind releases its devices (and drops them from PID 1's fd store)."""
        world = load_world(self.root)
        for proc in world.get("session_processes", {}).get(sid, []):
            kill_process(self.root, proc["pid"])
        unlink(self.root / "run/systemd/sessions" / sid)
        for pid in (1, LOGIND_PID):
            close_files(self.root, pid, session_device_file(sid, ""))

    def _begin_session(self, sid: str) -> None:
        """A display manager's autologin: the same session again, its devices taken through logind."""
        world = load_world(self.root)
        spec = world["sessions"][sid]
        write(self.root / "run/systemd/sessions" / sid, session_file(sid, spec["uid"], spec["kind"]))
        for node in spec.get("devices", []):
            for pid in (1, LOGIND_PID):
                open_fd(self.root, pid, node, session_device_file(sid, node))
        for proc in world.get("session_processes", {}).get(sid, []):
            spawn_process(self.root, proc)


    # --- unit properties (AllowedCPUs) --------------------------------------------------------------------
    def _dropin(self, unit: str, name: str) -> Path:
        return self.root / "run/systemd/system.control" / f"{unit}.d" / f"50-{name}.conf"

    def unit_property(self, unit: str, name: str) -> str:
        path = self._dropin(unit, name)
        if not path.exists():
            return ""
        return path.read_text().split(f"{name}=", 1)[1].strip()

    def set_unit_property(self, unit: str, name: str, value: str, timeout: float) -> None:
        self._call("set-property", f"{unit} {name}={value}")
        if name != "AllowedCPUs":
            raise CommandFailed(f"systemctl set-property {unit} {name}= failed: Unknown assignment")
        cgroup = self.root / "sys/fs/cgroup"
        online = parse_cpulist((self.root / "sys/devices/system/cpu/online").read_text())
        try:
            cpus = parse_cpulist(value)
        except ValueError as err:
            raise CommandFailed(f"systemctl set-property {unit} failed: Failed to parse {value!r}") from err
        if not cpus <= online:
            raise CommandFailed(f"systemctl set-property {unit} failed: Invalid argument")
        kind = unit.rsplit(".", 1)[1].capitalize()
        write(self._dropin(unit, name), f"# This is a drop-in unit file extension, created via \"systemctl "
                                        f"set-property\" or an equivalent operation. Do not edit.\n[{kind}]\n"
                                        f"{name}={value}\n")
        controllers = (cgroup / "cgroup.subtree_control").read_text().split()
        groups = [g.name for g in sorted(cgroup.iterdir()) if g.is_dir()]
        needed = any(self.unit_property(g, name) for g in groups)
        if needed and "cpuset" not in controllers:
            controllers.append("cpuset")
            for g in groups:
                write(cgroup / g / "cpuset.cpus", "\n")
        write(cgroup / unit / "cpuset.cpus", format_cpulist(cpus) + "\n")
        if not needed and "cpuset" in controllers:
            # No unit asks for a cpuset any more: systemd realises the tree without the controller.
            controllers.remove("cpuset")
            for g in groups:
                unlink(cgroup / g / "cpuset.cpus")
        write(cgroup / "cgroup.subtree_control", " ".join(controllers) + "\n")


class FakeRunner:
    """Runs the configured display commands against the fake tree: argv[0] names a world command."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.calls: list[tuple[str, ...]] = []

    def run(self, argv: Sequence[str], timeout: float) -> Result:
        self.calls.append(tuple(argv))
        commands = load_world(self.root).get("commands", {})
        action = commands.get(" ".join(argv))
        if action is None:
            return Result(tuple(argv), 127, "", f"{argv[0]}: not found")
        for proc in action.get("kill", []):
            kill_process(self.root, proc["pid"])
        for proc in action.get("spawn", []):
            spawn_process(self.root, proc)
        return Result(tuple(argv), action.get("status", 0), "", action.get("stderr", ""))
