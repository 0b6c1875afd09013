"""Runs a plan against the journal: capture -> journal -> apply -> verify, and replays journals backwards."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from janus_hooks.actions import Context
from janus_hooks.errors import JanusError, JournalError, KernelTimeout, StepFailed
from janus_hooks.journal import JournalState, JournalStore, JournalWriter

if TYPE_CHECKING:
    from janus_hooks.plan import Plan

log = logging.getLogger(__name__)

# Called with ("intent" | "applied" | "done", step index): lets tests stop the engine at any point.
Observer = Callable[[str, int], None]


def no_observer(event: str, step: int) -> None:
    return None


class StepTiming(NamedTuple):
    """How long one step took (a NamedTuple: cheaper to define than a dataclass, see host/model.py)."""

    description: str
    seconds: float


@dataclass
class RunReport:
    """What one prepare or release did, for the hook's log line and the CLI."""

    vm: str
    steps: list[StepTiming] = field(default_factory=list)
    reverted: int = 0
    skipped_after_reboot: int = 0


class Engine:
    """Applies plans and reverts journals; every transition holds the host-wide lock."""

    def __init__(self, ctx: Context, store: JournalStore, observer: Observer = no_observer) -> None:
        self.ctx = ctx
        self.store = store
        self.observer = observer

    def prepare(self, vm: str, make_plan: Callable[[], Plan]) -> tuple[Plan, RunReport]:
        """Plan and apply under one hold of the host-wide lock; on any failure revert and raise StepFailed.

        ``make_plan`` runs inside the lock, after any leftover of this VM was reverted: a plan made before
        the lock would check other VMs' claims and read the host as they were before a concurrent start,
        release or rollback changed them (two VMs would both get one GPU; a stale snapshot would skip the
        binding that a finishing release just undid).
        """
        with self.store.lock(self.ctx.config.timeouts.lock, self.ctx.clock, self.ctx.sleep):
            if self.store.exists(vm):
                # A start whose previous run never got its release (crash, killed libvirtd): undo that first,
                # so that the plan reads the host as it is afterwards.
                log.warning("VM %s: reverting changes left by an earlier start", vm)
                self._replay(vm)
            plan = make_plan()
            plan.raise_if_refused()
            return plan, self._apply(plan)

    def release(self, vm: str, lock_timeout: float | None = None, begun: float | None = None) -> RunReport:
        """Revert everything the journal of ``vm`` records, newest first. No journal: nothing to do.

        ``lock_timeout`` overrides the config's wait for the host-wide lock (0: try once, LockBusy if held).
        ``begun``: only the journal begun at that time; one a newer start wrote meanwhile is left alone.
        """
        timeout = self.ctx.config.timeouts.lock if lock_timeout is None else lock_timeout
        with self.store.lock(timeout, self.ctx.clock, self.ctx.sleep):
            if begun is not None:
                state = self.store.read(vm)
                if state is None or state.started != begun:
                    return RunReport(vm)
            return self._replay(vm)

    def _apply(self, plan: Plan) -> RunReport:
        report = RunReport(plan.vm)
        with self.store.open_writer(plan.vm, self.ctx.host.boot_id(), plan.devices) as writer:
            for index, action in enumerate(plan.actions):
                start = self.ctx.clock()
                try:
                    old = action.capture(self.ctx)
                    writer.intent(index, action, old)
                    self.observer("intent", index)
                    result = action.apply(self.ctx, old)
                    self.observer("applied", index)
                    action.verify(self.ctx, old)
                except KernelTimeout as err:
                    # A write asleep in the kernel cannot be cancelled, and undoing around it could block on the
                    # same device: keep the journal as it is, the step open, and say who finishes it.
                    self._keep_pending(writer, index, err)
                    raise StepFailed(f"{action.describe()}: {_reason(err)}; the journal keeps this step: once "
                                     f"that write finished, the VM's release or 'janus-hooks rollback {plan.vm}' "
                                     "puts the host back") from err
                except Exception as err:  # a bug in one action must not leave the host half-switched
                    reason = f"{action.describe()}: {_reason(err)}"
                    log.error("VM %s: step %d failed: %s; reverting", plan.vm, index + 1, reason)
                    try:
                        self._revert_all(plan.vm, writer)
                    except JanusError as revert_err:
                        raise StepFailed(f"{reason}; {revert_err}") from err
                    raise StepFailed(reason) from err
                seconds = self.ctx.clock() - start
                writer.done(index, seconds * 1000, result)
                self.observer("done", index)
                log.info("VM %s: %s (%.1f ms)", plan.vm, action.describe(), seconds * 1000)
                report.steps.append(StepTiming(action.describe(), seconds))
            writer.complete()
        return report

    def _revert_all(self, vm: str, writer: JournalWriter) -> None:
        state = self.store.read(vm)
        if state is None:
            raise JournalError(f"journal of VM {vm!r} vanished during its own run")
        failures = self._revert_steps(state, writer, RunReport(vm))
        self._keep_notes(vm)
        if failures:
            raise StepFailed(f"reverting failed too ({failures[0]}); run 'janus-hooks rollback {vm}'")
        self.store.remove(vm)

    def _replay(self, vm: str) -> RunReport:
        report = RunReport(vm)
        state = self.store.read(vm)
        if state is None:
            return report
        with self.store.append_writer(vm) as writer:
            failures = self._revert_steps(state, writer, report)
        self._keep_notes(vm)
        if failures:
            raise StepFailed(f"VM {vm}: {len(failures)} change(s) could not be reverted; first: {failures[0]}")
        self.store.remove(vm)
        return report

    def _keep_pending(self, writer: JournalWriter, index: int, err: KernelTimeout) -> None:
        pid = err.pid if err.pid is not None else -1
        log.error("step %d: %s", index + 1, _reason(err))
        writer.pending(index, pid, self.ctx.host.process_command(pid) if pid > 0 else "?")

    def _still_pending(self, pending: dict) -> bool:
        """The writer of an earlier run still sleeps in the kernel (same pid, same command name)."""
        pid = int(pending.get("pid", -1))
        return pid > 0 and self.ctx.host.process_command(pid) == pending.get("command")

    def _keep_notes(self, vm: str) -> None:
        """What this replay warned about, for ``status``; the journal does not stay open for it."""
        try:
            self.store.save_notes(vm, list(self.ctx.warnings))
        except (OSError, JanusError) as err:
            log.warning("VM %s: cannot keep the release notes: %s", vm, _reason(err))
        self.ctx.warnings.clear()

    def _revert_steps(self, state: JournalState, writer: JournalWriter, report: RunReport) -> list[str]:
        """Revert open steps newest first; keep going past failures so as much as possible comes back."""
        rebooted = state.boot_id != self.ctx.host.boot_id()
        failures = []
        for step in reversed(state.open_steps):
            action = step.action
            if rebooted and not action.persistent:
                # The kernel state this step changed did not survive the reboot: nothing to put back.
                log.info("VM %s: %s is gone with the reboot", state.vm, action.describe())
                writer.reverted(step.index)
                report.skipped_after_reboot += 1
                continue
            if step.pending and self._still_pending(step.pending):
                # Everything older than this step waits for it (a driver cannot come back to a device that
                # is still being unbound): stop here, keep the journal.
                failures.append(f"undo {action.describe()}: its kernel write is still pending (pid "
                                f"{step.pending['pid']}, waiting for the device to be let go)")
                break
            start = self.ctx.clock()
            try:
                action.revert(self.ctx, step.old)
            except KernelTimeout as err:
                self._keep_pending(writer, step.index, err)
                failures.append(f"undo {action.describe()}: {_reason(err)}")
                break
            except Exception as err:  # a bug in one action must not leave the host half-switched
                log.error("VM %s: reverting '%s' failed: %s", state.vm, action.describe(), _reason(err))
                failures.append(f"undo {action.describe()}: {_reason(err)}")
                continue
            writer.reverted(step.index)
            seconds = self.ctx.clock() - start
            log.info("VM %s: reverted %s (%.1f ms)", state.vm, action.describe(), seconds * 1000)
            report.steps.append(StepTiming(f"undo {action.describe()}", seconds))
            report.reverted += 1
        return failures


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename:
        return f"{err.filename}: {err.strerror}"
    return str(err)


