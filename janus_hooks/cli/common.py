"""What every ``janus-hooks`` command shares: the collaborators (``Env``), one-line failures, common options.

Collaborators (the euid, the command runner, signals, libvirt) come from ``Env``, the click context object,
so tests exercise every path on fake host trees without touching this machine.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from janus_hooks.config import Config, load_config
from janus_hooks.errors import JanusError
from janus_hooks.files import ensure_private_dir
from janus_hooks.host import Host, Runner, Services, SubprocessRunner, SystemdServices
from janus_hooks.journal import JournalStore

if TYPE_CHECKING:
    from janus_hooks.runtime import Janus

DEFAULT_URI = "qemu:///system"
LIBVIRT_TIMEOUT = 15.0
T = TypeVar("T")


class Failure(click.ClickException):
    """One line on stderr, ``janus-hooks: <message>``, and exit status 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"janus-hooks: {self.format_message()}", err=True)


def _open_janus(host: Host, restoring: bool = False) -> Janus:
    # Imported here: the engine and its actions are for the commands that change the host (and the agent
    # loads them only when it rolls something back).
    from janus_hooks.runtime import Janus

    return Janus.open(host, restoring=restoring)


def _connect_libvirt(uri: str, readonly: bool) -> Any:
    # Imported here only: the hook and every other command must work without libvirt-python.
    import libvirt

    # libvirt prints each error to stderr by itself; report it once, our way.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt.openReadOnly(uri) if readonly else libvirt.open(uri)


@dataclass
class Env:
    """What commands use beyond the host tree; real by default, replaced in tests."""

    geteuid: Callable[[], int] = os.geteuid
    runner: Runner = field(default_factory=SubprocessRunner)
    services: Services | None = None  # systemctl through ``runner`` when None
    kill: Callable[[int, int], None] = os.kill
    make_host: Callable[[Path], Host] = Host
    make_janus: Callable[..., Janus] = _open_janus  # (host, restoring=False)
    connect: Callable[[str, bool], Any] = _connect_libvirt
    live: bool | None = None  # acts on the running system; None: when the root is /
    interactive: Callable[[], bool] = field(default=lambda: sys.stdin.isatty() and sys.stdout.isatty())
    progress: Callable[[], bool] = field(default=lambda: sys.stderr.isatty())
    last_root: Path | None = None  # the host tree the command acts on, for the internal-error log

    def host(self, root: Path) -> Host:
        self.last_root = root.resolve()
        return self.make_host(self.last_root)

    def is_live(self, root: Path) -> bool:
        return self.live if self.live is not None else root.resolve() == Path("/")

    def service_control(self) -> Services:
        return self.services or SystemdServices(self.runner)

    def require_root(self, command: str) -> None:
        if self.geteuid() != 0:
            raise Failure(f"'janus-hooks {command}' changes the host and must run as root: "
                          f"try 'sudo janus-hooks {command}'")

    def libvirt(self, uri: str, readonly: bool, what: Callable[[Any], T]) -> T:
        """Connect and run ``what(conn)``, bounded: a hung daemon must not hang the command."""
        return _bounded(lambda: _with_conn(self.connect(uri, readonly), what), LIBVIRT_TIMEOUT,
                        f"libvirt at {uri}")


def _with_conn(conn: Any, what: Callable[[Any], T]) -> T:
    try:
        return what(conn)
    finally:
        conn.close()


def _bounded(fn: Callable[[], T], timeout: float, what: str) -> T:
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as err:  # handed to the caller's thread below
            result["error"] = err

    # A daemon thread: if libvirt never answers, the command still ends when the main thread does.
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise Failure(f"{what} did not answer within {timeout:g} s")
    if "error" in result:
        err = result["error"]
        if isinstance(err, (Failure, JanusError)):
            raise err
        raise Failure(f"{what}: {err}") from err
    return result["value"]


class JanusGroup(click.Group):
    """Turns every error into one line and exit status 1: JanusError and OSError as they are, anything else
    (a bug) as "internal error" with the traceback in a log file the line names. Never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except JanusError as err:
            raise Failure(str(err)) from err
        except BrokenPipeError:
            raise  # `janus-hooks ... | head`: click ends quietly on EPIPE
        except OSError as err:
            where = f"{err.filename}: " if err.filename else ""
            raise Failure(f"{where}{err.strerror or err}") from err
        except Exception as err:  # noqa: BLE001 - the one place a bug becomes one line
            env = ctx.obj if isinstance(ctx.obj, Env) else None
            raise Failure(internal_error(err, env.last_root if env and env.last_root else Path("/"))) from err


MAX_LINE = 300


def internal_error(err: BaseException, root: Path) -> str:
    """Log ``err``'s traceback to the CLI log below ``root`` and return the one line that names that log."""
    import traceback

    what = f"{type(err).__name__}: {err}"
    what = what if len(what) <= 120 else what[:117] + "..."
    try:
        log_dir = ensure_private_dir(Host(root).log_dir())
        path = log_dir / "cli.log"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "a") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(map(repr, sys.argv))}\n")
            fh.write("".join(traceback.format_exception(err)))
        where = f"details in {path}"
    except (OSError, JanusError) as log_err:
        where = f"no log ({log_err})"
    line = f"internal error ({what}); {where}"
    return line if len(line) <= MAX_LINE else line[: MAX_LINE - 3] + "..."


# Exit status of check, devices and plan when their answer misses what only root can read (docs/cli-json.md).
INCOMPLETE = 3


def incomplete(host: Host) -> str | None:
    """The line that says an answer misses what only root can read (other users' descriptors, the
    journals), or None when the host could read everything it looked at."""
    what = host.unreadable()
    return f"incomplete: run as root (could not read {what})" if what else None


def root_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--root", type=click.Path(exists=True, file_okay=False, path_type=Path), default="/", show_default=True,
        envvar="JANUS_HOOKS_ROOT", help="Host tree to act on (a staging tree, a mounted system, tests).",
    )(fn)


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/cli-json.md).")(fn)


def connect_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--connect", "uri", default=DEFAULT_URI, show_default=True, metavar="URI",
                        help="libvirt connection to read (and define) the VM through.")(fn)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def warn(message: str) -> None:
    click.echo(f"janus-hooks: warning: {message}", err=True)


def failure(message: str) -> None:
    click.echo(f"janus-hooks: {message}", err=True)


@contextmanager
def progress_log(env: Env) -> Iterator[None]:
    """On a terminal, show each step of a long transition as it happens; scripts stay quiet."""
    if not env.progress():
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("  %(message)s"))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("janus_hooks")
    old_level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def fail_if(problems: list[str]) -> None:
    """Every problem on its own line; the last one is the command's failure (exit status 1)."""
    for problem in problems[:-1]:
        failure(problem)
    if problems:
        raise Failure(problems[-1])


def config_or_defaults(host: Host) -> Config:
    """The host's config, or the defaults when it is broken: for commands that put the host back."""
    try:
        return load_config(host.config_dir())
    except Exception:  # noqa: BLE001 - a broken config never keeps the host from being put back
        return Config()


def confirm(env: Env, yes: bool, question: str) -> None:
    if yes:
        return
    if not env.interactive():
        raise Failure("not on a terminal: add --yes to apply the change without asking")
    click.confirm(question, abort=True)


# libvirt's VIR_DOMAIN_XML_SECURE and VIR_DOMAIN_XML_INACTIVE: the persistent definition, which the next
# start uses, with its secrets (a VNC password left out would be lost by defineXML).
XML_SECURE, XML_INACTIVE = 1, 2


def domain_xml(env: Env, vm: str, uri: str, for_define: bool = False) -> str:
    flags = XML_INACTIVE | (XML_SECURE if for_define else 0)
    # Secrets need a read-write connection; a plan only reads.
    return env.libvirt(uri, not for_define, lambda conn: conn.lookupByName(vm).XMLDesc(flags))


def readable_store(host: Host) -> JournalStore:
    store = JournalStore(host.state_dir())
    if store.dir.exists() and not os.access(store.dir, os.R_OK | os.X_OK):
        raise Failure(f"cannot read {store.dir}: run as root")
    return store
