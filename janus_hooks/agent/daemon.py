"""The agent: every source feeds one queue; one asyncio loop decides; rollbacks run off the loop.

What it keeps consistent: a VM whose journal is open while its QEMU is gone gets rolled back, whether
libvirt said so (a STOPPED event, a resync after reconnecting) or libvirtd itself is gone and the VM's
QEMU died (its pidfd). What it only reports: a running VM whose devices are not where its journal says,
a host driver binding a device a running VM holds, a GPU leaving the bus. What it shows: the last failed
start of a VM, as a desktop notification once a graphical session is back on seat0.

Rules it keeps: it never calls libvirt while holding the host-wide lock (a hook may hold it while libvirtd
waits on that hook); it takes the lock without waiting, so a journal a running hook is writing is never
touched (it looks again later); it only rolls back the very journal it found unused (``begun``), never a
newer one a start wrote meanwhile; it gives libvirt's own ``release end`` a grace period first.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from janus_hooks.agent.desktop import DesktopNotifier
from janus_hooks.agent.events import (
    DeviceEvent,
    FilesChanged,
    LibvirtConnected,
    LibvirtLost,
    QemuExited,
    Recheck,
    VmLifecycle,
)
from janus_hooks.agent.file_watch import FileWatch
from janus_hooks.agent.hotplug import claim_reserved, reserved_slot
from janus_hooks.agent.qemu_watch import QemuWatch
from janus_hooks.agent.sdnotify import SdNotify
from janus_hooks.config import Config, config_path, load_config, load_profile
from janus_hooks.device_notes import DeviceNote, DeviceNotes
from janus_hooks.errors import JanusError, LockBusy
from janus_hooks.failures import FailureStore, StartFailure
from janus_hooks.files import ensure_private_dir
from janus_hooks.host import Host
from janus_hooks.journal import JournalStore
from janus_hooks.layout import vm_from_filename

if TYPE_CHECKING:  # the engine is loaded by the first rollback, not by an idle agent
    from janus_hooks.runtime import Janus

log = logging.getLogger(__name__)

VFIO = "vfio-pci"


@dataclass(frozen=True)
class AgentOptions:
    uri: str = "qemu:///system"
    libvirt: bool = True  # follow libvirt (off: QEMU processes only)
    udev: str | None = "auto"  # pyudev source: "udev", "kernel", "auto" (udev when udevd runs), None: off
    release_grace: float = 5.0  # after libvirt reports a VM stopped, its own ``release end`` goes first
    retry_max: float = 60.0  # the longest wait before looking again at a journal a hook holds locked
    debounce: float = 0.2  # a burst of file events (an editor's save, a journal's appends) is read once
    notify_max_age: float = 24 * 3600.0  # older failures are not shown any more


class Agent:
    def __init__(self, host: Host, options: AgentOptions, make_janus: Callable[[Config], Janus],
                 notifier: DesktopNotifier | None = None, sd: SdNotify | None = None,
                 make_libvirt: Callable[..., Any] | None = None, make_udev: Callable[..., Any] | None = None) -> None:
        self.host = host
        self.options = options
        self.make_janus = make_janus
        self.notifier = notifier
        self.sd = sd or SdNotify()
        self.store = JournalStore(host.state_dir())
        self.failures = FailureStore(host.state_dir())
        self.notes = DeviceNotes(host.state_dir())
        self.config = Config()
        self._make_libvirt = make_libvirt
        self._make_udev = make_udev
        self.libvirt: Any = None
        self.libvirt_up = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self._unhandled = 0  # events put on the queue and not handled yet (one taken off is still unhandled)
        self.qemu: QemuWatch | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._retry: dict[str, float] = {}
        self._debounced: dict[str, asyncio.TimerHandle] = {}
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="janus-agent-work")
        self._pending: set[asyncio.Future[Any]] = set()
        self.ready = asyncio.Event()
        self.rollbacks: list[str] = []  # VMs rolled back, in order (status line, tests)

    # --- plumbing ----------------------------------------------------------------------------------------
    def post(self, event: object) -> None:
        """Put an event on the queue; safe from any thread."""
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._put, event)

    def _put(self, event: object) -> None:
        self._unhandled += 1
        self.queue.put_nowait(event)

    async def run(self, stopping: asyncio.Event | None = None) -> None:
        """Run until ``stopping`` is set (or SIGTERM/SIGINT when it is None)."""
        self.loop = asyncio.get_running_loop()
        if stopping is None:
            stopping = asyncio.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.loop.add_signal_handler(sig, stopping.set)
        sources = self._start_sources()
        self.sd.ready(f"following {', '.join(sources)}")
        log.info("agent: ready; following %s", ", ".join(sources))
        self.ready.set()
        if self.sd.watchdog_interval:
            self._ping()
        stop = asyncio.ensure_future(stopping.wait())
        try:
            while True:
                get = asyncio.ensure_future(self.queue.get())
                done, _ = await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    break
                try:
                    self._handle(get.result())
                except Exception:  # one bad event must not end the agent
                    log.exception("agent: handling %r failed", get.result())
                finally:
                    self._unhandled -= 1
        finally:
            log.info("agent: stopping")
            self.sd.stopping()
            self._stop_sources()
            # A rollback in progress finishes (every step of it is bounded): half a rollback is worse.
            await self.loop.run_in_executor(None, self._worker.shutdown, True)

    def _start_sources(self) -> list[str]:
        assert self.loop is not None
        self.store.prepare()
        ensure_private_dir(self.failures.dir)
        self.reload_config()
        self.qemu = QemuWatch(self.loop, self.host, self.post)
        self.files = FileWatch(self.post)
        followed = []
        if self.files.add("config", self.host.config_dir(), recursive=True):
            followed.append(f"config {self.host.config_dir()}")
        self.files.add("journal", self.store.dir)
        self.files.add("failures", self.failures.dir)
        if self.files.add("sessions", self.host.sessions_dir()):
            followed.append("logind sessions")
        self.files.start()
        followed.append("journals")
        if self.options.udev:
            from janus_hooks.agent.udev_source import UdevSource, choose_source

            source = choose_source(self.host) if self.options.udev == "auto" else self.options.udev
            self.udev = (self._make_udev or UdevSource)(self.loop, self.post, source)
            try:
                self.udev.start()
                followed.append(f"{source} device events")
            except Exception as err:  # noqa: BLE001 - the agent still keeps VMs consistent without it
                log.error("devices: cannot follow device events (%s source): %s", source, err)
                self.udev = None
        if self.options.libvirt:
            from janus_hooks.agent.libvirt_source import LibvirtSource

            self.libvirt = (self._make_libvirt or LibvirtSource)(self.options.uri, self.post)
            self.libvirt.start()
            followed.append(f"libvirt {self.options.uri}")
        else:
            self.post(LibvirtLost("(none)", "not followed"))
        self.post(FilesChanged("failures"))  # a failure recorded while the agent was down
        return followed

    def _stop_sources(self) -> None:
        for timer in [*self._timers.values(), *self._debounced.values()]:
            timer.cancel()
        if self.libvirt is not None:
            self.libvirt.stop()
        if getattr(self, "udev", None) is not None:
            self.udev.stop()
        self.files.stop()
        if self.qemu is not None:
            self.qemu.close()

    def _ping(self) -> None:
        assert self.loop is not None and self.sd.watchdog_interval
        self.sd.watchdog()  # from the loop itself: a stuck loop stops the pings and systemd restarts us
        self.loop.call_later(self.sd.watchdog_interval, self._ping)

    def _later(self, vm: str, delay: float, why: str) -> None:
        assert self.loop is not None
        old = self._timers.pop(vm, None)
        if old is not None:
            old.cancel()
        self._timers[vm] = self.loop.call_later(delay, self._put, Recheck(vm, why))

    def _off_loop(self, fn: Callable[[], Any], then: Callable[[Any], None]) -> None:
        """Run ``fn`` on the worker thread (one at a time) and ``then(result)`` back on the loop."""
        assert self.loop is not None
        future = asyncio.wrap_future(self._worker.submit(fn), loop=self.loop)
        self._pending.add(future)

        def finished(f: asyncio.Future[Any]) -> None:
            self._pending.discard(f)
            if f.cancelled():
                return
            if f.exception() is not None:
                log.error("agent: %s", f.exception())
                return
            then(f.result())

        future.add_done_callback(finished)

    async def idle(self, timeout: float = 30.0) -> None:
        """Wait until the queue is empty and no work runs (tests)."""
        deadline = time.monotonic() + timeout
        while self._unhandled or self._pending or self._debounced:
            if time.monotonic() > deadline:
                raise TimeoutError("the agent did not become idle")
            await asyncio.sleep(0.01)

    # --- events --------------------------------------------------------------------------------------------
    def _handle(self, event: object) -> None:
        if isinstance(event, FilesChanged):
            self._files_changed(event.kind)
        elif isinstance(event, LibvirtConnected):
            self._libvirt_connected(event)
        elif isinstance(event, LibvirtLost):
            self._libvirt_lost(event)
        elif isinstance(event, VmLifecycle):
            self._lifecycle(event)
        elif isinstance(event, QemuExited):
            self._qemu_exited(event)
        elif isinstance(event, Recheck):
            self._timers.pop(event.vm, None)
            self._check(event.vm, event.why)
        elif isinstance(event, DeviceEvent):
            self._device(event)
        else:
            log.warning("agent: unknown event %r", event)

    def _files_changed(self, kind: str) -> None:
        assert self.loop is not None
        if kind in self._debounced:
            return

        def fire() -> None:
            self._debounced.pop(kind, None)
            if kind == "config":
                self.reload_config()
            elif kind == "journal":
                self._follow_journals()
            else:
                self._off_loop(self._notify_failures, lambda _r: None)

        self._debounced[kind] = self.loop.call_later(self.options.debounce, fire)

    def _libvirt_connected(self, event: LibvirtConnected) -> None:
        self.libvirt_up = True
        log.info("libvirt at %s: connected, reconciling %d open journal(s)", event.uri, len(self.store.vms()))
        for vm in self.store.vms():
            if vm in event.active:
                log.info("VM %s: runs (journal open); left alone", vm)
                self._watch(vm)
                self._off_loop(lambda vm=vm: self._stray_devices(vm), self._report_stray)
            else:
                # libvirtd may be running this VM's release end right now (it died while libvirtd was away).
                self._later(vm, self.options.release_grace, "not running after libvirt reconnected")

    def _libvirt_lost(self, event: LibvirtLost) -> None:
        was_up, self.libvirt_up = self.libvirt_up, False
        if was_up:
            log.warning("libvirt at %s: connection lost (%s); following QEMU processes directly", event.uri,
                        event.reason)
        else:
            log.info("libvirt at %s: not connected (%s); following QEMU processes directly", event.uri,
                     event.reason)
        for vm in self.store.vms():
            if self._watch(vm) is None:
                self._later(vm, 0, "no QEMU while libvirt is away")

    def _lifecycle(self, event: VmLifecycle) -> None:
        has_journal = self.store.exists(event.vm)
        log.info("libvirt: VM %s %s%s", event.vm, event.event, " (journal open)" if has_journal else "")
        if event.event == "started":
            # The VM runs now: its last failed start is no longer why it does not (the hook's started phase
            # clears it too; this covers a VM that is not managed any more).
            self._off_loop(lambda: self.failures.clear(event.vm, event.at), self._failure_cleared)
        if not has_journal:
            return
        if event.running:
            self._watch(event.vm)
            if event.event == "started":
                self._off_loop(lambda: self._stray_devices(event.vm), self._report_stray)
        else:
            self._later(event.vm, self.options.release_grace, f"libvirt reported it {event.event}")

    def _qemu_exited(self, event: QemuExited) -> None:
        has_journal = self.store.exists(event.vm)
        log.info("VM %s: QEMU pid %d exited%s", event.vm, event.pid, " (journal open)" if has_journal else "")
        if has_journal:
            delay = self.options.release_grace if self.libvirt_up else 0.0
            self._later(event.vm, delay, "its QEMU exited" + ("" if self.libvirt_up else " while libvirt is away"))

    def _watch(self, vm: str) -> int | None:
        assert self.qemu is not None
        return self.qemu.watch(vm)

    def _follow_journals(self) -> None:
        """Journals came or went: follow the QEMU of each open one; forget the closed ones."""
        assert self.qemu is not None
        open_vms = set(self.store.vms())
        for vm in set(self.qemu.watching()) - open_vms:
            self.qemu.forget(vm)
            log.info("VM %s: journal closed", vm)
        for vm in open_vms - set(self.qemu.watching()):
            self._watch(vm)  # no QEMU yet during a start: the STARTED event follows it

    # --- the decision, off the loop ----------------------------------------------------------------------
    def _check(self, vm: str, why: str) -> None:
        self._off_loop(lambda: self._roll_back_if_stopped(vm), lambda outcome: self._checked(vm, why, outcome))

    def _roll_back_if_stopped(self, vm: str) -> tuple[str, str]:
        """(outcome, detail) with outcome in gone, running, busy, rolled-back, failed. Runs on the worker."""
        try:
            state = self.store.read(vm)
        except JanusError as err:
            return "failed", str(err)
        if state is None:
            return "gone", "journal already closed"
        pid = self.host.vm_process(vm)
        if pid is not None:
            return "running", f"QEMU pid {pid} runs"
        # Asked before the lock is taken, never under it: libvirtd may be waiting on a hook that holds it.
        if self.libvirt is not None and self.libvirt_up and self.libvirt.is_active(vm):
            return "running", "libvirt runs it (a start in progress)"
        try:
            report = self.make_janus(self.config).release(vm, lock_timeout=0, begun=state.started)
        except LockBusy:
            return "busy", "a hook holds the host-wide lock"
        except JanusError as err:
            return "failed", str(err)
        if self.store.exists(vm) and not report.reverted:
            return "running", "a newer start owns the journal"
        gone = f", {report.skipped_after_reboot} gone with a reboot" if report.skipped_after_reboot else ""
        return "rolled-back", f"{report.reverted} change(s) reverted{gone}"

    def _checked(self, vm: str, why: str, outcome: tuple[str, str]) -> None:
        kind, detail = outcome
        if kind == "rolled-back":
            self._retry.pop(vm, None)
            self.rollbacks.append(vm)
            log.warning("VM %s: rolled back (%s): %s", vm, why, detail)
        elif kind == "busy":
            delay = min(self._retry.get(vm, self.options.release_grace or 1.0) * 2, self.options.retry_max)
            self._retry[vm] = delay
            log.info("VM %s: %s; looking again in %g s", vm, detail, delay)
            self._later(vm, delay, why)
        elif kind == "failed":
            self._retry.pop(vm, None)
            log.error("VM %s: rollback failed: %s; run 'janus-hooks rollback %s'", vm, detail, vm)
        else:
            self._retry.pop(vm, None)
            log.info("VM %s: nothing to roll back (%s)", vm, detail)
            if kind == "running":
                self._watch(vm)

    # --- devices -------------------------------------------------------------------------------------------
    def _stray_devices(self, vm: str) -> list[tuple[str, str, str | None]]:
        """Devices of a running VM's complete journal that are not on vfio-pci: (vm, address, driver)."""
        state = self.store.read(vm)
        if state is None or not state.complete:
            return []
        return [(vm, a, d) for a in state.devices if (d := self.host.pci_driver(a)) != VFIO]

    def _report_stray(self, stray: list[tuple[str, str, str | None]]) -> None:
        for vm, address, driver in stray:
            log.error("VM %s runs but its device %s is on %s, not %s as its journal says", vm, address,
                      driver or "no driver", VFIO)

    def _device(self, event: DeviceEvent) -> None:
        try:
            claims = self.store.claims()
        except JanusError as err:
            log.warning("devices: cannot read the journals: %s", err)
            claims = {}
        holder = claims.get(event.name) if event.subsystem == "pci" else None
        if event.subsystem == "drm":
            log.info("devices: DRM %s %s on %s", event.name, event.action, event.parent or "?")
            return
        if event.action == "bind" and holder and event.driver != VFIO:
            running = self.host.vm_process(holder)
            if running is not None:
                log.error("devices: host driver %s bound %s while VM %s (QEMU pid %d) holds it",
                          event.driver, event.name, holder, running)
                return
        is_gpu = bool(event.pci_class) and event.pci_class.zfill(6).startswith("03")
        what = "GPU" if is_gpu else "PCI device"
        if event.action == "remove" and holder:
            log.error("devices: %s, held by VM %s, left the bus", event.name, holder)
            self._note(DeviceNote(time.time(), event.name, "removed", f"{what} held by VM {holder}: gone from the "
                                  "PCI bus while its journal is open", holder))
            return
        if event.action == "add" and not holder:
            self._off_loop(lambda: self._added(event.name, is_gpu), lambda _r: None)
            return
        driver = f" ({event.driver})" if event.driver else ""
        log.info("devices: %s %s %s%s%s", what, event.name, event.action, driver,
                 f", held by VM {holder}" if holder else "")
        if event.action == "remove" and is_gpu:
            self._note(DeviceNote(time.time(), event.name, "removed", "GPU left the PCI bus"))

    def _added(self, address: str, is_gpu: bool) -> None:
        """A PCI function appeared: a reserved GPU's goes to vfio-pci; a GPU is noted. Worker thread."""
        slot = reserved_slot(self.host, address)
        if slot is None:
            log.info("devices: %s %s add", "GPU" if is_gpu else "PCI device", address)
            if is_gpu:
                self.notes.add(DeviceNote(time.time(), address, "added", "GPU (not reserved for VMs)"))
            return
        try:
            done = claim_reserved(self.host, address, self.config.timeouts.driver)
        except JanusError as err:
            log.error("devices: reserved GPU %s: %s", slot, err)
            self.notes.add(DeviceNote(time.time(), address, "added", f"reserved for VMs, NOT on vfio-pci: {err}"))
            return
        log.info("devices: %s added, a function of GPU %s reserved for VMs: %s", address, slot, done)
        self.notes.add(DeviceNote(time.time(), address, "added", f"reserved for VMs: {done}"))

    def _note(self, note: DeviceNote) -> None:
        self._off_loop(lambda: self.notes.add(note), lambda _r: None)

    # --- config and failures -------------------------------------------------------------------------------
    def reload_config(self) -> bool:
        """Read janus.toml and check every profile; an invalid janus.toml leaves the last good config in force.

        Each invalid file is logged on its own (file, key, reason): the hook will refuse what the agent names.
        """
        config_dir = self.host.config_dir()
        good = True
        try:
            config = load_config(config_dir)
        except JanusError as err:
            log.error("config: %s; the last good config stays in force", err)
            config, good = self.config, False
        vms_dir = config_dir / "vms"
        for path in sorted(vms_dir.glob("*.toml")) if vms_dir.is_dir() else []:
            try:
                load_profile(config_dir, vm_from_filename(path.stem))
            except JanusError as err:
                log.error("config: %s; starting that VM will be refused until it is fixed", err)
        if good:
            log.info("config: %s %s", config_path(config_dir), "read" if config != self.config else "unchanged")
        self.config = config
        logging.getLogger("janus_hooks").setLevel(config.log_level.upper())
        return good

    def _failure_cleared(self, cleared: StartFailure | None) -> None:
        if cleared is not None:
            log.info("VM %s: started; its failed start of %s is cleared", cleared.vm,
                     time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(cleared.time)))

    def _notify_failures(self) -> None:
        """Show each failed start nobody saw yet, once a graphical session is active on seat0. Worker thread."""
        if self.notifier is None:
            return
        pending = [f for f in self.failures.all().values() if not f.notified]
        if not pending:
            return
        session = self.notifier.seat0_session()
        if session is None:
            log.info("desktop: %d failed start(s) to show once a graphical session is active on seat0", len(pending))
            return
        now = time.time()
        for failure in pending:
            if now - failure.time > self.options.notify_max_age:
                self.failures.mark_notified(failure)
                continue
            try:
                self.notifier.notify(session, failure)
            except JanusError as err:
                log.warning("desktop: VM %s: could not show why its start failed: %s", failure.vm, err)
                continue
            self.failures.mark_notified(failure)
