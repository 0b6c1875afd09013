"""``janus-hooks``: set a host up once, see what a VM start will do, and undo. Everything else is the hook's.

Every command takes ``--root DIR`` (default ``/``, or ``$JANUS_HOOKS_ROOT``) and acts on the host tree below
it. Commands that change anything refuse to run without root. Failures are one line each, naming the path,
device, unit or VM, with a non-zero exit status. ``--json`` output is documented in docs/cli-json.md.

One module per command family; ``common`` holds what they share (``Env``, ``Failure``, the options).
"""

from __future__ import annotations

import importlib

import click

import janus_hooks
from janus_hooks.cli.common import Env, Failure, JanusGroup

__all__ = ["Env", "Failure", "cli", "main"]

# Each command: the module of janus_hooks.cli that defines it and its name there. A command's module is
# imported when that command runs (or help lists it): the agent, which runs for the host's lifetime, does
# not carry the installer, vm create's templates or the planner.
COMMANDS = {
    "install": ("setup", "install"), "uninstall": ("setup", "uninstall"),
    "check": ("diagnose", "check"), "devices": ("diagnose", "devices"), "plan": ("diagnose", "plan"),
    "profile": ("profile", "profile"), "vm": ("vm", "vm"),
    "reserve": ("reserve", "reserve"), "unreserve": ("reserve", "unreserve"),
    "journal": ("journal", "journal"), "rollback": ("journal", "rollback"),
    "status": ("status", "status"), "agent": ("agent", "agent"),
}


class LazyGroup(JanusGroup):
    """``janus-hooks``' group: commands from COMMANDS, each module imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, name = COMMANDS[cmd_name]
        command = getattr(importlib.import_module(f"janus_hooks.cli.{module}"), name)
        assert isinstance(command, click.Command) and command.name == cmd_name, (cmd_name, command)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
