"""``reserve`` and ``unreserve``: keep a second GPU away from host drivers from boot on, for VMs only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from janus_hooks import reserve as res
from janus_hooks.cli.common import Env, confirm, root_option, warn


def _show(changes: list[res.FileChange], host_root: Path) -> None:
    for change in changes:
        what = "remove" if change.content is None else "write "
        click.echo(f"  {what} {change.path.relative_to(host_root)}")
        for line in (change.content or "").splitlines():
            if not line.startswith("#"):
                click.echo(f"           {line}")


def _finish(env: Env, root: Path, changes: list[res.FileChange]) -> None:
    res.apply(changes)
    host = env.host(root)
    if not res.initramfs_changed(changes) or not host.path("etc/initramfs-tools").is_dir():
        return
    if not env.is_live(root):
        click.echo(f"{host.root} is not the running system: run '{' '.join(res.UPDATE_INITRAMFS)}' there.")
        return
    if host.program(res.UPDATE_INITRAMFS[0]) is None:
        warn(f"{res.UPDATE_INITRAMFS[0]} is not installed: rebuild the initramfs yourself")
        return
    click.echo(f"Running {' '.join(res.UPDATE_INITRAMFS)} (the initramfs applies the rule too)...")
    result = env.runner.run(list(res.UPDATE_INITRAMFS), res.UPDATE_TIMEOUT)
    if result.returncode != 0:
        warn(f"{' '.join(res.UPDATE_INITRAMFS)} failed: {result.reason()}; run it again before rebooting")


def _carry_out(env: Env, root: Path, host_root: Path, changes: list[res.FileChange], dry_run: bool, yes: bool,
               question: str) -> bool:
    """Show the changes; unless it is a dry run, ask, apply them and rebuild the initramfs. True once applied."""
    _show(changes, host_root)
    if dry_run:
        click.echo("Dry run: nothing was changed.")
        return False
    confirm(env, yes, question)
    _finish(env, root, changes)
    return True


def _options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed((click.argument("address"), root_option,
                            click.option("--dry-run", is_flag=True, help="Show what would change; change nothing."),
                            click.option("--yes", "-y", is_flag=True,
                                         help="Apply without asking (needed when not on a terminal)."),
                            click.pass_obj)):
        fn = option(fn)
    return fn


@click.command(short_help="Keep a second GPU on vfio-pci from boot on.")
@_options
def reserve(env: Env, address: str, root: Path, dry_run: bool, yes: bool) -> None:
    """Reserve the GPU at ADDRESS for VMs: from the next boot on, every function
    of it goes to vfio-pci when it appears, before any host driver sees it.

    The one persistent driver override janus-hooks makes, and only on this
    request. Refused for the boot GPU and for a GPU whose IOMMU group holds
    other devices. Undo with 'janus-hooks unreserve ADDRESS'.
    """
    if not dry_run:
        env.require_root("reserve")
    host = env.host(root)
    reservation, changes = res.plan_reserve(host, address)
    todo = res.pending(changes)
    click.echo(f"GPU {reservation.slot}: functions {', '.join(reservation.functions)}; host driver modules "
               f"{', '.join(reservation.modules) or 'none bound now'}")
    if not todo:
        click.echo(f"GPU {reservation.slot} is reserved already; nothing to do.")
        return
    if _carry_out(env, root, host.root, todo, dry_run, yes, f"Reserve GPU {reservation.slot} for VMs?"):
        click.echo(f"GPU {reservation.slot} is reserved for VMs from the next boot on "
                   f"(undo: 'janus-hooks unreserve {reservation.slot}').")


@click.command(short_help="Give a reserved GPU back to its host driver at the next boot.")
@_options
def unreserve(env: Env, address: str, root: Path, dry_run: bool, yes: bool) -> None:
    """Undo 'janus-hooks reserve ADDRESS': from the next boot on, the GPU goes
    to its host driver again."""
    if not dry_run:
        env.require_root("unreserve")
    host = env.host(root)
    reservation, changes = res.plan_unreserve(host, address)
    todo = res.pending(changes)
    if _carry_out(env, root, host.root, todo, dry_run, yes, f"Give GPU {reservation.slot} back to the host?"):
        click.echo(f"GPU {reservation.slot} goes to its host driver from the next boot on.")
