"""Service and session control: systemd and logind when they run, nothing otherwise."""

from __future__ import annotations

from typing import Protocol

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

    def user_is_active(self, uid: int, unit: str) -> bool: ...

    def stop_user(self, uid: int, unit: str, timeout: float) -> None: ...

    def start_user(self, uid: int, unit: str, timeout: float) -> None: ...


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

    def user_is_active(self, uid: int, unit: str) -> bool:
        return self._runner.run([*self._user(uid), "is-active", "--quiet", unit], 15.0).returncode == 0

    def stop_user(self, uid: int, unit: str, timeout: float) -> None:
        check(self._runner.run([*self._user(uid), "stop", unit], timeout))

    def start_user(self, uid: int, unit: str, timeout: float) -> None:
        check(self._runner.run([*self._user(uid), "start", unit], timeout))
