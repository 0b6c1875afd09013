"""Plays the kernel's part on a fake host tree for a janus-hooks hook that libvirt runs as a separate process.

In process, tests hand janus-hooks a ``FakeKernel``; a hook started by libvirtd writes the tree's files with
the real ``Kernel`` instead, as it would write sysfs. This animator watches those files with inotify
(``IN_CLOSE_WRITE``, one queue, so writes are handled in the order they happened) and hands each write to
``FakeKernel.write``, which moves driver links, probes, and so on, the way the real kernel would. The hook
verifies every change with a bounded wait on the tree, so the moment the animator catches up does not matter.

Watched: ``driver_override``, ``drivers_probe`` and the PCI drivers' ``bind``/``unbind`` files — what a
passthrough switch writes. Unlike sysfs, a regular file keeps bytes beyond a shorter write; the animator
takes the first line as the value and puts the file back in the kernel's form after each write.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct
import threading
from pathlib import Path

from tests.fake.kernel import FakeKernel

IN_CLOSE_WRITE = 0x00000008
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")


class KernelAnimator:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.kernel = FakeKernel(self.root)
        self.handled: list[tuple[str, str]] = []  # (path below root, value), in order
        self.errors: list[str] = []
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._fd = -1
        self._watches: dict[int, Path] = {}
        self._canonical: dict[Path, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _targets(self) -> list[Path]:
        pci = self.root / "sys/bus/pci"
        files = [pci / "drivers_probe"]
        files += sorted(pci.glob("devices/*/driver_override"))
        files += sorted(p for p in pci.glob("drivers/*/*") if p.name in ("bind", "unbind"))
        return files

    def start(self) -> KernelAnimator:
        self._fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        for path in self._targets():
            wd = self._libc.inotify_add_watch(self._fd, os.fsencode(path), IN_CLOSE_WRITE)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
            self._watches[wd] = path
            self._canonical[path] = path.read_text()
        self._thread = threading.Thread(target=self._loop, name="kernel-animator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> KernelAnimator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.1)
            if not ready:
                continue
            data = os.read(self._fd, 64 * 1024)
            offset = 0
            while offset < len(data):
                wd, _mask, _cookie, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size + length
                path = self._watches.get(wd)
                if path is not None:
                    self._handle(path)

    def _handle(self, path: Path) -> None:
        content = path.read_text()
        if content == self._canonical[path]:
            return  # the animator's own rewrite, or a write that changed nothing
        value = content.split("\n", 1)[0].strip()
        rel = str(path.relative_to(self.root))
        self.handled.append((rel, value))
        try:
            # FakeKernel rewrites driver_override itself; the write-only files go back to empty.
            if path.name != "driver_override":
                path.write_text(self._canonical[path])
            self.kernel.write(path, value)
        except Exception as err:  # noqa: BLE001 - the hook sees the effect (or not); the test reads errors
            self.errors.append(f"{rel} <- {value!r}: {err}")
        self._canonical[path] = path.read_text()
