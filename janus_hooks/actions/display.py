"""Freeing the GPU from its users: units, logind sessions, display-server commands, then a check."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from janus_hooks.actions.base import Action, Context, wait_until
from janus_hooks.errors import JanusError, StepFailed
from janus_hooks.host.runner import check
from janus_hooks.host.sysfs import DEV_NODE
from janus_hooks.schema import SESSION, UNIT, argv, boolean, integer, list_of, pattern

SEAT = pattern(r"(seat[A-Za-z0-9_-]{1,60})?", "a logind seat name (seat0)")

log = logging.getLogger(__name__)


def _wait_or_warn(ctx: Context, done: Callable[[], bool], timeout: float, what: str, suffix: str) -> float | None:
    """``wait_until``, but a wait that runs out is a warning (``suffix`` says what happens anyway): the seconds
    waited, or None."""
    try:
        return wait_until(ctx, done, timeout, what)
    except StepFailed as err:
        ctx.warn(f"{err}{suffix}")
        return None


@dataclass(frozen=True)
class StopUnit(Action):
    """A system unit that holds the GPU (a display manager, a vendor daemon) stopped, started again after."""

    kind = "stop-unit"
    schema = {"unit": UNIT, "seat": SEAT}
    old_schema = {"active": boolean}
    unit: str
    # A display manager: started again only once logind says this seat can draw (udev tagged the card).
    seat: str = ""

    def describe(self) -> str:
        return f"stop {self.unit}"

    def capture(self, ctx: Context) -> dict[str, Any]:
        return {"active": ctx.services.is_active(self.unit)}

    def apply(self, ctx: Context, old: dict[str, Any]) -> None:
        if old["active"]:
            ctx.services.stop(self.unit, ctx.config.timeouts.unit_stop)

    def verify(self, ctx: Context, old: dict[str, Any]) -> None:
        wait_until(ctx, lambda: not ctx.services.is_active(self.unit), ctx.config.timeouts.unit_stop,
                   f"{self.unit} stopping")

    def revert(self, ctx: Context, old: dict[str, Any]) -> None:
        if old.get("active") and not ctx.services.is_active(self.unit):
            if self.seat:
                self._wait_for_seat(ctx)
            ctx.services.start(self.unit, ctx.config.timeouts.unit_stop)
            if self.seat:
                self._wait_for_session(ctx)

    def _wait_for_session(self, ctx: Context) -> None:
        # What is reverted after this (the user units the plan stopped first: PipeWire, an application with the
        # card open) must find the session back: the compositor master of the card before any application
        # opens it, and logind's ACLs giving the user the audio nodes before WirePlumber looks for them.
        # A display manager showing its greeter is back too: the user's units start anyway.
        waited = _wait_or_warn(ctx, lambda: ctx.services.seat_has_active_session(self.seat),
                               ctx.config.timeouts.unit_stop, f"a session becoming active on {self.seat}",
                               f" after starting {self.unit}")
        if waited is not None:
            log.info("a session is active on %s %.0f ms after %s started", self.seat, waited * 1000, self.unit)

    def _wait_for_seat(self, ctx: Context) -> None:
        # The driver is back by now (undone first), but logind counts the card only once udev tagged it for
        # the seat; a display manager started before that finds no usable seat and some give up. CanGraphical
        # alone is not enough: another card can keep the seat graphical, so first let udev finish the events
        # of the card that just came back (bounded; seen in the desktop lab: greeter only).
        if ctx.host.udev_running():
            timeout = ctx.config.timeouts.driver
            try:
                settled = ctx.runner.run(["udevadm", "settle", f"--timeout={max(1, int(timeout))}"], timeout + 2)
                ok = settled.returncode == 0
            except JanusError:
                ok = False
            if not ok:
                ctx.warn(f"udev did not settle within {timeout:g} s before starting {self.unit}")
        # Starting it anyway is the better bet: the display manager may still find the card.
        waited = _wait_or_warn(ctx, lambda: ctx.services.can_graphical(self.seat), ctx.config.timeouts.driver,
                               f"{self.seat} becoming able to draw (logind's CanGraphical)",
                               f"; starting {self.unit} anyway")
        if waited is not None:
            log.info("%s can draw again after %.0f ms", self.seat, waited * 1000)


@dataclass(frozen=True)
class EndSession(Action):
    """A graphical logind session that holds the GPU. Nothing to undo: the display manager comes back."""

    kind = "end-session"
    schema = {"session": SESSION, "user": integer(0, 2**32 - 1)}
    old_schema = {"present": boolean}
    session: str
    user: int

    def describe(self) -> str:
        return f"end graphical session {self.session} of uid {self.user}"

    def capture(self, ctx: Context) -> dict[str, Any]:
        return {"present": any(s.id == self.session for s in ctx.host.sessions())}

    def apply(self, ctx: Context, old: dict[str, Any]) -> None:
        if old["present"]:
            try:
                ctx.services.terminate_session(self.session, ctx.config.timeouts.unit_stop)
            except JanusError:
                # Stopping the display manager ends its sessions too, a moment later: logind may forget this one
                # between the look and the call ("No session '1' known", seen in the desktop lab).
                if any(s.id == self.session for s in ctx.host.sessions()):
                    raise
                log.info("session %s ended on its own before janus-hooks ended it", self.session)

    def verify(self, ctx: Context, old: dict[str, Any]) -> None:
        wait_until(ctx, lambda: all(s.id != self.session for s in ctx.host.sessions()),
                   ctx.config.timeouts.unit_stop, f"session {self.session} ending")


@dataclass(frozen=True)
class StopUserUnits(Action):
    """Units of one user's systemd instance (compositor, portal, PipeWire, Sunshine) that hold the GPU or its
    audio. Started again on release only while that user's manager still runs (lingering, an ssh login):
    otherwise the user's next login starts them.

    One step for all of a user's units: every ``systemctl --user --machine`` call opens a PAM session through
    logind (seconds on a slow host), so the state of all of them is read in one call and they stop in one
    call, whose own result says whether their stop jobs finished."""

    kind = "stop-user-units"
    schema = {"uid": integer(0, 2**32 - 1), "units": list_of(UNIT, 64)}
    old_schema = {"running": list_of(UNIT, 64)}
    uid: int
    units: tuple[str, ...]

    def describe(self) -> str:
        return f"stop user unit{'s' if len(self.units) > 1 else ''} {', '.join(self.units)} of uid {self.uid}"

    def capture(self, ctx: Context) -> dict[str, Any]:
        # No manager (the user's last session took it, or it never ran): nothing runs, no call to make.
        if not ctx.host.user_manager_listening(self.uid):
            return {"running": []}
        running = ctx.services.user_units_running(self.uid, self.units)
        return {"running": [u for u in self.units if u in running]}

    def apply(self, ctx: Context, old: dict[str, Any]) -> None:
        # Nothing between the capture and this but the journal's append: no second look. A stop without
        # --no-block returns once the jobs finished, non-zero if one failed: that is the verification
        # (WaitReleased then checks that the processes let go of the nodes).
        ctx.services.stop_user(self.uid, tuple(old["running"]), ctx.config.timeouts.unit_stop)

    def revert(self, ctx: Context, old: dict[str, Any]) -> None:
        start_user_units_again(ctx, self.uid, tuple(old.get("running", ())))


def start_user_units_again(ctx: Context, uid: int, units: tuple[str, ...]) -> None:
    """Start ``units`` of ``uid``'s manager in one call when that manager still runs; a unit that runs
    already is left as it is (start is idempotent). Failing is a warning: nothing a later replay could do
    better (a compositor unit needs the session that ended; a manager that was stopping when asked starts
    them itself with the user's next login)."""
    if not units:
        return
    # First what the host shows (no call), then the manager's unit on the system bus: a manager that is gone
    # or on its way out (the session's end stops it) may leave a call on its own bus hanging until the
    # timeout.
    if not ctx.host.user_manager_listening(uid) or not ctx.services.user_manager_running(uid):
        log.info("user manager of uid %d is not running: %s start with the next login", uid, ", ".join(units))
        return
    try:
        ctx.services.start_user(uid, units, ctx.config.timeouts.unit_stop)
    except StepFailed as err:
        ctx.warn(f"user units {', '.join(units)} of uid {uid} did not all start again: {err}")


@dataclass(frozen=True)
class StopUserUnit(Action):
    """One user unit per step, as janus-hooks journaled it before ``stop-user-units``: kept so that a journal
    written then is still put back; plans no longer make it."""

    kind = "stop-user-unit"
    schema = {"uid": integer(0, 2**32 - 1), "unit": UNIT}
    old_schema = {"active": boolean}
    uid: int
    unit: str

    def describe(self) -> str:
        return f"stop user unit {self.unit} of uid {self.uid}"

    def apply(self, ctx: Context, old: dict[str, Any]) -> None:
        raise StepFailed(f"{self.describe()}: only replayed from an older journal")

    def revert(self, ctx: Context, old: dict[str, Any]) -> None:
        if old.get("active"):
            start_user_units_again(ctx, self.uid, (self.unit,))


@dataclass(frozen=True)
class RunDisplayCommands(Action):
    """Hosts without systemd: the configured argv lists that stop and start the display server.

    Both commands must be idempotent (``sv down``/``sv up``, ``rc-service ... stop``): a crash between
    journal and apply makes recovery run the start command on a server that may still run.
    """

    kind = "display-commands"
    schema = {"stop": argv, "start": argv}
    old_schema = {}
    stop: tuple[str, ...]
    start: tuple[str, ...]

    def describe(self) -> str:
        return f"stop the display server: {' '.join(self.stop)}"

    def apply(self, ctx: Context, old: dict[str, Any]) -> None:
        check(ctx.runner.run(self.stop, ctx.config.timeouts.unit_stop))

    def revert(self, ctx: Context, old: dict[str, Any]) -> None:
        check(ctx.runner.run(self.start, ctx.config.timeouts.unit_stop))


@dataclass(frozen=True)
class WaitReleased(Action):
    """Nothing changes here: wait until no process holds the GPU's nodes, or name the one that does."""

    kind = "wait-released"
    schema = {"nodes": list_of(DEV_NODE), "shared_prefixes": list_of(DEV_NODE)}
    old_schema = {}
    nodes: tuple[str, ...]
    shared_prefixes: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"wait until no process holds {', '.join(self.nodes)}"

    def _holders(self, ctx: Context) -> list:
        return [
            h for h in ctx.host.gpu_holders()
            if h.node in self.nodes or any(h.node.startswith(p) for p in self.shared_prefixes)
        ]

    def apply(self, ctx: Context, old: dict[str, Any]) -> None:
        try:
            wait_until(ctx, lambda: not self._holders(ctx), ctx.config.timeouts.release, "the GPU being released")
        except StepFailed as err:
            holders = self._holders(ctx)
            if not holders:
                return
            raise StepFailed(f"{holders[0].describe()} still holds the GPU") from err
