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
from tests.fake.world import kill_process, load_world, spawn_process, unlink, write

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

    def start(self, unit: str, timeout: float) -> None:
        self.calls.append(("start", unit))
        spec = load_world(self.root).get("units", {}).get(unit)
        if spec is None:
            raise CommandFailed(f"systemctl start {unit} failed: Unit {unit} not found.")
        for proc in spec.get("processes", []):
            spawn_process(self.root, proc)
        write(self._state(unit), "active\n")

    def terminate_session(self, session_id: str, timeout: float) -> None:
        self.calls.append(("terminate-session", session_id))
        world = load_world(self.root)
        for proc in world.get("session_processes", {}).get(session_id, []):
            kill_process(self.root, proc["pid"])
        unlink(self.root / "run/systemd/sessions" / session_id)


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
