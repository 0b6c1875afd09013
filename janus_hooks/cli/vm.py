"""``vm``: create a guest from janus-hooks' libvirt templates (guided or by flags), list and delete them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from janus_hooks.cli.common import Env, Failure, confirm, connect_option, emit_json, json_option, root_option
from janus_hooks.config import Config
from janus_hooks.errors import JanusError
from janus_hooks.host import Host
from janus_hooks.vm import apply as vmapply
from janus_hooks.vm import values
from janus_hooks.vm.build import build_domain
from janus_hooks.vm.request import (
    OS_KINDS,
    STORAGE_KINDS,
    VIDEO_MODES,
    VIRT_TYPES,
    VmPlan,
    VmRequest,
    check_block,
    check_gpu,
    check_memory,
    check_vcpus,
    default_memory,
    default_vcpus,
    resolve,
)
from janus_hooks.vm.unattend import autounattend, iso_image
from janus_hooks.vm.values import VmError, human_size


@click.group(short_help="Create, list and delete janus-hooks VMs.")
def vm() -> None:
    """Create a guest from janus-hooks' libvirt templates, already managed; list and delete them."""


def _checked(check: Callable[..., Any], *args: Any) -> Callable[[str], Any]:
    """A click value_proc: a refused answer is asked again with the reason."""
    def proc(text: str) -> Any:
        try:
            return check(text, *args)
        except VmError as err:
            raise click.UsageError(str(err)) from err
    return proc


@vm.command(short_help="Create a VM: passthrough, single-gpu, shared-vram or cpu-only.")
@click.argument("name")
@root_option
@click.option("--mode", type=click.Choice(VIDEO_MODES), help="Video profile: passthrough (a second GPU), "
              "single-gpu (the host's only GPU), shared-vram (mdev/SR-IOV, or virtio-gpu 3D for Linux), "
              "cpu-only (an emulated display, not managed).")
@click.option("--gpu", metavar="ADDR", help="The GPU for the VM (e.g. 01:00.0); every function of the card goes.")
@click.option("--gpu-audio", metavar="ADDR", help="The GPU's audio function when it is not on the same slot.")
@click.option("--iso", metavar="PATH", help="Installation ISO.")
@click.option("--os", "os_kind", type=click.Choice(OS_KINDS), help="Guest OS (default win11: TPM 2.0, Secure Boot).")
@click.option("--virtio-iso", metavar="PATH", help="virtio-win drivers ISO (Windows needs it for the virtio disk).")
@click.option("--memory", metavar="SIZE", help="RAM, e.g. 8GiB (default: half the host's, 4-16 GiB).")
@click.option("--vcpus", type=click.IntRange(1, 512), help="vCPUs (default: half the host's CPUs, at most 8).")
@click.option("--cpu-pin", metavar="LIST", help="Pin vCPU i to the i-th host CPU of LIST (e.g. 2-5).")
@click.option("--hugepages/--no-hugepages", default=None, help="Back RAM with hugepages (janus-hooks allocates "
              "them when the VM starts).")
@click.option("--storage", type=click.Choice(STORAGE_KINDS), help="file: a qcow2 volume (or --disk IMAGE); "
              "block: a whole disk or partition (--disk /dev/...).")
@click.option("--pool", default="default", show_default=True, help="Storage pool for new volumes (default: "
              "created as a directory pool when missing).")
@click.option("--disk", metavar="PATH", help="An existing image (file) or a device under /dev (block).")
@click.option("--disk-size", metavar="SIZE", help="Size of a new volume (default 64GiB).")
@click.option("--unattend-user", metavar="NAME", help="Unattended Windows setup with this local account.")
@click.option("--unattend-password-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Read the account's password from this file (else asked without echo).")
@click.option("--network", default="default", show_default=True, help="libvirt network, or 'user' for QEMU's "
              "user-mode network.")
@click.option("--virt-type", type=click.Choice(VIRT_TYPES), default="kvm", show_default=True,
              help="kvm, or qemu (emulation: tests, hosts without KVM).")
@click.option("--stealth/--no-stealth", default=True, help="Hide the hypervisor (passthrough, single-gpu).")
@click.option("--guided/--no-guided", default=None, help="Ask step by step (default on a terminal).")
@click.option("--apply", "do_apply", is_flag=True, help="Create it (default: show what would be created).")
@click.option("--yes", "-y", is_flag=True, help="With --apply: do not ask.")
@connect_option
@click.pass_obj
def create(env: Env, name: str, root: Path, mode: str | None, gpu: str | None, gpu_audio: str | None,
           iso: str | None, os_kind: str | None, virtio_iso: str | None, memory: str | None, vcpus: int | None,
           cpu_pin: str | None, hugepages: bool | None, storage: str | None, pool: str, disk: str | None,
           disk_size: str | None, unattend_user: str | None, unattend_password_file: Path | None, network: str,
           virt_type: str, stealth: bool, guided: bool | None, do_apply: bool, yes: bool, uri: str) -> None:
    """Create VM NAME from janus-hooks' libvirt templates: q35, OVMF (Secure Boot when the firmware offers
    it), TPM 2.0 for Windows 11, virtio disk and network, the GPU and janus-hooks' metadata for its mode.

    Without --apply it only shows the definition and what it would create. On a terminal it asks step by
    step (--no-guided: flags only), then shows the summary and asks before creating.
    """
    host = env.host(root)
    guided = env.interactive() if guided is None else guided
    try:
        request = VmRequest(
            name=values.vm_name(name), mode=mode or "", iso=_path(iso, "--iso"), os=os_kind or "win11",
            virtio_iso=_path(virtio_iso, "--virtio-iso"), gpu=_pci(gpu), gpu_audio=_pci(gpu_audio),
            memory=values.size_bytes(memory, "--memory") if memory else None, vcpus=vcpus,
            cpu_pin=tuple(values.cpu_list(cpu_pin)) if cpu_pin else (), hugepages=bool(hugepages),
            storage=storage or "file", pool=values.libvirt_name(pool, "storage pool"), disk=disk,
            disk_size=values.size_bytes(disk_size, "--disk-size") if disk_size else 64 * 1024**3,
            unattend_user=values.windows_user(unattend_user) if unattend_user else None,
            virt_type=virt_type, stealth=stealth,
            network=network if network == "user" else values.libvirt_name(network, "network"))
    except VmError as err:
        raise Failure(str(err)) from err
    if guided:
        request = _ask(host, request, gave={"mode": mode, "gpu": gpu, "iso": iso, "os": os_kind, "memory": memory,
                                            "vcpus": vcpus, "hugepages": hugepages, "storage": storage,
                                            "disk": disk, "disk_size": disk_size, "unattend": unattend_user})
    else:
        missing = [flag for flag, value in (("--mode", request.mode), ("--iso", request.iso)) if not value]
        if missing:
            raise Failure(f"{' and '.join(missing)} required (or answer step by step on a terminal: --guided)")
    plan = resolve(request, host, Config())  # everything checked before the password is asked
    if request.unattend_user and request.unattend_password is None:
        request = replace(plan.request, unattend_password=_password(env, guided, unattend_password_file,
                                                                    request.unattend_user))
        plan = replace(plan, request=request)
    target = env.libvirt(uri, not do_apply, lambda conn: vmapply.inspect(conn, plan))
    place = vmapply.placement(plan, target)
    xml = build_domain(plan, place)
    _summary(plan, target, place)
    if not do_apply and not guided:
        click.echo("\nThe domain definition:")
        click.echo(xml, nl=False)
        click.echo(f"\nNothing was created. Add --apply to create VM {request.name!r}.")
        return
    if guided and not do_apply:
        if not click.confirm(f"Create VM {request.name!r} now?", default=True):
            click.echo("Nothing was created.")
            return
    else:
        confirm(env, yes, f"Create VM {request.name!r}?")
    iso_data = None
    if request.unattend_user:
        iso_data = iso_image({"Autounattend.xml": autounattend(request.name, request.unattend_user,
                                                               request.unattend_password or "")})
    made = env.libvirt(uri, False, lambda conn: vmapply.create(conn, plan, target, place, xml, iso_data))
    for item in made:
        click.echo(f"Created {item}.")
    click.echo(f"Next: open virt-manager, select {request.name!r} and press Run{_what_a_start_does(plan)}.")


def _what_a_start_does(plan: VmPlan) -> str:
    if plan.managed:
        return " (janus-hooks frees the GPU when it starts)"
    if plan.shared is None or plan.shared.kind == "virgl":
        return ""
    made = "mediated device" if plan.shared.kind == "mdev" else "virtual function"
    return f" (janus-hooks makes its {made} when it starts)"


def _path(text: str | None, flag: str) -> str | None:
    return values.absolute_path(str(Path(text).absolute()), flag) if text else None


def _pci(text: str | None) -> str | None:
    return values.pci_address(text) if text else None


def _password(env: Env, guided: bool, path: Path | None, user: str) -> str:
    if path is not None:
        try:
            text = path.read_text().rstrip("\n")
        except OSError as err:
            raise Failure(f"--unattend-password-file {path}: {err.strerror}") from err
        try:
            return values.password(text)
        except VmError as err:
            raise Failure(f"--unattend-password-file {path}: {err}") from err
    if not (guided or env.interactive()):
        raise Failure(f"--unattend-user {user} needs --unattend-password-file without a terminal")
    return click.prompt(f"Password for {user} (not shown)", hide_input=True, confirmation_prompt=True,
                        value_proc=_checked(values.password))


def _ask(host: Host, req: VmRequest, gave: dict[str, Any]) -> VmRequest:
    """The three steps: installation media; resources, video profile and storage; the unattended account."""
    click.echo("Step 1 of 3: installation media")
    if not gave["iso"]:
        req = replace(req, iso=click.prompt("Installation ISO", value_proc=_checked(_existing_file, "ISO")))
    if not gave["os"]:
        req = replace(req, os=click.prompt("Guest OS", type=click.Choice(OS_KINDS), default=req.os))
    if req.windows and not req.virtio_iso:
        answer = click.prompt("virtio drivers ISO (empty: none)", default="", show_default=False,
                              value_proc=_checked(_optional_file, "virtio ISO"))
        req = replace(req, virtio_iso=answer or None)

    click.echo("Step 2 of 3: resources, video profile, storage")
    if not gave["memory"]:
        memory = click.prompt("RAM", default=human_size(default_memory(host)).replace(" ", ""),
                              value_proc=_checked(_ram, req.os, host))
        req = replace(req, memory=memory)
    if not gave["vcpus"]:
        req = replace(req, vcpus=click.prompt("vCPUs", default=default_vcpus(host),
                                              value_proc=_checked(_vcpus, host)))
    while True:
        if not gave["mode"]:
            req = replace(req, mode=click.prompt("Video profile", type=click.Choice(VIDEO_MODES),
                                                 default="passthrough" if _display_count(host) > 1 else "cpu-only"))
        if req.mode in ("passthrough", "single-gpu", "shared-vram") and not gave["gpu"]:
            display = [d for d in host.pci_devices() if d.is_display]
            if display:
                click.echo("GPUs: " + ", ".join(f"{d.address}{' (boot VGA)' if d.boot_vga else ''}"
                                                for d in display))
                # passthrough takes the GPU the desktop does not boot on; single-gpu and shared-vram the desktop's.
                wanted = [d for d in display if d.boot_vga == (req.mode != "passthrough")] or display
                req = replace(req, gpu=click.prompt("GPU", default=wanted[0].address,
                                                    value_proc=_checked(_gpu, [d.address for d in display])))
        elif not gave["gpu"]:
            req = replace(req, gpu=None)
        try:
            check_gpu(req, host)
            break
        except VmError as err:
            if gave["mode"] and (gave["gpu"] or _display_count(host) < 2):  # nothing left to choose
                raise Failure(str(err)) from err
            # The GPU cannot serve this profile (or the host has none for it): choose again, knowing why.
            click.echo(f"Error: {err}", err=True)
    if gave["hugepages"] is None:
        req = replace(req, hugepages=click.confirm("Back the RAM with hugepages?", default=req.mode != "cpu-only"))
    if not gave["storage"]:
        req = replace(req, storage=click.prompt("Storage", type=click.Choice(STORAGE_KINDS), default="file"))
    if req.storage == "block" and not gave["disk"]:
        req = replace(req, disk=click.prompt("Disk or partition (/dev/...)",
                                             value_proc=_checked(_block, host)))
    elif req.storage == "file" and not gave["disk"] and not gave["disk_size"]:
        req = replace(req, disk_size=click.prompt("Disk size", default="64GiB",
                                                  value_proc=_checked(values.size_bytes, "disk size")))

    click.echo("Step 3 of 3: unattended setup")
    if req.windows and not gave["unattend"]:
        user = click.prompt("Local account for unattended setup (empty: install by hand)", default="",
                            show_default=False, value_proc=_checked(_optional_user))
        if user:
            req = replace(req, unattend_user=user)
    return req


def _gpu(text: str, present: list[str]) -> str:
    address = values.pci_address(text)
    if address not in present:
        raise VmError(f"no GPU {address} on this host (GPUs: {', '.join(present)})")
    return address


def _ram(text: str, os_kind: str, host: Host) -> int:
    return check_memory(values.size_bytes(text, "RAM"), os_kind, host)


def _vcpus(text: str, host: Host) -> int:
    try:
        number = int(text)
    except ValueError as err:
        raise VmError(f"{text!r} is not a number of vCPUs") from err
    return check_vcpus(number, host)


def _block(text: str, host: Host) -> str:
    return check_block(values.absolute_path(text, "disk"), host)


def _existing_file(text: str, what: str) -> str:
    path = values.absolute_path(str(Path(text).expanduser().absolute()), what)
    if not Path(path).is_file():
        raise VmError(f"{what} {path} does not exist or is not a file")
    return path


def _optional_file(text: str, what: str) -> str:
    return _existing_file(text, what) if text.strip() else ""


def _optional_user(text: str) -> str:
    return values.windows_user(text) if text else ""


def _display_count(host: Host) -> int:
    return sum(1 for d in host.pci_devices() if d.is_display)


def _summary(plan: VmPlan, target: vmapply.Target, place: Any) -> None:
    req = plan.request
    click.echo(f"VM {req.name}: {req.os}, {req.mode}, {human_size(plan.memory)} RAM"
               f"{' (hugepages)' if req.hugepages else ''}, {plan.vcpus} vCPU(s)"
               f"{' pinned to ' + ','.join(map(str, req.cpu_pin)) if req.cpu_pin else ''}, {req.virt_type}")
    firmware = "OVMF with Secure Boot" if plan.secure_boot else "OVMF"
    click.echo(f"  firmware:  {firmware}{', TPM 2.0 (swtpm)' if plan.tpm else ''}")
    if plan.gpu_functions:
        click.echo(f"  GPU:       {', '.join(plan.gpu_functions)} (janus-hooks mode {req.mode})")
    elif plan.shared:
        shared = plan.shared
        click.echo("  display:   " + (
            f"mediated device {shared.mdev_uuid} ({shared.mdev_type}) of GPU {shared.parent}" if shared.kind == "mdev"
            else f"virtual function {shared.vf_address} of GPU {shared.parent}" if shared.kind == "vf"
            else f"virtio-gpu with 3D acceleration (virgl) rendered by GPU {shared.parent or '(none found)'}, "
                 "not managed by janus-hooks"))
    else:
        click.echo("  display:   virtio (SPICE), not managed by janus-hooks")
    click.echo(f"  install:   {req.iso}{' + ' + req.virtio_iso if req.virtio_iso else ''}")
    if req.storage == "block":
        click.echo(f"  disk:      {place.disk_path} (whole device)")
    elif req.disk:
        click.echo(f"  disk:      {place.disk_path} ({plan.disk_format}, existing)")
    else:
        click.echo(f"  disk:      {place.disk_path} (new qcow2 volume, {human_size(req.disk_size)}, pool {req.pool})")
    if target.create_pool:
        click.echo(f"  pool:      creates storage pool {vmapply.DEFAULT_POOL} at {vmapply.DEFAULT_POOL_PATH}")
    if place.unattend_iso:
        click.echo(f"  unattend:  {place.unattend_iso}, account {req.unattend_user}: this ISO holds the password "
                   "in clear text (mode 0600; 'janus-hooks vm delete' removes it)")
    for note in plan.notes:
        click.echo(f"  note:      {note}")


@vm.command("list", short_help="VMs janus-hooks manages or made.")
@json_option
@connect_option
@click.pass_obj
def list_vms(env: Env, as_json: bool, uri: str) -> None:
    """VMs janus-hooks manages (profile metadata) or 'vm create' made: mode, GPU, state."""
    vms = env.libvirt(uri, True, vmapply.managed_vms)
    if as_json:
        emit_json([{"name": v.name, "active": v.active, "mode": v.mode, "video": v.video, "gpu": list(v.gpu),
                    "volumes": [vol.path for vol in v.volumes]} for v in vms])
        return
    if not vms:
        click.echo("No VM is managed by janus-hooks.")
        return
    click.echo(f"{'NAME':<24} {'STATE':<8} {'MODE':<12} GPU")
    for v in vms:
        click.echo(f"{v.name:<24} {'running' if v.active else 'off':<8} {v.mode or v.video or '-':<12} "
                   f"{', '.join(v.gpu) or '-'}")


@vm.command(short_help="Undefine a VM that 'vm create' made.")
@click.argument("name")
@click.option("--storage", is_flag=True, help="Also delete its disk volume (never a block device's data).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask.")
@connect_option
@click.pass_obj
def delete(env: Env, name: str, storage: bool, yes: bool, uri: str) -> None:
    """Undefine VM NAME (made by 'vm create'), its unattend ISO, and with --storage its disk volume."""
    _vm, steps = env.libvirt(uri, True, lambda conn: vmapply.delete_steps(conn, name, storage))
    click.echo(f"'janus-hooks vm delete {name}' will:")
    for step in steps:
        click.echo(f"  {step}")
    confirm(env, yes, f"Delete VM {name!r}?")
    try:
        env.libvirt(uri, False, lambda conn: vmapply.delete(conn, name, storage))
    except JanusError as err:
        raise Failure(str(err)) from err
    click.echo(f"VM {name!r} deleted.")
