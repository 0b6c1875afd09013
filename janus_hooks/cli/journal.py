"""``journal`` and ``rollback``: what is switched now, and putting the host back from the journals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from janus_hooks.cli.common import (
    Env,
    Failure,
    config_or_defaults,
    emit_json,
    fail_if,
    json_option,
    progress_log,
    readable_store,
    root_option,
    when,
)
from janus_hooks.errors import JanusError
from janus_hooks.host import Host
from janus_hooks.journal import JournalState, JournalStore


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


@click.command(short_help="What is switched now, per VM, step by step.")
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
    store = readable_store(host)
    states, unreadable = store.read_each([vm] if vm else None)
    boot_id = host.boot_id()
    if as_json:
        emit_json({"journals": [_journal_json(s, boot_id) for s in states]})
    elif not states and not unreadable:
        click.echo(f"VM {vm!r} has no open journal: nothing of it is switched." if vm
                   else "No open journal: no VM holds switched host devices.")
    for state in [] if as_json else states:
        boot = "this boot" if state.boot_id == boot_id else "an EARLIER boot"
        click.echo(f"VM {state.vm!r}: started {when(state.started)} ({boot}), devices "
                   f"{', '.join(state.devices) or '-'}")
        status = "all changes applied" if state.complete else "the start did not finish (crash or rollback pending)"
        click.echo(f"  {status}")
        for s in state.steps:
            took = f"{s.duration_ms:8.1f} ms" if s.duration_ms is not None else " " * 11
            click.echo(f"  {s.index + 1:>3}. {_step_state(s):<8} {when(s.started)} {took}  {s.action.describe()}")
    problems = [f"{reason}; 'janus-hooks rollback {name} --discard' shows it and moves it aside"
                for name, reason in unreadable.items()]
    if fail_if_open and (states or unreadable):
        held = [s.vm for s in states] + list(unreadable)
        problems.append(f"{len(held)} VM(s) hold switched host devices: {', '.join(held)}")
    fail_if(problems)


@click.command(short_help="Put the host back from VM's journal.")
@click.argument("vm", required=False)
@root_option
@click.option("--all", "all_vms", is_flag=True, help="Every VM with an open journal.")
@click.option("--dry-run", is_flag=True, help="List what would be restored; change nothing.")
@click.option("--boot", is_flag=True, help="Only journals left by an earlier boot (the boot-time recovery unit).")
@click.option("--force", is_flag=True, help="Even while the VM's QEMU still runs (it loses its devices).")
@click.option("--discard", is_flag=True,
              help="A journal that cannot be replayed: show what it held and move it aside, reverting nothing.")
@click.pass_obj
def rollback(env: Env, vm: str | None, root: Path, all_vms: bool, dry_run: bool, boot: bool, force: bool,
             discard: bool) -> None:
    """Put the host back: replay VM's journal backwards (or every VM's, with --all).

    For a stop whose hook never ran, a crash, or a person who wants the
    desktop back now. Undoes only what the journal records, newest first,
    and skips what is already back in place.
    """
    if bool(vm) == (all_vms or boot):
        raise click.UsageError("name one VM, or give --all")
    if discard and not vm:
        raise click.UsageError("--discard takes one VM")
    if not dry_run:
        env.require_root("rollback")
    host = env.host(root)
    store = readable_store(host)
    if discard:
        _discard(env, host, store, vm)
        return
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
        try:
            state = store.read(name)
        except JanusError as err:
            problems.append(f"{err}; 'janus-hooks rollback {name} --discard' shows it and moves it aside")
            continue
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
    fail_if(problems)


SHOWN_LINES, SHOWN_WIDTH = 64, 200


def _discard(env: Env, host: Host, store: JournalStore, vm: str) -> None:
    """Show a journal as it is on disk (bounded) and move it aside under the lock; nothing is replayed."""
    if not store.exists(vm):
        click.echo(f"VM {vm!r} has no open journal: nothing to discard.")
        return
    config = config_or_defaults(host)
    with store.lock(config.timeouts.lock):
        path = store.path(vm)
        try:
            with path.open("rb") as fh:
                lines = fh.read(SHOWN_LINES * 4096).decode(errors="replace").splitlines()
        except OSError as err:
            raise Failure(f"cannot read {path}: {err.strerror}") from err
        click.echo(f"VM {vm!r}: journal {path} held {len(lines)} record(s):")
        for line in lines[:SHOWN_LINES]:
            shown = line.encode("unicode_escape").decode()
            click.echo(f"  {shown[:SHOWN_WIDTH]}{'...' if len(shown) > SHOWN_WIDTH else ''}")
        try:
            target = store.discard(vm)
        except OSError as err:
            raise Failure(f"cannot move {path} aside: {err.strerror}") from err
    click.echo(f"VM {vm!r}: journal moved to {target}; nothing was reverted: "
               "check the devices it names ('janus-hooks devices') before starting the VM again.")
