"""``check``, ``devices`` and ``plan``: what the host can do, who uses its GPUs, what a start would change."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from janus_hooks import check as checks
from janus_hooks.cli.common import (
    INCOMPLETE,
    Env,
    Failure,
    connect_option,
    domain_xml,
    emit_json,
    incomplete,
    json_option,
    root_option,
)
from janus_hooks.domain import parse_domain
from janus_hooks.journal import JournalStore
from janus_hooks.reserve import reservations
from janus_hooks.snapshot import HostSnapshot

_MARK = {checks.OK: "ok", checks.WARN: "warn", checks.FAIL: "FAIL"}


@click.command(short_help="Is this host ready; what can each GPU do.")
@root_option
@json_option
@click.pass_obj
def check(env: Env, root: Path, as_json: bool) -> None:
    """Is this host ready for GPU passthrough, and what can each GPU do.

    Checks CPU virtualization, IOMMU, kvm and vfio, hugepages, hugetlbfs,
    libvirt, the installed hook and the agent, then gives each GPU a verdict:
    ready for passthrough (a second GPU), for single-GPU (the one driving
    the desktop), or why not. Exit status 0 when the host is ready, 3 when it
    looks ready but not everything could be read (run as root).
    """
    host = env.host(root)
    probe = checks.Probe(env.runner, env.service_control(), env.is_live(root))
    report = checks.run_check(host, probe)
    reserved = reservations(host)
    gap = incomplete(host)
    if as_json:
        data = {**report.to_json(), "incomplete": gap}
        for gpu in data["gpus"]:
            gpu["reserved"] = gpu["slot"] in reserved
        emit_json(data)
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
            if g.slot in reserved:
                click.echo(f"    reserved:  for VMs from boot on ('janus-hooks unreserve {g.slot}' to undo)")
            click.echo(f"    verdict:   {v.summary()}")
            for note in v.notes:
                click.echo(f"    note:      {note}")
        fails = sum(1 for c in report.checks if c.status == checks.FAIL)
        if report.ready:
            click.echo("The host is ready.")
        else:
            reasons = f"{fails} failed check(s)" if fails else "no GPU is ready"
            click.echo(f"The host is not ready: {reasons}.")
        if gap:
            click.echo(gap)
    if not report.ready:
        sys.exit(1)
    if gap:
        sys.exit(INCOMPLETE)


@click.command(short_help="GPUs, their IOMMU groups, drivers and users.")
@root_option
@json_option
@click.pass_obj
def devices(env: Env, root: Path, as_json: bool) -> None:
    """GPUs, their functions and IOMMU groups, drivers, and who holds them.

    For each GPU: every function of the card, every member of its IOMMU
    group (a group must go to a VM whole; bridges excepted), the driver each
    is bound to, processes using the GPU, and the VM whose journal holds it.
    Exit status 3 when not everything could be read (run as root).
    """
    host = env.host(root)
    snap = HostSnapshot.read(host, claims=JournalStore(host.state_dir(), listdir=host.list_dir).claims())
    found = checks.inventory(snap)
    reserved = reservations(host)
    for gpu in found:
        gpu["reserved"] = gpu["slot"] in reserved
    gap = incomplete(host)
    if as_json:
        emit_json({"gpus": found, "incomplete": gap})
    elif not found:
        click.echo("No GPU (display-class PCI device) found.")
    else:
        _show_devices(found)
    if gap:
        if not as_json:
            click.echo(gap)
        sys.exit(INCOMPLETE)


def _show_devices(found: list[dict[str, Any]]) -> None:
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
        if gpu["reserved"]:
            click.echo("  reserved for VMs from boot on (udev rule; 'janus-hooks unreserve' to undo)")


@click.command(short_help="Dry run: what starting VM would change.")
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
    start would be refused, 3 when not everything could be read (run as root).
    """
    xml = xml_file.read() if xml_file else domain_xml(env, vm, uri)
    spec = parse_domain(xml)
    if spec.name != vm:
        raise Failure(f"the domain XML defines VM {spec.name!r}, not {vm!r}")
    host = env.host(root)
    result = env.make_janus(host).plan(spec)
    gap = incomplete(host)
    if as_json:
        emit_json({**result.to_json(), "incomplete": gap})
    else:
        click.echo(result.render())
        if gap:
            click.echo(gap)
    if result.refusal:
        sys.exit(1)
    if gap:
        sys.exit(INCOMPLETE)
