"""The single seam through which janus-hooks changes the kernel (sysfs writes, module (un)loading) and asks
it what no file shows (whether two descriptors are one open file: ``kcmp``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

from janus_hooks.errors import CommandFailed, CommandStuck, KernelError, KernelTimeout
from janus_hooks.host.runner import Runner, SubprocessRunner, check

log = logging.getLogger(__name__)


class Kernel(Protocol):
    def write(self, path: Path, value: str) -> None: ...

    def load_module(self, name: str) -> None: ...

    def unload_module(self, name: str) -> None: ...

    def same_open_file(self, pid_a: int, fd_a: int, pid_b: int, fd_b: int) -> bool: ...

    def use_timeouts(self, driver: float, hugepages: float, module: float) -> None:
        """Deadlines (seconds) of writes that can block and of module operations, from the config."""
        ...


# sysfs files whose store() can wait on the device or on memory: written from a child with a deadline.
BLOCKING_FILES = frozenset({"unbind", "bind", "drivers_probe", "nr_hugepages", "compact_memory"})
HUGEPAGE_FILES = frozenset({"nr_hugepages", "compact_memory"})


class RealKernel:
    """Writes sysfs files for real and runs modprobe; every error names the path or module, every write that
    can block has a deadline (``use_timeouts``: the config's driver, hugepages and module seconds)."""

    def __init__(self, runner: Runner | None = None, module_timeout: float = 30.0, driver_timeout: float = 10.0,
                 hugepage_timeout: float = 30.0) -> None:
        self._runner = runner or SubprocessRunner()
        self._module_timeout = module_timeout
        self._driver_timeout = driver_timeout
        self._hugepage_timeout = hugepage_timeout

    def use_timeouts(self, driver: float, hugepages: float, module: float) -> None:
        """Deadlines (seconds) of writes that can block and of module operations, from the config."""
        self._driver_timeout, self._hugepage_timeout, self._module_timeout = driver, hugepages, module

    def write(self, path: Path, value: str) -> None:
        log.debug("write %r > %s", value, path)
        name = os.path.basename(path)
        if name in BLOCKING_FILES:
            from janus_hooks.host.blocking import write_with_deadline

            timeout = self._hugepage_timeout if name in HUGEPAGE_FILES else self._driver_timeout
            write_with_deadline(Path(path), value, timeout)
            return
        try:
            fd = os.open(path, os.O_WRONLY)
        except OSError as err:
            raise KernelError(f"cannot open {path}: {err.strerror}", err.errno) from err
        try:
            # One write call: sysfs takes the whole value in one store() or rejects it.
            os.write(fd, value.encode())
        except OSError as err:
            raise KernelError(f"writing {value.strip()!r} to {path} failed: {err.strerror}", err.errno) from err
        finally:
            os.close(fd)

    def load_module(self, name: str) -> None:
        self._modprobe(["modprobe", name], f"loading module {name}")

    def unload_module(self, name: str) -> None:
        self._modprobe(["modprobe", "-r", name], f"unloading module {name}")

    def same_open_file(self, pid_a: int, fd_a: int, pid_b: int, fd_b: int) -> bool:
        """kcmp(KCMP_FILE): True when both descriptors are one open file (a vanished process: False)."""
        return kcmp_file(pid_a, fd_a, pid_b, fd_b)

    def _modprobe(self, argv: list[str], what: str) -> None:
        try:
            check(self._runner.run(argv, self._module_timeout))
        except CommandStuck as err:
            raise KernelTimeout(f"{what} did not finish: {err}", err.pid) from err
        except CommandFailed as err:
            raise KernelError(f"{what} failed: {err}") from err


# kcmp(2) has no libc wrapper; its number per architecture (asm/unistd_64.h, asm-generic/unistd.h).
_SYS_KCMP = {"x86_64": 312, "aarch64": 272, "riscv64": 272, "ppc64le": 354, "s390x": 343}
_KCMP_FILE = 0


def kcmp_file(pid_a: int, fd_a: int, pid_b: int, fd_b: int) -> bool:
    """The real syscall through ctypes (imported only here: planning a start needs it, the hook's fast
    path does not)."""
    import ctypes

    number = _SYS_KCMP.get(os.uname().machine)
    if number is None:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.syscall(number, pid_a, pid_b, _KCMP_FILE, fd_a, fd_b)
    if result < 0:
        log.debug("kcmp %d:%d %d:%d failed: %s", pid_a, fd_a, pid_b, fd_b, os.strerror(ctypes.get_errno()))
        return False
    return result == 0
