"""Runs inside the hook process of the ``slowpath`` rows: the Kernel, Services and Runner seams answered by
the bench process, which plays them with tests/fake on the host tree.

Why in another process: the fakes import modules (json, the world's helpers) that janus-hooks might import
later on its own; loaded by a fake first, they would make janus' imports look cheaper than they are. Here
the hook process loads nothing but this file (os and time only, both already loaded by then), and every
call through a seam is timed on this side, round trip included, so that the bench can subtract exactly the
time the host's kernel and services took.

Protocol over two inherited pipes: one frame per message, ``<8 digits length><fields joined by \\x1f>``.
Request: ``seam method arg...``; reply ``ok [value...]`` or ``err ErrorClassName message``. At the end
``done <seconds in seams> <calls> <seconds importing this file>``.
"""

import os
import time

SEP = "\x1f"


class Link:
    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd, self.write_fd = read_fd, write_fd
        self.seconds = 0.0
        self.calls = 0

    def send(self, *fields: str) -> None:
        data = SEP.join(fields).encode()
        data = b"%08d" % len(data) + data
        while data:
            data = data[os.write(self.write_fd, data):]

    def _read(self, size: int) -> bytes:
        chunks = []
        while size:
            chunk = os.read(self.read_fd, size)
            if not chunk:
                raise EOFError("the bench process closed the seam pipe")
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def receive(self) -> list[str]:
        return self._read(int(self._read(8))).decode().split(SEP)

    def call(self, seam: str, method: str, *args: object) -> list[str]:
        start = time.perf_counter()
        try:
            # Paths and numbers go as text: str() of a Path does not touch the filesystem.
            self.send(seam, method, *(str(a) for a in args))
            reply = self.receive()
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1
        if reply[0] == "err":
            from janus_hooks import errors  # already loaded: the hook imported it before any seam call

            raise getattr(errors, reply[1], RuntimeError)(reply[2])
        return reply[1:]


class RemoteKernel:
    def __init__(self, link: Link) -> None:
        self._link = link

    def write(self, path, value: str) -> None:
        self._link.call("kernel", "write", path, value)

    def load_module(self, name: str) -> None:
        self._link.call("kernel", "load_module", name)

    def unload_module(self, name: str) -> None:
        self._link.call("kernel", "unload_module", name)


class RemoteServices:
    def __init__(self, link: Link) -> None:
        self._link = link

    def is_active(self, unit: str) -> bool:
        return self._link.call("services", "is_active", unit) == ["1"]

    def stop(self, unit: str, timeout: float) -> None:
        self._link.call("services", "stop", unit, timeout)

    def start(self, unit: str, timeout: float) -> None:
        self._link.call("services", "start", unit, timeout)

    def terminate_session(self, session_id: str, timeout: float) -> None:
        self._link.call("services", "terminate_session", session_id, timeout)


class RemoteRunner:
    def __init__(self, link: Link) -> None:
        self._link = link

    def run(self, argv, timeout: float):
        from janus_hooks.host.runner import Result  # already loaded by janus_hooks.host

        code, out, err = self._link.call("runner", "run", timeout, *argv)
        return Result(tuple(argv), int(code), out, err)


def run_hook(main, argv: list[str], root: str, read_fd: int, write_fd: int, import_seconds: float) -> int:
    """``main(argv, root=root)`` as the shim calls it, with the host's seams answered over the pipes.

    ``import_seconds``: what importing this file cost the hook process (the launcher times it); reported
    with the seams' time, since no installed hook pays it."""
    link = Link(read_fd, write_fd)

    def open_janus(root: str, restoring: bool = False):
        # What hook._open_real does, with the three collaborators the bench plays.
        from janus_hooks.host import Host
        from janus_hooks.runtime import Janus

        return Janus.open(Host(root, RemoteKernel(link)), services=RemoteServices(link),
                          runner=RemoteRunner(link), restoring=restoring)

    try:
        return main(argv, root=root, open_janus=open_janus)
    finally:
        link.send("done", repr(link.seconds), str(link.calls), repr(import_seconds))
