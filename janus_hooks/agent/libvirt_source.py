"""libvirt lifecycle events: one connection, libvirt's default event loop in a thread of its own.

libvirt's default event implementation runs in one dedicated thread (measured idle: no wakeups beyond
libvirtd's own keepalive ping every 5 s); events reach the agent's loop through ``post``, which is
thread-safe. A second thread owns the connection: it connects, registers, lists the running VMs, then
sleeps until the close callback says libvirtd went away (EOF arrives at once) and reconnects with a
back-off. No client keepalive: on a local socket the close callback is enough.

Calls into libvirt (``is_active``) block, so the agent makes them off its loop, never while it holds the
host-wide lock: a hook may hold that lock while libvirtd waits on the hook.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

from janus_hooks.agent.events import LibvirtConnected, LibvirtLost, VmLifecycle

log = logging.getLogger(__name__)

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
# libvirt's VIR_DOMAIN_EVENT_* lifecycle values -> (name, QEMU still there)
LIFECYCLE = {0: ("defined", False), 1: ("undefined", False), 2: ("started", True), 3: ("suspended", True),
             4: ("resumed", True), 5: ("stopped", False), 6: ("shutdown", True), 7: ("pmsuspended", True),
             8: ("crashed", True)}
ACTIVE_ONLY = 1  # VIR_CONNECT_LIST_DOMAINS_ACTIVE


@functools.cache
def _event_thread() -> threading.Thread:
    """libvirt's default event loop, registered once per process, run by one daemon thread."""
    import libvirt

    libvirt.virEventRegisterDefaultImpl()

    def run() -> None:
        while True:
            if libvirt.virEventRunDefaultImpl() < 0:
                log.error("libvirt's event loop failed; lifecycle events stop")
                return

    thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
    thread.start()
    return thread


class LibvirtSource:
    """Posts LibvirtConnected, VmLifecycle and LibvirtLost; answers ``is_active`` while connected."""

    def __init__(self, uri: str, post: Callable[[object], None],
                 backoff: tuple[float, float] = (BACKOFF_FIRST, BACKOFF_MAX)) -> None:
        self.uri = uri
        self.post = post
        self.backoff = backoff
        self._conn: Any = None
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reason = "closed"
        self._said_down = False  # LibvirtLost posted since the last LibvirtConnected

    def start(self) -> None:
        import libvirt

        # libvirt prints every error on stderr by itself; the agent logs what matters, once.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        _event_thread()
        self._thread = threading.Thread(target=self._run, name="libvirt-connection", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._lost.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def is_active(self, vm: str) -> bool | None:
        """Whether libvirt runs ``vm`` (a start in progress counts); None when libvirt cannot say."""
        import libvirt

        conn = self._conn
        if conn is None:
            return None
        try:
            return bool(conn.lookupByName(vm).isActive())
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            log.warning("libvirt at %s: cannot tell whether VM %s runs: %s", self.uri, vm, err)
            return None

    # --- the connection thread -------------------------------------------------------------------------
    def _run(self) -> None:
        delay, failures = self.backoff[0], 0
        while not self._stop.is_set():
            try:
                self._connect()
            except Exception as err:  # noqa: BLE001 - any failure to connect means: try again later
                failures += 1
                if failures == 1:
                    log.warning("libvirt at %s: cannot connect (%s); retrying with back-off up to %g s",
                                self.uri, _first_line(err), self.backoff[1])
                    if not self._said_down:
                        self._said_down = True
                        self.post(LibvirtLost(self.uri, f"cannot connect: {_first_line(err)}"))
                self._stop.wait(delay)
                delay = min(delay * 2, self.backoff[1])
                continue
            delay, failures = self.backoff[0], 0
            self._lost.wait()
            self._disconnect()

    def _connect(self) -> None:
        import libvirt

        self._lost.clear()
        conn = libvirt.open(self.uri)
        try:
            conn.registerCloseCallback(self._closed, None)
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None)
            active = frozenset(d.name() for d in conn.listAllDomains(ACTIVE_ONLY))
        except libvirt.libvirtError:
            conn.close()
            raise
        self._conn = conn
        self._said_down = False
        log.info("libvirt at %s: connected; %d VM(s) running", self.uri, len(active))
        self.post(LibvirtConnected(self.uri, active))

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.close()
        except Exception:  # noqa: BLE001,S110 - the daemon is gone; nothing to tell it
            pass
        if not self._stop.is_set():
            self._said_down = True
            self.post(LibvirtLost(self.uri, self._reason))

    def _closed(self, _conn: Any, reason: int, _opaque: Any) -> None:
        # VIR_CONNECT_CLOSE_REASON_*: 0 error, 1 EOF, 2 keepalive, 3 client
        self._reason = {0: "error", 1: "EOF", 2: "keepalive timeout", 3: "closed"}.get(reason, str(reason))
        self._lost.set()

    def _lifecycle(self, _conn: Any, dom: Any, event: int, _detail: int, _opaque: Any) -> None:
        name, running = LIFECYCLE.get(event, (f"event {event}", True))
        self.post(VmLifecycle(dom.name(), name, running))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
