"""The CLI against fake host trees: an Env whose euid, runner, signals and libvirt are played by the test."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from janus_hooks.cli import Env, cli
from janus_hooks.host import Host, SubprocessRunner
from janus_hooks.host.runner import Result as RunResult
from tests.conftest import FakeHost


class CliFakeRunner:
    """Records every command. Programs inside the test's tree (the installed hook shim, the fake libvirtd)
    run for real; others answer from ``answers`` (name -> (status, stdout)) or are "not found"."""

    def __init__(self, root: Path, answers: dict[str, tuple[int, str]] | None = None) -> None:
        self.root = root
        self.answers = answers or {}
        self.calls: list[tuple[str, ...]] = []

    def run(self, argv: Sequence[str], timeout: float) -> RunResult:
        self.calls.append(tuple(argv))
        if str(argv[0]).startswith(str(self.root) + os.sep):
            return SubprocessRunner().run(argv, timeout)
        status, out = self.answers.get(os.path.basename(argv[0]), (127, ""))
        return RunResult(tuple(argv), status, out, "" if status == 0 else f"{argv[0]}: not found")


class FakeDomain:
    def __init__(self, conn: FakeConn, name: str) -> None:
        self.conn, self._name = conn, name

    def name(self) -> str:
        return self._name

    def XMLDesc(self, flags: int = 0) -> str:  # noqa: N802 - libvirt's name
        return self.conn.domains[self._name]


class FakeConn:
    """The few libvirt calls the CLI makes; defineXML replaces the stored definition."""

    def __init__(self, domains: dict[str, str]) -> None:
        self.domains = dict(domains)
        self.defined: list[str] = []
        self.closed = 0

    def lookupByName(self, name: str) -> FakeDomain:  # noqa: N802
        if name not in self.domains:
            raise LookupError(f"Domain not found: no domain with matching name '{name}'")
        return FakeDomain(self, name)

    def listAllDomains(self, flags: int = 0) -> list[FakeDomain]:  # noqa: N802
        return [FakeDomain(self, n) for n in sorted(self.domains)]

    def defineXML(self, xml: str) -> FakeDomain:  # noqa: N802
        from janus_hooks.domain import parse_domain

        name = parse_domain(xml).name
        self.domains[name] = xml
        self.defined.append(xml)
        return FakeDomain(self, name)

    def close(self) -> None:
        self.closed += 1


@dataclass
class Cli:
    """Runs `janus-hooks ...` through click's CliRunner on one fake host tree."""

    fake: FakeHost
    euid: int = 0
    live: bool = False
    interactive: bool = False
    answers: dict[str, tuple[int, str]] = field(default_factory=dict)
    conn: FakeConn | None = None
    signals: list[tuple[int, int]] = field(default_factory=list)
    # How the host lists directories: a test plays a user who may not read some (PermissionError).
    listdir: Callable[[Path], list[str]] = os.listdir

    def __post_init__(self) -> None:
        self.runner = CliFakeRunner(self.fake.root, self.answers)

    @property
    def root(self) -> Path:
        return self.fake.root

    def env(self) -> Env:
        def connect(uri: str, readonly: bool) -> Any:
            if self.conn is None:
                raise ConnectionError("Failed to connect socket to '/run/libvirt/libvirt-sock': No such file")
            return self.conn

        return Env(
            geteuid=lambda: self.euid,
            runner=self.runner,
            services=self.fake.services,
            kill=lambda pid, sig: self.signals.append((pid, sig)),
            make_host=lambda root: Host(root, self.fake.kernel, listdir=self.listdir),
            make_janus=lambda host, restoring=False: self.fake.janus(restoring=restoring, host=host),
            connect=connect,
            live=self.live,
            interactive=lambda: self.interactive,
            progress=lambda: False,
        )

    def __call__(self, *args: str, input: str | None = None) -> Result:
        argv = [*args]
        if "--root" not in argv and args and not {"--help", "--version"} & set(args):
            argv += ["--root", str(self.root)]
        return CliRunner().invoke(cli, argv, obj=self.env(), input=input, catch_exceptions=False)


@pytest.fixture
def make_cli(fake):
    """``make_cli(builder, **cli_options)`` -> Cli on a fresh fake tree built by ``builder``."""

    def make(build, **options: Any) -> Cli:
        return Cli(fake(build), **options)

    return make


def tree_state(root: Path) -> dict[str, tuple]:
    """Every entry below ``root`` with its type, permission bits and content (sha256) or link target."""
    state: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                state[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                state[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                state[rel] = ("file", stat.S_IMODE(st.st_mode), hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def tree_diff(before: dict, after: dict) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
