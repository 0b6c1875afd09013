"""``janus-hooks``: set a host up once, see what a VM start will do, and undo. Everything else is the hook's.

Every command takes ``--root DIR`` (default ``/``, or ``$JANUS_HOOKS_ROOT``) and acts on the host tree below
it. Commands that change anything refuse to run without root. Failures are one line each, naming the path,
device, unit or VM, with a non-zero exit status. ``--json`` output is documented in docs/cli-json.md.

One module per command family; ``common`` holds what they share (``Env``, ``Failure``, the options).
"""

from __future__ import annotations

import click

import janus_hooks
from janus_hooks.cli import agent, diagnose, journal, profile, reserve, setup, status, vm
from janus_hooks.cli.common import Env, Failure, JanusGroup

__all__ = ["Env", "Failure", "cli", "main"]


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


for _command in (setup.install, setup.uninstall, diagnose.check, diagnose.devices, diagnose.plan,
                profile.profile, vm.vm, reserve.reserve, reserve.unreserve, journal.journal, journal.rollback,
                status.status, agent.agent):
    cli.add_command(_command)


def main(argv: list[str] | None = None, prog_name: str = "janus-hooks") -> None:
    """Console script entry point."""
    cli.main(args=argv, prog_name=prog_name, obj=Env())
