"""Service and session control: systemd and logind when they run, nothing otherwise."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from janus_hooks.errors import CommandFailed
from janus_hooks.host.runner import Runner, SubprocessRunner, check


class Services(Protocol):
    def is_active(self, unit: str) -> bool: ...

    def stop(self, unit: str, timeout: float) -> None: ...

    def start(self, unit: str, timeout: float) -> None: ...

    def terminate_session(self, session_id: str, timeout: float) -> None: ...

    def unit_property(self, unit: str, name: str) -> str: ...

    def set_unit_property(self, unit: str, name: str, value: str, timeout: float) -> None: ...

    def user_manager_running(self, uid: int) -> bool: ...

    def can_graphical(self, seat: str) -> bool: ...

    def seat_has_active_session(self, seat: str) -> bool: ...

    def user_units_running(self, uid: int, units: Sequence[str]) -> set[str]: ...

    def stop_user(self, uid: int, units: Sequence[str], timeout: float) -> None: ...

    def start_user(self, uid: int, units: Sequence[str], timeout: float) -> None: ...


class SystemdServices:
    """systemctl and loginctl through the runner; only used when the host model says systemd runs."""

    def __init__(self, runner: Runner | None = None) -> None:
        self._runner = runner or SubprocessRunner()

    def is_active(self, unit: str) -> bool:
        return self._runner.run(["systemctl", "is-active", "--quiet", unit], 15.0).returncode == 0

    def stop(self, unit: str, timeout: float) -> None:
        check(self._runner.run(["systemctl", "stop", unit], timeout))

    def start(self, unit: str, timeout: float) -> None:
        check(self._runner.run(["systemctl", "start", unit], timeout))

    def terminate_session(self, session_id: str, timeout: float) -> None:
        check(self._runner.run(["loginctl", "terminate-session", session_id], timeout))

    def unit_property(self, unit: str, name: str) -> str:
        return check(self._runner.run(["systemctl", "show", "--property", name, "--value", unit], 15.0)).stdout.strip()

    def set_unit_property(self, unit: str, name: str, value: str, timeout: float) -> None:
        # --runtime: the drop-in lives under /run and is gone after a reboot, like the VM run it serves.
        check(self._runner.run(["systemctl", "set-property", "--runtime", "--", unit, f"{name}={value}"], timeout))

    # A user's systemd instance, reached as root through the system bus (systemd >= 248): no session
    # environment, no su; a manager that is not running answers "inactive".
    def _user(self, uid: int) -> list[str]:
        return ["systemctl", "--user", f"--machine={uid}@.host"]

    def user_manager_running(self, uid: int) -> bool:
        return self.is_active(f"user@{uid}.service")

    def can_graphical(self, seat: str) -> bool:
        """logind's CanGraphical for ``seat``: a card udev tagged for it is there (no seat: False)."""
        result = self._runner.run(["loginctl", "show-seat", seat, "--property=CanGraphical", "--value"], 5.0)
        return result.returncode == 0 and result.stdout.strip() == "yes"

    def seat_has_active_session(self, seat: str) -> bool:
        """A session (a user's or a greeter's) is active on ``seat``: not one that is still closing."""
        result = self._runner.run(["loginctl", "show-seat", seat, "--property=ActiveSession", "--value"], 5.0)
        session = result.stdout.strip() if result.returncode == 0 else ""
        if not session:
            return False
        state = self._runner.run(["loginctl", "show-session", session, "--property=State", "--value"], 5.0)
        return state.returncode == 0 and state.stdout.strip() == "active"

    def user_units_running(self, uid: int, units: Sequence[str]) -> set[str]:
        """Which of ``units`` run (or are starting) in ``uid``'s manager: one call, whatever their number."""
        if not units:
            return set()
        result = check(self._runner.run([*self._user(uid), "show", "--property=Id,ActiveState", "--", *units],
                                        15.0))
        blocks = _show_blocks(result.stdout, len(units), result.argv)
        return {unit for unit, state in zip(units, blocks, strict=True) if state.get("ActiveState") in RUNNING_STATES}

    # A stop or start without --no-block returns once its jobs finished (non-zero when one failed): the
    # call is its own verification. Several units in one call: one PAM session instead of one per unit.
    def stop_user(self, uid: int, units: Sequence[str], timeout: float) -> None:
        if units:
            check(self._runner.run([*self._user(uid), "stop", "--", *units], timeout))

    def start_user(self, uid: int, units: Sequence[str], timeout: float) -> None:
        if units:
            check(self._runner.run([*self._user(uid), "start", "--", *units], timeout))


# What counts as running for a stop: "activating" will hold the device soon, "reloading" still does.
RUNNING_STATES = frozenset({"active", "activating", "reloading"})


def _show_blocks(stdout: str, expected: int, argv: Sequence[str]) -> list[dict[str, str]]:
    """``systemctl show`` of several units: one block of ``Name=value`` lines per unit, in the order asked,
    separated by empty lines."""
    blocks: list[dict[str, str]] = [{}]
    for line in stdout.splitlines():
        if not line.strip():
            if blocks[-1]:
                blocks.append({})
            continue
        name, _, value = line.partition("=")
        blocks[-1][name] = value
    blocks = [b for b in blocks if b]
    if len(blocks) != expected:
        raise CommandFailed(f"{' '.join(argv)}: {len(blocks)} unit block(s) in its output, {expected} expected")
    return blocks
