"""``status``: one screen of what is installed and what each managed VM holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

import janus_hooks
from janus_hooks import check as checks
from janus_hooks import install as inst
from janus_hooks.cli.common import Env, Failure, connect_option, readable_store, root_option, when
from janus_hooks.config import load_profile
from janus_hooks.device_notes import DeviceNotes
from janus_hooks.domain import PROFILE_NS, parse_domain
from janus_hooks.errors import JanusError
from janus_hooks.failures import FailureStore
from janus_hooks.host import Host
from janus_hooks.journal import JournalState
from janus_hooks.layout import vm_from_filename

NOTES_SHOWN = 5


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


@click.command(short_help="Installed pieces, agent, managed VMs.")
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
    store = readable_store(host)
    readable, unreadable = store.read_each()
    states = {s.vm: s for s in readable}
    noted = store.noted_vms()
    failures = FailureStore(host.state_dir()).all()
    known = set(profiles) | set(states) | set(noted) | set(failures) | set(unreadable)
    click.echo("Managed VMs:" if known else "Managed VMs: none (mark one with 'janus-hooks profile')")
    for vm in sorted(known):
        state = states.get(vm)
        holds = (f"holds {', '.join(state.devices) or 'no PCI device'} since {when(state.started)}, "
                 f"{len(state.open_steps)} change(s) open" if state else "idle")
        if vm in unreadable:
            holds = f"journal unreadable ('janus-hooks rollback {vm} --discard'): {unreadable[vm]}"
        click.echo(f"  {vm:<20} {profiles.get(vm, 'no profile any more'):<32} {holds}")
        for note in store.notes(vm):
            click.echo(f"    warning (last release): {note}")
        if state is not None:
            for line in _strays(host, state):
                click.echo(f"    WARNING: {line}")
        if vm in failures:
            click.echo(f"    last failed start: {when(failures[vm].time)}: {failures[vm].reason}")
    notes = DeviceNotes(host.state_dir()).all()[-NOTES_SHOWN:]
    if notes:
        click.echo("Devices that came or went (seen by the agent, newest last):")
        for note in notes:
            click.echo(f"  {note.line()}")


def _strays(host: Host, state: JournalState) -> list[str]:
    """Devices a VM's journal holds that left the bus, and those a host driver took while the VM runs (the
    agent logs both as they happen)."""
    pid = host.vm_process(state.vm)
    running = f"VM {state.vm} runs (QEMU pid {pid})" if pid is not None else f"VM {state.vm}'s journal is open"
    gone = [f"{address} is gone from the PCI bus while {running}" for address in state.devices
            if not host.pci_dir(address).exists()]
    if pid is None:
        return gone
    return gone + [f"{address} is bound to host driver {driver} while {running}" for address in state.devices
                   if (driver := host.pci_driver(address)) is not None and driver != "vfio-pci"]
