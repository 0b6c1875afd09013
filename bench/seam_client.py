"""Runs inside the hook process of the ``slowpath`` rows: the Kernel, Services and Runner seams answered by
the bench process, which plays them with tests/fake on the host tree.

Why in another process: the fakes import modules (json, the world's helpers) that janus-hooks might import
later on its own; loaded by a fake first, they would make janus' imports look cheaper than they are. Here
the hook process loads nothing but this file (os and time only, both already loaded by then), and every
call through a seam is timed on this side, round trip included, so that the bench can subtract exactly the
time the host's kernel and services took.

Protocol over two inherited pipes: one frame per message, ``<8 digits length><fields joined by \\x1f>``.
Request: ``seam method arg... [=keyword value]...``, values tagged by ``encode``; reply ``ok value`` or
``err ErrorClassName message``. At the end ``done <seconds in seams> <calls> <seconds importing this file>``.
Any public method of a seam is forwarded, so the row follows the Kernel and Services protocols as they grow.
"""

import os
import time

SEP = "\x1f"
ITEM = "\x1e"


def encode(value: object) -> str:
    """One value as tagged text: None, bool, int, float, str, a path, or a tuple/list of strings (an argv)."""
    if value is None:
        return "n"
    if isinstance(value, bool):
        return "b1" if value else "b0"
    if isinstance(value, int):
        return f"i{value}"
    if isinstance(value, float):
        return f"f{value!r}"
    if isinstance(value, str):
        return "s" + value
    if isinstance(value, (tuple, list)):
        return "t" + ITEM.join(value)
    if hasattr(value, "__fspath__"):
        return "p" + str(value)  # str() of a Path does not touch the filesystem
    raise TypeError(f"the seam protocol cannot carry {type(value).__name__}")


def decode(text: str, path: type = str) -> object:
    tag, body = text[:1], text[1:]
    if tag == "n":
        return None
    if tag == "b":
        return body == "1"
    if tag == "i":
        return int(body)
    if tag == "f":
        return float(body)
    if tag == "t":
        return tuple(body.split(ITEM)) if body else ()
    if tag == "p":
        return path(body)
    return body


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

    def call(self, seam: str, method: str, args: tuple, kwargs: dict) -> object:
        start = time.perf_counter()
        try:
            fields = [seam, method, *(encode(a) for a in args)]
            for name, value in kwargs.items():
                fields += ["=" + name, encode(value)]
            self.send(*fields)
            reply = self.receive()
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1
        if reply[0] == "err":
            from janus_hooks import errors  # already loaded: the hook imported it before any seam call

            raise getattr(errors, reply[1], RuntimeError)(reply[2])
        return decode(reply[1])


class Remote:
    """One seam (kernel, services): every public method call goes to the bench process's fake of it."""

    def __init__(self, link: Link, seam: str) -> None:
        self._link, self._seam = link, seam

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args, **kwargs):
            return self._link.call(self._seam, name, args, kwargs)

        return call


class RemoteRunner:
    def __init__(self, link: Link) -> None:
        self._link = link

    def run(self, argv, timeout: float):
        from janus_hooks.host.runner import Result  # already loaded by janus_hooks.host

        code, out, err = self._link.call("runner", "run", (tuple(argv), timeout), {})
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

        return Janus.open(Host(root, Remote(link, "kernel")), services=Remote(link, "services"),
                          runner=RemoteRunner(link), restoring=restoring)

    try:
        return main(argv, root=root, open_janus=open_janus)
    finally:
        link.send("done", repr(link.seconds), str(link.calls), repr(import_seconds))
