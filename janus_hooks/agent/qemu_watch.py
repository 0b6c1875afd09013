"""Knowing when a VM's QEMU dies without asking libvirt: a pidfd per QEMU on the event loop.

A pidfd becomes readable when its process exits; no timer, no polling. This is what lets the agent roll a
VM back when libvirtd itself is gone (killed, restarting) and nobody will call ``release end``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from janus_hooks.agent.events import QemuExited
from janus_hooks.host import Host

log = logging.getLogger(__name__)


class QemuWatch:
    def __init__(self, loop: asyncio.AbstractEventLoop, host: Host, post: Callable[[object], None]) -> None:
        self.loop = loop
        self.host = host
        self.post = post
        self._watched: dict[str, tuple[int, int]] = {}  # vm -> (pid, pidfd)

    def pid(self, vm: str) -> int | None:
        """The VM's QEMU pid if it runs (read from /proc below the host root)."""
        return self.host.vm_process(vm)

    def watch(self, vm: str) -> int | None:
        """Follow the VM's QEMU if it runs; returns its pid (None: no QEMU for that VM)."""
        if vm in self._watched:
            return self._watched[vm][0]
        pid = self.pid(vm)
        if pid is None:
            return None
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        except OSError as err:
            log.warning("VM %s: cannot follow QEMU pid %d: %s", vm, pid, err.strerror)
            return pid
        self._watched[vm] = (pid, fd)
        self.loop.add_reader(fd, self._exited, vm)
        log.info("VM %s: following QEMU pid %d", vm, pid)
        return pid

    def forget(self, vm: str) -> None:
        entry = self._watched.pop(vm, None)
        if entry is not None:
            self.loop.remove_reader(entry[1])
            os.close(entry[1])

    def watching(self) -> dict[str, int]:
        return {vm: pid for vm, (pid, _fd) in self._watched.items()}

    def close(self) -> None:
        for vm in list(self._watched):
            self.forget(vm)

    def _exited(self, vm: str) -> None:
        pid = self._watched[vm][0]
        self.forget(vm)
        self.post(QemuExited(vm, pid))
