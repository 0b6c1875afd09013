"""The single seam through which janus-hooks changes the kernel: sysfs writes and module (un)loading."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

from janus_hooks.errors import CommandFailed, KernelError
from janus_hooks.host.runner import Runner, SubprocessRunner, check

log = logging.getLogger(__name__)


class Kernel(Protocol):
    def write(self, path: Path, value: str) -> None: ...

    def load_module(self, name: str) -> None: ...

    def unload_module(self, name: str) -> None: ...


class RealKernel:
    """Writes sysfs files for real and runs modprobe; every error names the path or module."""

    def __init__(self, runner: Runner | None = None, module_timeout: float = 30.0) -> None:
        self._runner = runner or SubprocessRunner()
        self._module_timeout = module_timeout

    def write(self, path: Path, value: str) -> None:
        log.debug("write %r > %s", value, path)
        try:
            fd = os.open(path, os.O_WRONLY)
        except OSError as err:
            raise KernelError(f"cannot open {path}: {err.strerror}") from err
        try:
            # One write call: sysfs takes the whole value in one store() or rejects it.
            os.write(fd, value.encode())
        except OSError as err:
            raise KernelError(f"writing {value.strip()!r} to {path} failed: {err.strerror}") from err
        finally:
            os.close(fd)

    def load_module(self, name: str) -> None:
        self._modprobe(["modprobe", name], f"loading module {name}")

    def unload_module(self, name: str) -> None:
        self._modprobe(["modprobe", "-r", name], f"unloading module {name}")

    def _modprobe(self, argv: list[str], what: str) -> None:
        try:
            check(self._runner.run(argv, self._module_timeout))
        except CommandFailed as err:
            raise KernelError(f"{what} failed: {err}") from err
