"""``profile``: mark a VM as managed, in its libvirt definition or in a TOML profile."""

from __future__ import annotations

from pathlib import Path

import click

from janus_hooks.cli.common import Env, Failure, confirm, connect_option, domain_xml, root_option, warn
from janus_hooks.config import RESET_RISKS, profile_path
from janus_hooks.domain import MODES, parse_domain
from janus_hooks.domain_edit import edit_domain, edit_profile_toml, text_diff, xml_diff
from janus_hooks.files import atomic_write
from janus_hooks.host import Host


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


@click.command(short_help="Mark VM as managed: single-gpu, passthrough.")
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
@click.option("--isolate/--no-isolate", default=None, help="Keep the host's work off the cores VM's vCPUs are "
              "pinned to while it runs (isolate=\"yes\"), or decline it when janus.toml isolates every pinned "
              "VM. Unchanged when not given.")
@click.option("--reset-risk", type=click.Choice(RESET_RISKS), default=None,
              help="A GPU that only resets with vendor-reset (AMD Polaris, Vega, Navi 10/12/14) while that module "
                   "is not loaded: refuse the single-gpu start (the default) or accept the risk. Recorded in the "
                   "TOML profile (with --toml).")
@click.option("--toml", is_flag=True, help="Record the mode in etc/janus-hooks/vms/VM.toml instead of the "
              "libvirt definition (libvirt is not contacted).")
@click.option("--yes", "-y", is_flag=True, help="Apply the change without asking.")
@connect_option
@click.pass_obj
def profile(env: Env, vm: str, root: Path, mode: str, gpus: tuple[str, ...], hugepages: bool | None,
            isolate: bool | None, reset_risk: str | None, toml: bool, yes: bool, uri: str) -> None:
    """Mark VM as managed by janus-hooks, in the mode it needs.

    Writes the janus-hooks metadata into VM's libvirt definition (virt-manager
    keeps it), adds a PCI hostdev for every function of each --gpu, and adds or
    removes hugepage backing. Shows a diff and asks before defining it.
    With --toml, writes etc/janus-hooks/vms/VM.toml instead (mode, isolate and reset-risk only).
    """
    env.require_root("profile")
    host = env.host(root)
    if toml:
        if gpus or hugepages is not None:
            raise Failure("--gpu and --hugepages change the libvirt definition; with --toml only the mode is "
                          "recorded (give the VM its GPU in virt-manager, or drop --toml)")
        _profile_toml(env, host, vm, mode, isolate, reset_risk, yes)
        return
    if reset_risk is not None:
        raise Failure("--reset-risk is recorded in the VM's TOML profile: add --toml (the libvirt definition "
                      "keeps its mode; the TOML profile adds the reset risk)")
    if mode == "none" and gpus:
        raise Failure("--gpu gives a managed VM its GPU; with --mode none it has no meaning")
    functions = _expand_gpus(host, gpus)
    current = domain_xml(env, vm, uri, for_define=True)
    new = edit_domain(current, mode, functions, hugepages, isolate)
    diff = xml_diff(current, new, vm)
    if not diff:
        click.echo(f"VM {vm!r} already has this profile; nothing to change.")
        return
    click.echo(diff, nl=False)
    confirm(env, yes, f"Define VM {vm!r} with these changes?")
    env.libvirt(uri, False, lambda conn: conn.defineXML(new))
    if mode == "none":
        click.echo(f"VM {vm!r} defined: no longer managed by janus-hooks (its hostdevs stay as they are).")
    else:
        click.echo(f"VM {vm!r} defined with janus-hooks mode {mode}.")
        spec = parse_domain(new)
        if spec.isolate and not spec.cpus.pinned:
            warn(f"VM {vm!r} asks for CPU isolation but its vCPUs are not pinned (<cputune><vcpupin>): "
                 "its start is refused until they are")
        if not spec.hostdevs:
            managed = "only its hugepages are managed" if spec.hugepages else "its start changes nothing on the host"
            warn(f"VM {vm!r} has no PCI hostdev: {managed}; add --gpu ADDR to give it a GPU")
        click.echo(f"Next: 'janus-hooks plan {vm}' shows what its start will change.")


def _profile_toml(env: Env, host: Host, vm: str, mode: str, isolate: bool | None, reset_risk: str | None,
                  yes: bool) -> None:
    path = profile_path(host.config_dir(), vm)
    current = path.read_text() if path.exists() else None
    new = edit_profile_toml(current, mode, isolate, reset_risk)
    if new == current:
        click.echo(f"VM {vm!r} has no TOML profile; nothing to change." if new is None
                   else f"{path} already says mode {mode}; nothing to change.")
        return
    click.echo(text_diff(current, new, str(path)), nl=False)
    confirm(env, yes, f"Write {path}?" if new is not None else f"Remove {path}?")
    if new is None:
        path.unlink()
        click.echo(f"Removed {path}: VM {vm!r} is no longer managed through a TOML profile.")
        return
    for directory in (host.config_dir(), path.parent):
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    atomic_write(path, new.encode(), mode=0o644)
    click.echo(f"Wrote {path}: VM {vm!r} is managed in mode {mode}.")
