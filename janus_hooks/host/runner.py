"""The one way janus-hooks runs a program: an argv list, no shell, closed stdin, captured output, a timeout."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple, Protocol

from janus_hooks.errors import CommandFailed, CommandStuck

log = logging.getLogger(__name__)

# libvirt runs hooks with only these; children get the same so they behave the same under a shell and a hook.
_CLEAN_ENV_KEYS = ("PATH", "HOME", "LC_ALL")
# Seconds a killed program may take to die before the runner stops waiting for it.
KILL_GRACE = 2.0
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Result(NamedTuple):
    """What a program did (a NamedTuple: created by every hook process, cheaper than a dataclass)."""

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
        # Output goes to anonymous in-memory files, not pipes: a start command whose daemon keeps its
        # stdout open (an init script, `sv up`) must not make us wait for an end of file that never comes.
        with _memfile("stdout") as out, _memfile("stderr") as err:
            try:
                proc = subprocess.Popen(  # noqa: S603 - argv list, no shell
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env=env,
                    close_fds=True,
                    # Its own session: a timeout ends the whole group, and no terminal signal reaches it.
                    start_new_session=True,
                )
            except OSError as error:
                raise CommandFailed(f"cannot run {argv[0]}: {error.strerror}") from error
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired as error:
                os.killpg(proc.pid, signal.SIGKILL)
                try:
                    # Bounded too: a program asleep in the kernel (modprobe -r on a held device) outlives SIGKILL.
                    proc.wait(timeout=KILL_GRACE)
                except subprocess.TimeoutExpired:
                    raise CommandStuck(f"{' '.join(argv)} did not finish within {timeout:g} s and does not die "
                                       f"(pid {proc.pid}, asleep in the kernel)", proc.pid) from error
                raise CommandFailed(f"{' '.join(argv)} did not finish within {timeout:g} s") from error
            log.debug("ran %s -> %s", argv, proc.returncode)
            return Result(tuple(argv), proc.returncode, _text(out), _text(err))


@contextmanager
def _memfile(name: str) -> Iterator[int]:
    fd = os.memfd_create(f"janus-hooks-{name}", os.MFD_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _text(fd: int, limit: int = 1 << 16) -> str:
    """What the program wrote (its last ``limit`` bytes: the end says why it failed)."""
    size = os.lseek(fd, 0, os.SEEK_END)
    os.lseek(fd, max(0, size - limit), os.SEEK_SET)
    return os.read(fd, limit).decode(errors="replace")


def check(result: Result) -> Result:
    """Raise CommandFailed naming the command when it exited non-zero."""
    if result.returncode != 0:
        raise CommandFailed(f"{' '.join(result.argv)} failed: {result.reason()}")
    return result
