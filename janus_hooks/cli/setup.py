"""``install`` and ``uninstall``: put janus-hooks' files on a host, and take exactly those away again."""

from __future__ import annotations

from pathlib import Path

import click

import janus_hooks
from janus_hooks import install as inst
from janus_hooks.cli.common import (
    Env,
    Failure,
    config_or_defaults,
    fail_if,
    root_option,
    warn,
)
from janus_hooks.errors import JanusError
from janus_hooks.host import Host
from janus_hooks.journal import JournalStore


def _step_line(host: Host, step: inst.Step) -> str:
    item = step.item
    what = f"link -> {item.target}" if item.kind == "link" else f"mode {item.mode:04o}"
    notes = [n for n in (step.note, f"backup: {step.backup}" if step.action == "replace" else "") if n]
    return f"  {step.action:<10} {item.rel} ({what}{''.join('; ' + n for n in notes)})"


@click.command(short_help="Install the hook, udev rules, units and config.")
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
    Running it again is safe: it only writes what changed. Refuses when
    someone other than root could change the interpreter or the package
    (a venv in a home directory): root would run their code.
    """
    if not dry_run:
        env.require_root("install")
    host = env.host(root)
    ident = inst.Identity.current(host.root)
    inst.refuse_code_others_can_change(ident)
    plan = inst.plan_install(host, ident)
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
        fail_if(plan.failures)
        return
    if not plan.changes:
        click.echo(f"janus-hooks is installed and current in {host.root}; nothing to do.")
        fail_if(plan.failures)
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
    fail_if(problems)


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


@click.command(short_help="Remove what install wrote; restore backups.")
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
        fail_if(plan.failures)
        return
    for vm in plan.open_journals:
        warn(f"VM {vm!r} keeps its open journal: its devices stay switched until 'janus-hooks rollback {vm}'")
    for note in inst.apply_uninstall(host, plan, config_or_defaults(host).timeouts.lock):
        click.echo(f"  {note}")
    if env.is_live(root):
        _reload(env, root, host)
    click.echo(f"Uninstalled from {host.root}.")
    fail_if(plan.failures)
