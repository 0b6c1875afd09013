"""Kernel writes that can block, done by a child process with a deadline.

Unbinding a driver waits for every open file of the device (snd_hda_intel sleeps in ``snd_card_free`` until
the last PCM is closed), probing and hugepage allocation can take long, and a task asleep in the kernel
ignores even SIGKILL. So the write is made by a child that keeps nothing of ours: no host-wide lock, no
libvirt stdout/stderr (libvirt waits for those to close), its own session. Past the deadline the parent gives
up on it and says so; the child finishes the write whenever the kernel lets it.

The child is ``dd`` (one read of everything, one write(), the file never created nor truncated), started
with vfork/exec: measured 1.7 ms a write against 4.1 ms for an ``os.fork`` of the hook's process, whose
page tables a fork copies (bench notes in the report of this change).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from janus_hooks.errors import KernelError, KernelTimeout

# The writer's command name (/proc/<pid>/comm): a later release recognises a write still pending by it.
WRITER_NAME = "dd"
_ENV = {"LC_ALL": "C", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


def write_with_deadline(path: Path, value: str, timeout: float) -> None:
    """Write ``value`` to ``path`` in one write() from a child; KernelError as the kernel answered, or
    KernelTimeout (carrying the child's pid) when it did not answer within ``timeout`` seconds."""
    data = value.encode()
    argv = ["dd", f"of={path}", "conv=nocreat,notrunc", f"bs={max(len(data), 1)}", "count=1",
            "iflag=fullblock", "status=none"]
    errors = os.memfd_create("janus-hooks-write", os.MFD_CLOEXEC)
    try:
        try:
            proc = subprocess.Popen(  # noqa: S603 - argv list, no shell
                argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors, env=_ENV,
                close_fds=True, start_new_session=True,
            )
        except OSError as err:
            raise KernelError(f"cannot run dd to write {path}: {err.strerror}", err.errno) from err
        # A pipe holds 64 KiB: a sysfs value never fills it, so this write cannot block.
        assert proc.stdin is not None
        try:
            proc.stdin.write(data)
            proc.stdin.close()
        except BrokenPipeError:
            pass  # dd gave up before reading (it could not open the file): its status and message say why
        try:
            status = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise KernelTimeout(
                f"writing {value.strip()!r} to {path} did not finish within {timeout:g} s (the kernel waits, "
                f"most likely for a process that holds the device; the write completes when it lets go: "
                f"pid {proc.pid})",
                proc.pid,
            ) from None
        if status == 0:
            return
        os.lseek(errors, 0, os.SEEK_SET)
        message = os.read(errors, 4096).decode(errors="replace").strip().splitlines()
    finally:
        os.close(errors)
    line = message[-1] if message else f"dd exit status {status}"
    reason = line.rsplit(": ", 1)[-1]
    errno = _errno_of(reason)
    if "failed to open" in line:
        raise KernelError(f"cannot open {path}: {reason}", errno)
    raise KernelError(f"writing {value.strip()!r} to {path} failed: {reason}", errno)


def _errno_of(strerror: str) -> int | None:
    """The errno whose C-locale text dd printed (dd reports the kernel's answer only as text)."""
    return next((n for n in range(1, 134) if os.strerror(n) == strerror), None)
