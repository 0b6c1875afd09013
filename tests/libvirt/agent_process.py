"""``janus-hooks agent`` as systemd would run it: a child process with a notify socket, its log in a file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0


class AgentProcess:
    def __init__(self, run_dir: Path, *args: str) -> None:
        self.run_dir = run_dir
        self.log = run_dir / "agent.log"
        self.notify_path = run_dir / "agent-notify.sock"
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None

    def start(self) -> AgentProcess:
        self.notify_path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.notify_path))
        self.sock.settimeout(READY_TIMEOUT)
        cli = str(Path(sys.executable).with_name("janus-hooks"))
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "NOTIFY_SOCKET": str(self.notify_path)}
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([cli, "agent", "--root", "/", *self.args],  # noqa: S603
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        message = self.sock.recv(4096)  # bounded by the socket timeout
        assert message.startswith(b"READY=1"), message
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def lines(self) -> list[str]:
        try:
            return self.log.read_text().splitlines()
        except FileNotFoundError:
            return []

    def logged(self, text: str, after: int = 0) -> bool:
        return any(text in line for line in self.lines()[after:])

    def stop(self) -> int:
        """SIGTERM, as systemd stops it; returns the exit status (bounded wait, SIGKILL after)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(STOP_TIMEOUT)
        if self.sock is not None:
            self.sock.close()
        self.notify_path.unlink(missing_ok=True)
        return code


def wait_dead(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state == "Z":
            return  # dead; its parent has not reaped it (yet)
        assert time.monotonic() < deadline, f"pid {pid} did not die within {timeout:g} s"
        time.sleep(0.01)


def kill9(pid: int, timeout: float = 30.0) -> None:
    os.kill(pid, signal.SIGKILL)
    wait_dead(pid, timeout)
