"""The one way janus-hooks runs a program: an argv list, no shell, closed stdin, captured output, a timeout."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from janus_hooks.errors import CommandFailed

log = logging.getLogger(__name__)

# libvirt runs hooks with only these; children get the same so they behave the same under a shell and a hook.
_CLEAN_ENV_KEYS = ("PATH", "HOME", "LC_ALL")
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def reason(self) -> str:
        """The last line the program printed, for a one-line error message."""
        text = (self.stderr or self.stdout).strip().splitlines()
        return text[-1] if text else f"exit status {self.returncode}"


class Runner(Protocol):
    def run(self, argv: Sequence[str], timeout: float) -> Result: ...


class SubprocessRunner:
    """Runs argv lists; never a shell, never inherits the hook's stdio (libvirt waits for it to close)."""

    def run(self, argv: Sequence[str], timeout: float) -> Result:
        env = {k: os.environ[k] for k in _CLEAN_ENV_KEYS if k in os.environ}
        env.setdefault("PATH", _DEFAULT_PATH)
        env["LC_ALL"] = "C"
        try:
            proc = subprocess.Popen(  # noqa: S603 - argv list, no shell
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                close_fds=True,
                # Its own process group, so a timeout also ends anything it forked that holds our pipes.
                start_new_session=True,
            )
        except OSError as err:
            raise CommandFailed(f"cannot run {argv[0]}: {err.strerror}") from err
        try:
            out, err_text = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as err:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise CommandFailed(f"{' '.join(argv)} did not finish within {timeout:g} s") from err
        log.debug("ran %s -> %s", argv, proc.returncode)
        return Result(tuple(argv), proc.returncode, out, err_text)


def check(result: Result) -> Result:
    """Raise CommandFailed naming the command when it exited non-zero."""
    if result.returncode != 0:
        raise CommandFailed(f"{' '.join(result.argv)} failed: {result.reason()}")
    return result
