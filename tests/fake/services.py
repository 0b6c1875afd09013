"""FakeServices and FakeRunner: systemd, logind and display-server commands played on the fake tree.

A unit's processes (from the world description) exist in ``proc/`` while it is active; stopping it
removes them, starting it brings them back. A unit marked ``stuck`` refuses to stop, as a hung display
manager would.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.calls: list[tuple[str, str]] = []

    def _state(self, unit: str) -> Path:
        return self.root / UNIT_STATE / unit

    def is_active(self, unit: str) -> bool:
        path = self._state(unit)
        return path.exists() and path.read_text().strip() == "active"

    def stop(self, unit: str, timeout: float) -> None:
        self.calls.append(("stop", unit))
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
        self.calls.append(("start", unit))
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
