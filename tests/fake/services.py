"""FakeServices and FakeRunner: systemd, logind and display-server commands played on the fake tree.

A unit's processes (from the world description) exist in ``proc/`` while it is active; stopping it
removes them, starting it brings them back. A unit marked ``stuck`` refuses to stop, as a hung display
manager would.

``set-property --runtime X AllowedCPUs=...`` does what systemd 252 does: a drop-in under
``run/systemd/system.control`` (kept, with an empty assignment, when the value is reset), the cpuset
controller enabled for the top-level groups while a unit needs it, and the unit's ``cpuset.cpus`` written.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from janus_hooks.cpuset import format_cpulist, parse_cpulist
from janus_hooks.errors import CommandFailed
from janus_hooks.host.runner import Result
from tests.fake.world import (
    LOGIND_PID,
    UNIT_STATE,
    close_files,
    kill_process,
    load_world,
    manager_socket,
    open_fd,
    session_device_file,
    session_file,
    spawn_process,
    unlink,
    write,
)


class FakeServices:
    """``fault(call, target)``, when given, makes a call fail as systemctl would (a failing unit, a timeout)."""

    def __init__(self, root: Path, fault: Callable[[str, str], bool] | None = None) -> None:
        self.root = Path(root)
        self.calls: list[tuple[str, str]] = []
        # Every systemctl --user --machine call (verb, uid, units), and the system-bus looks at user managers.
        self.user_calls: list[tuple[str, int, tuple[str, ...]]] = []
        self.system_calls: list[tuple[str, str]] = []
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
        # ``sessions_end_late``: logind still lists them when the stop returns (they end when terminated).
        for sid in [] if load_world(self.root).get("sessions_end_late") else self._sessions_of(unit):
            self._end_session(sid)
        if unit.startswith("user@"):
            # A user manager takes its units with it, and its private socket.
            uid = int(unit[len("user@"):-len(".service")])
            unlink(self.root / manager_socket(uid))
            for name in load_world(self.root).get("user_units", {}).get(str(uid), {}):
                self._set_user(uid, name, False)

    def start(self, unit: str, timeout: float) -> None:
        self._call("start", unit)
        spec = load_world(self.root).get("units", {}).get(unit)
        if spec is None:
            raise CommandFailed(f"systemctl start {unit} failed: Unit {unit} not found.")
        for proc in spec.get("processes", []):
            spawn_process(self.root, proc)
        write(self._state(unit), "active\n")
        for sid in self._sessions_of(unit):
            if not (self.root / "run/systemd/sessions" / sid).exists():  # one that never ended stays as it is
                self._begin_session(sid)
        if unit.startswith("user@"):
            # Its default units come up with it (PipeWire, WirePlumber, the compositor's helpers).
            uid = int(unit[len("user@"):-len(".service")])
            write(self.root / manager_socket(uid), "")
            for name in load_world(self.root).get("user_units", {}).get(str(uid), {}):
                self._set_user(uid, name, True)

    def terminate_session(self, session_id: str, timeout: float) -> None:
        self._call("terminate-session", session_id)
        self._end_session(session_id)

    def can_graphical(self, seat: str) -> bool:
        """seat0 can draw while a display device is bound to its own driver, once udev processed it:
        ``seat_lag`` (world) answers no that many more times after each bind, as a slow udev would."""
        self.calls.append(("can-graphical", seat))
        world = load_world(self.root)
        drawing = any(
            spec.get("native") and (dev := self.root / "sys/bus/pci/devices" / address / "driver").is_symlink()
            and os.path.basename(os.readlink(dev)) == spec["native"]
            and (self.root / "sys/bus/pci/devices" / address / "class").read_text().startswith("0x03")
            for address, spec in world.get("devices", {}).items()
        )
        lag = self.root / ".fake/seat-lag"
        if not drawing:
            lag.unlink(missing_ok=True)
            return False
        left = int(lag.read_text()) if lag.exists() else world.get("seat_lag", 0)
        if left > 0:
            write(lag, f"{left - 1}\n")
            return False
        return True

    def seat_has_active_session(self, seat: str) -> bool:
        """An autologin session of the world is back, or the display manager runs its greeter (a session
        of its own on a real seat, which the fake's worlds do not describe)."""
        self.calls.append(("active-session", seat))
        sessions = self.root / "run/systemd/sessions"
        if sessions.is_dir() and any("ACTIVE=1" in f.read_text() for f in sessions.iterdir()):
            return True
        dm = self.root / "etc/systemd/system/display-manager.service"
        return dm.is_symlink() and self.is_active(os.path.basename(os.readlink(dm)))

    # --- users' systemd instances ---------------------------------------------------------------------
    # Each call below is one ``systemctl --user --machine=UID@.host`` invocation (one PAM session on a real
    # host): ``user_calls`` counts them, so tests can assert how many a switch makes.
    def user_manager_running(self, uid: int) -> bool:
        self.system_calls.append(("is-active", f"user@{uid}.service"))
        return self._manager_up(uid)

    def _manager_up(self, uid: int) -> bool:
        return self.is_active(f"user@{uid}.service")

    def _user_call(self, verb: str, uid: int, units: Sequence[str]) -> None:
        self.user_calls.append((verb, uid, tuple(units)))
        if not self._manager_up(uid):
            raise CommandFailed(f"systemctl --user --machine={uid}@.host {verb} {' '.join(units)} failed: "
                                "Failed to connect to bus: No medium found")
        if str(uid) in load_world(self.root).get("user_bus_hangs", []):
            # A manager on its way out (seen in the desktop lab): its bus does not answer in time.
            raise CommandFailed(f"systemctl --user --machine={uid}@.host {verb} {' '.join(units)} "
                                "did not finish within 15 s")

    def user_units_running(self, uid: int, units: Sequence[str]) -> set[str]:
        self._user_call("show", uid, units)
        return {u for u in units if self._user_active(uid, u)}

    def _user_active(self, uid: int, unit: str) -> bool:
        path = self.root / UNIT_STATE / f"user-{uid}" / unit
        return path.exists() and path.read_text().strip() == "active"

    def stop_user(self, uid: int, units: Sequence[str], timeout: float) -> None:
        self._user_jobs("stop", uid, units, False)

    def start_user(self, uid: int, units: Sequence[str], timeout: float) -> None:
        self._user_jobs("start", uid, units, True)

    def _user_jobs(self, verb: str, uid: int, units: Sequence[str], active: bool) -> None:
        """As systemctl does with several units: a job for each one it knows, then an error for the others."""
        if not units:
            return
        self.calls.append((f"{verb}-user", f"{uid}:{' '.join(units)}"))
        self._user_call(verb, uid, units)
        known = load_world(self.root).get("user_units", {}).get(str(uid), {})
        for unit in units:
            if unit in known and self._fault and self._fault(f"{verb}-user", unit):
                raise CommandFailed(f"injected fault: systemctl --user {verb} {unit}")
            if unit in known:
                self._set_user(uid, unit, active)
        missing = [u for u in units if u not in known]
        if missing:
            raise CommandFailed(f"systemctl --user --machine={uid}@.host {verb} {' '.join(units)} failed: "
                                f"Unit {missing[0]} not found.")

    def _set_user(self, uid: int, unit: str, active: bool) -> None:
        state = self.root / UNIT_STATE / f"user-{uid}" / unit
        if state.exists() and (state.read_text().strip() == "active") == active:
            return
        for proc in load_world(self.root)["user_units"][str(uid)][unit]:
            (spawn_process if active else lambda root, p: kill_process(root, p["pid"]))(self.root, proc)
        write(state, "active\n" if active else "inactive\n")

    # --- logind sessions ----------------------------------------------------------------------------
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
        # The user's last session gone: without linger, logind stops the user's manager (after
        # UserStopDelaySec; at once here).
        uid = world.get("sessions", {}).get(sid, {}).get("uid")
        if uid is not None and not world.get("linger", {}).get(str(uid), True) and self._manager_up(uid):
            others = [s for s, spec in world.get("sessions", {}).items()
                      if s != sid and spec["uid"] == uid and (self.root / "run/systemd/sessions" / s).exists()]
            if not others:
                self.stop(f"user@{uid}.service", 0)
                self.calls.pop()

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
        if str(spec["uid"]) in world.get("linger", {}) and not self._manager_up(spec["uid"]):
            self.start(f"user@{spec['uid']}.service", 0)
            self.calls.pop()


    # --- unit properties (AllowedCPUs) --------------------------------------------------------------------
    def _dropin(self, unit: str, name: str) -> Path:
        return self.root / "run/systemd/system.control" / f"{unit}.d" / f"50-{name}.conf"

    def unit_property(self, unit: str, name: str) -> str:
        self._call("show", f"{unit} {name}")
        return self._property(unit, name)

    def _property(self, unit: str, name: str) -> str:
        path = self._dropin(unit, name)
        if not path.exists():
            return ""
        # systemd prints CPU sets as space-separated ranges ("0-1 3"), whatever spelling set them.
        return format_cpulist(parse_cpulist(path.read_text().split(f"{name}=", 1)[1])).replace(",", " ")

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
        needed = any(self._property(g, name) for g in groups)
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
