"""``janus-hooks``: set a host up once, see what a VM start will do, and undo. Everything else is the hook's.

Every command takes ``--root DIR`` (default ``/``, or ``$JANUS_HOOKS_ROOT``) and acts on the host tree below
it. Commands that change anything refuse to run without root. Failures are one line each, naming the path,
device, unit or VM, with a non-zero exit status. ``--json`` output is documented in docs/cli-json.md.

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
from typing import Any, TypeVar

import click

import janus_hooks
from janus_hooks import check as checks
from janus_hooks import install as inst
from janus_hooks.config import Config, load_config, load_profile, profile_path
from janus_hooks.domain import MODES, PROFILE_NS, parse_domain
from janus_hooks.domain_edit import edit_domain, edit_profile_toml, text_diff, xml_diff
from janus_hooks.errors import JanusError
from janus_hooks.files import atomic_write
from janus_hooks.host import Host, Runner, Services, SubprocessRunner, SystemdServices
from janus_hooks.journal import JournalState, JournalStore
from janus_hooks.layout import vm_from_filename
from janus_hooks.runtime import Janus
from janus_hooks.snapshot import HostSnapshot

DEFAULT_URI = "qemu:///system"
LIBVIRT_TIMEOUT = 15.0
T = TypeVar("T")


class Failure(click.ClickException):
    """One line on stderr, ``janus-hooks: <message>``, and exit status 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"janus-hooks: {self.format_message()}", err=True)


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
    make_janus: Callable[..., Janus] = Janus.open  # (host, restoring=False)
    connect: Callable[[str, bool], Any] = _connect_libvirt
    live: bool | None = None  # acts on the running system; None: when the root is /
    interactive: Callable[[], bool] = field(default=lambda: sys.stdin.isatty() and sys.stdout.isatty())
    progress: Callable[[], bool] = field(default=lambda: sys.stderr.isatty())

    def host(self, root: Path) -> Host:
        return self.make_host(root.resolve())

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
    """Turns every JanusError or OSError into one line and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except JanusError as err:
            raise Failure(str(err)) from err
        except BrokenPipeError:
            raise  # `janus-hooks ... | head`: click ends quietly on EPIPE
        except OSError as err:
            where = f"{err.filename}: " if err.filename else ""
            raise Failure(f"{where}{err.strerror or err}") from err


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


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


@click.group(cls=JanusGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(janus_hooks.__version__, prog_name="janus-hooks")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Transparent VFIO GPU passthrough for libvirt/QEMU.

    First use: 'janus-hooks install', 'janus-hooks check', then mark a VM with
    'janus-hooks profile VM --mode single-gpu --gpu ADDR' and start it as usual (virt-manager, virsh).
    If the desktop does not come back: 'janus-hooks rollback VM'.
    """
    ctx.ensure_object(Env)


def main(argv: list[str] | None = None, prog_name: str = "janus-hooks") -> None:
    """Console script entry point."""
    cli.main(args=argv, prog_name=prog_name, obj=Env())


# --- install / uninstall ------------------------------------------------------------------------------------
def _step_line(host: Host, step: inst.Step) -> str:
    item = step.item
    what = f"link -> {item.target}" if item.kind == "link" else f"mode {item.mode:04o}"
    notes = [n for n in (step.note, f"backup: {step.backup}" if step.action == "replace" else "") if n]
    return f"  {step.action:<10} {item.rel} ({what}{''.join('; ' + n for n in notes)})"


@cli.command(short_help="Install the hook, udev rules, units and config.")
@root_option
@click.option("--dry-run", is_flag=True, help="Show what would be written; change nothing.")
@click.option("--yes", "-y", is_flag=True, help="Install without asking (needed when not on a terminal).")
@click.pass_obj
def install(env: Env, root: Path, dry_run: bool, yes: bool) -> None:
    """Install the libvirt hook, udev rules, systemd units and default config.

    Shows what it will write first. The hook goes in as a drop-in,
    etc/libvirt/hooks/qemu.d/janus-hooks, written to run this copy of janus-hooks
    with this Python; an existing etc/libvirt/hooks/qemu dispatcher and other
    drop-ins are never touched. A config you changed is never overwritten.
    Everything written is listed in a manifest for 'janus-hooks uninstall'.
    Running it again is safe: it only writes what changed.
    """
    if not dry_run:
        env.require_root("install")
    host = env.host(root)
    plan = inst.plan_install(host, inst.Identity.current(host.root))
    click.echo(f"janus-hooks {janus_hooks.__version__} into {host.root}: the hook runs "
               f"{plan.ident.interpreter} with the package in {plan.ident.package_dir}")
    for rel, mode in plan.dirs:
        click.echo(f"  {'mkdir':<10} {rel} (mode {mode:04o})")
    unchanged = [s for s in plan.steps if s.action == "unchanged"]
    for step in plan.steps:
        if step.action != "unchanged":
            click.echo(_step_line(host, step))
    if unchanged:
        click.echo(f"  {'unchanged':<10} {len(unchanged)} file(s) already as they should be")
    for note in plan.warnings:
        warn(note)
    if dry_run:
        click.echo("Dry run: nothing was changed.")
        _fail_if(plan.failures)
        return
    if not plan.changes:
        click.echo(f"janus-hooks is installed and current in {host.root}; nothing to do.")
        _fail_if(plan.failures)
        return
    if not yes:
        if not env.interactive():
            raise Failure("not on a terminal: run 'janus-hooks install --yes' to install without asking")
        click.confirm("Install these files?", abort=True)
    inst.apply_install(host, plan)
    problems = list(plan.failures)
    try:
        shim = inst.check_shim(host, env.runner)
    except JanusError as err:
        shim = f"the installed hook {inst.hook_path(host)} does not run: {err}"
    if shim:
        problems.append(shim)
    _reload(env, root, host)
    written = sum(1 for s in plan.steps if s.writes)
    click.echo(f"Installed: {written} file(s) written, manifest {inst.Manifest.path(host)}.")
    if not problems:
        click.echo("Next: 'janus-hooks check', then mark a VM with 'janus-hooks profile'.")
    _fail_if(problems)


def _fail_if(problems: list[str]) -> None:
    for problem in problems[:-1]:
        failure(problem)
    if problems:
        raise Failure(problems[-1])


def _reload(env: Env, root: Path, host: Host) -> None:
    if not env.is_live(root):
        click.echo(f"{host.root} is not the running system: libvirt, udev and systemd were not told.")
        return
    done, warnings = inst.reload_system(host, env.runner, env.kill)
    for line in done:
        click.echo(f"  {line}")
    for line in warnings:
        warn(line)
    if not any("libvirtd" in d or "virtqemud" in d for d in done):
        click.echo("libvirt does not run now; it finds the hook when it starts.")


@cli.command(short_help="Remove what install wrote; restore backups.")
@root_option
@click.option("--force", is_flag=True, help="Uninstall even while a VM's journal is open (after a failed rollback).")
@click.option("--dry-run", is_flag=True, help="Show what would be removed; change nothing.")
@click.pass_obj
def uninstall(env: Env, root: Path, force: bool, dry_run: bool) -> None:
    """Remove exactly what 'install' wrote, and put back what it replaced.

    Files changed since install are left in place and named. Refuses while a
    VM still has switched devices (an open journal): roll it back first.
    """
    if not dry_run:
        env.require_root("uninstall")
    host = env.host(root)
    plan = inst.plan_uninstall(host)
    if plan.open_journals and not force:
        vm = plan.open_journals[0]
        raise Failure(f"VM {vm!r} still has switched host devices (journal {JournalStore(host.state_dir()).path(vm)}): "
                      f"run 'janus-hooks rollback {vm}' first, or 'uninstall --force'")
    words = {"remove": "remove", "restore": "restore", "gone": "gone", "keep": "keep"}
    for removal in plan.removals:
        entry = removal.entry
        extra = f"; put back {entry.backup}" if removal.action == "restore" else ""
        note = f" ({removal.note}{extra})" if removal.note else (f" ({extra[2:]})" if extra else "")
        click.echo(f"  {words[removal.action]:<8} {entry.rel}{note}")
    if dry_run:
        click.echo("Dry run: nothing was changed.")
        _fail_if(plan.failures)
        return
    for vm in plan.open_journals:
        warn(f"VM {vm!r} keeps its open journal: its devices stay switched until 'janus-hooks rollback {vm}'")
    for note in inst.apply_uninstall(host, plan, _config(host).timeouts.lock):
        click.echo(f"  {note}")
    if env.is_live(root):
        _reload(env, root, host)
    click.echo(f"Uninstalled from {host.root}.")
    _fail_if(plan.failures)


def _config(host: Host) -> Config:
    try:
        return load_config(host.config_dir())
    except JanusError:
        return Config()


# --- check / devices / plan ---------------------------------------------------------------------------------
_MARK = {checks.OK: "ok", checks.WARN: "warn", checks.FAIL: "FAIL"}


@cli.command(short_help="Is this host ready; what can each GPU do.")
@root_option
@json_option
@click.pass_obj
def check(env: Env, root: Path, as_json: bool) -> None:
    """Is this host ready for GPU passthrough, and what can each GPU do.

    Checks CPU virtualization, IOMMU, kvm and vfio, hugepages, hugetlbfs,
    libvirt, the installed hook and the agent, then gives each GPU a verdict:
    ready for passthrough (a second GPU), for single-GPU (the one driving
    the desktop), or why not. Exit status 0 when the host is ready.
    """
    host = env.host(root)
    probe = checks.Probe(env.runner, env.service_control(), env.is_live(root))
    report = checks.run_check(host, probe)
    if as_json:
        emit_json(report.to_json())
    else:
        click.echo("Host:")
        for c in report.checks:
            click.echo(f"  {_MARK[c.status]:<5} {c.name:<10} {c.detail}")
        if report.gpus:
            click.echo("GPUs:")
        for v in report.gpus:
            g = v.gpu
            flags = ", ".join(x for x in (g.driver or "no driver", f"IOMMU group {g.iommu_group}",
                                          "boot VGA" if g.boot_vga else "", f"reset: {g.reset_method or 'none'}") if x)
            click.echo(f"  {g.address} [{g.vendor[2:]}:{g.device[2:]}] {checks.class_name(g)}, {flags}")
            click.echo(f"    functions: {', '.join(f.address for f in v.functions)}")
            click.echo(f"    verdict:   {v.summary()}")
            for note in v.notes:
                click.echo(f"    note:      {note}")
        fails = sum(1 for c in report.checks if c.status == checks.FAIL)
        if report.ready:
            click.echo("The host is ready.")
        else:
            reasons = f"{fails} failed check(s)" if fails else "no GPU is ready"
            click.echo(f"The host is not ready: {reasons}.")
    if not report.ready:
        sys.exit(1)


@cli.command(short_help="GPUs, their IOMMU groups, drivers and users.")
@root_option
@json_option
@click.pass_obj
def devices(env: Env, root: Path, as_json: bool) -> None:
    """GPUs, their functions and IOMMU groups, drivers, and who holds them.

    For each GPU: every function of the card, every member of its IOMMU
    group (a group must go to a VM whole; bridges excepted), the driver each
    is bound to, processes using the GPU, and the VM whose journal holds it.
    """
    host = env.host(root)
    snap = HostSnapshot.read(host, claims=JournalStore(host.state_dir()).claims())
    found = checks.inventory(snap)
    if as_json:
        emit_json({"gpus": found})
        return
    if not found:
        click.echo("No GPU (display-class PCI device) found.")
        return
    for gpu in found:
        extras = ", ".join(x for x in ("boot VGA" if gpu["boot_vga"] else "",
                                       f"reset: {gpu['reset_method'] or 'none'}",
                                       f"NUMA node {gpu['numa_node']}" if gpu["numa_node"] >= 0 else "") if x)
        click.echo(f"GPU {gpu['slot']} [{gpu['vendor'][2:]}:{gpu['device'][2:]}] {extras}")
        for f in gpu["functions"]:
            click.echo(f"  {f['address']}  {f['kind']:<22} {f['driver'] or '(no driver)'}")
        members = gpu["iommu_group_members"]
        if gpu["iommu_group"] is None:
            click.echo("  IOMMU group: none (the IOMMU is off)")
        else:
            click.echo(f"  IOMMU group {gpu['iommu_group']}:")
            for m in members:
                role = "this card" if m["same_card"] else "bridge, stays" if m["bridge"] else "OTHER DEVICE"
                click.echo(f"    {m['address']}  {m['kind']:<22} {m['driver'] or '(no driver)':<16} {role}")
        users: dict[tuple[int, str, str | None], list[str]] = {}
        for user in gpu["used_by"]:
            users.setdefault((user["pid"], user["command"], user["unit"]), []).append(user["node"])
        for (pid, command, unit), nodes in users.items():
            click.echo(f"  used by pid {pid} ({command}{f', unit {unit}' if unit else ''}) via {', '.join(nodes)}")
        click.echo(f"  held by VM: {gpu['held_by_vm'] or '-'}")


# libvirt's VIR_DOMAIN_XML_SECURE and VIR_DOMAIN_XML_INACTIVE: the persistent definition, which the next
# start uses, with its secrets (a VNC password left out would be lost by defineXML).
XML_SECURE, XML_INACTIVE = 1, 2


def _domain_xml(env: Env, vm: str, uri: str, for_define: bool = False) -> str:
    flags = XML_INACTIVE | (XML_SECURE if for_define else 0)
    # Secrets need a read-write connection; a plan only reads.
    return env.libvirt(uri, not for_define, lambda conn: conn.lookupByName(vm).XMLDesc(flags))


@cli.command(short_help="Dry run: what starting VM would change.")
@click.argument("vm")
@root_option
@click.option("--xml", "xml_file", type=click.File("r"), help="Read the domain XML from FILE ('-': stdin) "
              "instead of libvirt.")
@connect_option
@json_option
@click.pass_obj
def plan(env: Env, vm: str, root: Path, xml_file: Any, uri: str, as_json: bool) -> None:
    """Show exactly what starting VM would change, or why it would be refused.

    A dry run of the hook's 'prepare begin' against the host as it is now,
    from libvirt's definition of VM (or --xml FILE). Exit status 1 when the
    start would be refused.
    """
    xml = xml_file.read() if xml_file else _domain_xml(env, vm, uri)
    spec = parse_domain(xml)
    if spec.name != vm:
        raise Failure(f"the domain XML defines VM {spec.name!r}, not {vm!r}")
    result = env.make_janus(env.host(root)).plan(spec)
    if as_json:
        emit_json(result.to_json())
    else:
        click.echo(result.render())
    if result.refusal:
        sys.exit(1)


# --- profile ------------------------------------------------------------------------------------------------
def _expand_gpus(host: Host, addresses: tuple[str, ...]) -> list[str]:
    """``01:00.0``, ``0000:01:00.0`` or ``01:00`` -> every function of that card present on the host."""
    present = {d.address: d for d in host.pci_devices()}
    result: list[str] = []
    for raw in addresses:
        text = raw.strip().lower()
        if text.count(":") == 1:
            text = "0000:" + text
        slot = text.rsplit(".", 1)[0] if "." in text else text
        if "." in text and text not in present:
            raise Failure(f"no PCI device {raw} on this host (see 'janus-hooks devices')")
        functions = sorted(a for a, d in present.items() if d.slot == slot)
        if not functions:
            raise Failure(f"no PCI device {raw} on this host (see 'janus-hooks devices')")
        result += [a for a in functions if a not in result]
    return result


def _confirm(env: Env, yes: bool, question: str) -> None:
    if yes:
        return
    if not env.interactive():
        raise Failure("not on a terminal: add --yes to apply the change without asking")
    click.confirm(question, abort=True)


@cli.command(short_help="Mark VM as managed: single-gpu, passthrough.")
@click.argument("vm")
@root_option
@click.option("--mode", required=True, type=click.Choice([*MODES, "none"]),
              help="single-gpu: the GPU that drives the desktop (the desktop stops while VM runs); "
                   "passthrough: a second GPU; none: no longer managed.")
@click.option("--gpu", "gpus", multiple=True, metavar="ADDR",
              help="Give VM this GPU (e.g. 01:00.0): every function of the card is added as a PCI hostdev. "
                   "Repeat for more cards.")
@click.option("--hugepages/--no-hugepages", default=None, help="Back VM's memory with hugepages, or stop doing so. "
              "Unchanged when not given.")
@click.option("--toml", is_flag=True, help="Record the mode in etc/janus-hooks/vms/VM.toml instead of the "
              "libvirt definition (libvirt is not contacted).")
@click.option("--yes", "-y", is_flag=True, help="Apply the change without asking.")
@connect_option
@click.pass_obj
def profile(env: Env, vm: str, root: Path, mode: str, gpus: tuple[str, ...], hugepages: bool | None, toml: bool,
            yes: bool, uri: str) -> None:
    """Mark VM as managed by janus-hooks, in the mode it needs.

    Writes the janus-hooks metadata into VM's libvirt definition (virt-manager
    keeps it), adds a PCI hostdev for every function of each --gpu, and adds or
    removes hugepage backing. Shows a diff and asks before defining it.
    With --toml, writes etc/janus-hooks/vms/VM.toml instead (mode only).
    """
    env.require_root("profile")
    host = env.host(root)
    if toml:
        if gpus or hugepages is not None:
            raise Failure("--gpu and --hugepages change the libvirt definition; with --toml only the mode is "
                          "recorded (give the VM its GPU in virt-manager, or drop --toml)")
        _profile_toml(env, host, vm, mode, yes)
        return
    if mode == "none" and gpus:
        raise Failure("--gpu gives a managed VM its GPU; with --mode none it has no meaning")
    functions = _expand_gpus(host, gpus)
    current = _domain_xml(env, vm, uri, for_define=True)
    new = edit_domain(current, mode, functions, hugepages)
    diff = xml_diff(current, new, vm)
    if not diff:
        click.echo(f"VM {vm!r} already has this profile; nothing to change.")
        return
    click.echo(diff, nl=False)
    _confirm(env, yes, f"Define VM {vm!r} with these changes?")
    env.libvirt(uri, False, lambda conn: conn.defineXML(new))
    if mode == "none":
        click.echo(f"VM {vm!r} defined: no longer managed by janus-hooks (its hostdevs stay as they are).")
    else:
        click.echo(f"VM {vm!r} defined with janus-hooks mode {mode}.")
        spec = parse_domain(new)
        if not spec.hostdevs:
            managed = "only its hugepages are managed" if spec.hugepages else "its start changes nothing on the host"
            warn(f"VM {vm!r} has no PCI hostdev: {managed}; add --gpu ADDR to give it a GPU")
        click.echo(f"Next: 'janus-hooks plan {vm}' shows what its start will change.")


def _profile_toml(env: Env, host: Host, vm: str, mode: str, yes: bool) -> None:
    path = profile_path(host.config_dir(), vm)
    current = path.read_text() if path.exists() else None
    new = edit_profile_toml(current, mode)
    if new == current:
        click.echo(f"VM {vm!r} has no TOML profile; nothing to change." if new is None
                   else f"{path} already says mode {mode}; nothing to change.")
        return
    click.echo(text_diff(current, new, str(path)), nl=False)
    _confirm(env, yes, f"Write {path}?" if new is not None else f"Remove {path}?")
    if new is None:
        path.unlink()
        click.echo(f"Removed {path}: VM {vm!r} is no longer managed through a TOML profile.")
        return
    for directory in (host.config_dir(), path.parent):
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    atomic_write(path, new.encode(), mode=0o644)
    click.echo(f"Wrote {path}: VM {vm!r} is managed in mode {mode}.")


# --- journal / rollback -------------------------------------------------------------------------------------
def _readable_store(host: Host) -> JournalStore:
    store = JournalStore(host.state_dir())
    if store.dir.exists() and not os.access(store.dir, os.R_OK | os.X_OK):
        raise Failure(f"cannot read {store.dir}: run as root")
    return store


def _step_state(step: Any) -> str:
    return "reverted" if step.reverted else "done" if step.done else "pending"


def _journal_json(state: JournalState, boot_id: str) -> dict[str, Any]:
    return {
        "vm": state.vm,
        "boot_id": state.boot_id,
        "this_boot": state.boot_id == boot_id,
        "started": state.started,
        "devices": list(state.devices),
        "complete": state.complete,
        "steps": [{"index": s.index, "description": s.action.describe(), "kind": s.action.kind,
                   "state": _step_state(s), "started": s.started, "duration_ms": s.duration_ms}
                  for s in state.steps],
    }


@cli.command(short_help="What is switched now, per VM, step by step.")
@click.argument("vm", required=False)
@root_option
@json_option
@click.option("--fail-if-open", is_flag=True, help="Exit 1 when any journal is open (the sleep guard uses this).")
@click.pass_obj
def journal(env: Env, vm: str | None, root: Path, as_json: bool, fail_if_open: bool) -> None:
    """What is switched right now, per VM: each change, when, how long it took.

    A VM has an open journal from the moment its start begins switching
    devices until its stop has put everything back.
    """
    host = env.host(root)
    store = _readable_store(host)
    names = [vm] if vm else store.vms()
    states = [s for name in names if (s := store.read(name)) is not None]
    boot_id = host.boot_id()
    if as_json:
        emit_json({"journals": [_journal_json(s, boot_id) for s in states]})
    elif not states:
        click.echo(f"VM {vm!r} has no open journal: nothing of it is switched." if vm
                   else "No open journal: no VM holds switched host devices.")
    for state in [] if as_json else states:
        boot = "this boot" if state.boot_id == boot_id else "an EARLIER boot"
        click.echo(f"VM {state.vm!r}: started {_when(state.started)} ({boot}), devices "
                   f"{', '.join(state.devices) or '-'}")
        status = "all changes applied" if state.complete else "the start did not finish (crash or rollback pending)"
        click.echo(f"  {status}")
        for s in state.steps:
            took = f"{s.duration_ms:8.1f} ms" if s.duration_ms is not None else " " * 11
            click.echo(f"  {s.index + 1:>3}. {_step_state(s):<8} {_when(s.started)} {took}  {s.action.describe()}")
    if fail_if_open and states:
        raise Failure(f"{len(states)} VM(s) hold switched host devices: {', '.join(s.vm for s in states)}")


@cli.command(short_help="Put the host back from VM's journal.")
@click.argument("vm", required=False)
@root_option
@click.option("--all", "all_vms", is_flag=True, help="Every VM with an open journal.")
@click.option("--dry-run", is_flag=True, help="List what would be restored; change nothing.")
@click.option("--boot", is_flag=True, help="Only journals left by an earlier boot (the boot-time recovery unit).")
@click.option("--force", is_flag=True, help="Even while the VM's QEMU still runs (it loses its devices).")
@click.pass_obj
def rollback(env: Env, vm: str | None, root: Path, all_vms: bool, dry_run: bool, boot: bool, force: bool) -> None:
    """Put the host back: replay VM's journal backwards (or every VM's, with --all).

    For a stop whose hook never ran, a crash, or a person who wants the
    desktop back now. Undoes only what the journal records, newest first,
    and skips what is already back in place.
    """
    if bool(vm) == (all_vms or boot):
        raise click.UsageError("name one VM, or give --all")
    if not dry_run:
        env.require_root("rollback")
    host = env.host(root)
    store = _readable_store(host)
    boot_id = host.boot_id()
    names = [vm] if vm else store.vms()
    if vm and not store.exists(vm):
        click.echo(f"VM {vm!r} has no open journal: nothing to roll back.")
        return
    if not names:
        click.echo("No open journal: nothing to roll back.")
        return
    problems: list[str] = []
    # restoring: a broken janus.toml must not keep the desktop from coming back.
    janus = None if dry_run else env.make_janus(host, restoring=True)
    for name in names:
        state = store.read(name)
        if state is None:
            continue
        earlier = state.boot_id != boot_id
        if boot and not earlier:
            click.echo(f"VM {name!r}: journal is from this boot; left alone.")
            continue
        pid = None if earlier else host.vm_process(name)
        if pid is not None and not force:
            problems.append(f"VM {name!r} is running (QEMU pid {pid}): shut it down first, or add --force "
                            "to take its devices away while it runs")
            continue
        if dry_run:
            click.echo(f"VM {name!r}: would restore, newest first:")
            for step in reversed(state.open_steps):
                gone = earlier and not step.action.persistent
                click.echo(f"  undo {step.action.describe()}{' (already gone with the reboot)' if gone else ''}")
            continue
        if env.progress():
            click.echo(f"VM {name!r}: reverting {len(state.open_steps)} change(s)...", err=True)
        try:
            with progress_log(env):
                report = janus.release(name)
        except JanusError as err:
            reason = str(err) if name in str(err) else f"VM {name!r}: {err}"
            problems.append(f"{reason}; the journal is kept: fix that and run 'janus-hooks rollback {name}' again")
            continue
        gone = f", {report.skipped_after_reboot} already gone with the reboot" if report.skipped_after_reboot else ""
        click.echo(f"VM {name!r}: {report.reverted} change(s) reverted{gone}; the journal is closed.")
    _fail_if(problems)


# --- status / agent -----------------------------------------------------------------------------------------
def _toml_profiles(host: Host) -> dict[str, str]:
    try:
        files = sorted(p for p in (host.config_dir() / "vms").iterdir() if p.suffix == ".toml")
    except OSError:
        return {}
    result = {}
    for path in files:
        vm = vm_from_filename(path.stem)
        try:
            found = load_profile(host.config_dir(), vm)
            result[vm] = found.mode if found else "unreadable"
        except JanusError:
            result[vm] = "unreadable"
    return result


def _libvirt_profiles(conn: Any) -> dict[str, str]:
    marked = {}
    for dom in conn.listAllDomains(0):
        xml = dom.XMLDesc(0)
        if PROFILE_NS in xml:
            try:
                mode = parse_domain(xml).mode
            except JanusError:
                mode = "unreadable"
            if mode:
                marked[dom.name()] = mode
    return marked


@cli.command(short_help="Installed pieces, agent, managed VMs.")
@root_option
@connect_option
@click.pass_obj
def status(env: Env, root: Path, uri: str) -> None:
    """One screen: what is installed, the agent, managed VMs and what each holds."""
    host = env.host(root)
    manifest = inst.Manifest.load(host)
    click.echo(f"janus-hooks {janus_hooks.__version__} on {host.root}")
    if manifest is None:
        click.echo("  installed: no (run 'janus-hooks install')")
    else:
        changed = [e.rel for e in manifest.entries.values()
                   if not inst.matches(e, inst.file_state(host.root / e.rel))]
        state = "all in place" if not changed else f"{len(changed)} changed or missing: {', '.join(changed)}"
        click.echo(f"  installed: {len(manifest.entries)} file(s), {state}")
    probe = checks.Probe(env.runner, env.service_control(), env.is_live(root))
    for c in checks.hook_checks(host) + [checks.agent_check(host, probe), checks.libvirt_check(host, probe)]:
        click.echo(f"  {c.name}: {c.detail}")
    profiles = {vm: f"{mode} (TOML profile)" for vm, mode in _toml_profiles(host).items()}
    try:
        for vm, mode in env.libvirt(uri, True, _libvirt_profiles).items():
            profiles.setdefault(vm, f"{mode} (libvirt metadata)")
    except (Failure, JanusError) as err:
        click.echo(f"  VMs in libvirt: not listed ({err})")
    store = _readable_store(host)
    states = {name: s for name in store.vms() if (s := store.read(name)) is not None}
    click.echo("Managed VMs:" if profiles or states else "Managed VMs: none (mark one with 'janus-hooks profile')")
    for vm in sorted(set(profiles) | set(states)):
        state = states.get(vm)
        holds = (f"holds {', '.join(state.devices) or 'no PCI device'} since {_when(state.started)}, "
                 f"{len(state.open_steps)} change(s) open" if state else "idle")
        click.echo(f"  {vm:<20} {profiles.get(vm, 'no profile any more'):<32} {holds}")


@cli.command(short_help="The event agent (not implemented yet).")
@root_option
def agent(root: Path) -> None:
    """Event agent: heal what the hooks cannot see (not implemented yet).

    Will follow libvirt lifecycle events, udev and config changes. For now it
    exits with status 1 and starts nothing; the hook works without it.
    """
    raise Failure("the agent is not implemented yet; nothing was started (the hook works without it)")

