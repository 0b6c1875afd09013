"""``agent``: the event agent's entry point."""

from __future__ import annotations

from pathlib import Path

import click

from janus_hooks.cli.common import Failure, root_option


@click.command(short_help="The event agent (not implemented yet).")
@root_option
def agent(root: Path) -> None:
    """Event agent: heal what the hooks cannot see (not implemented yet).

    Will follow libvirt lifecycle events, udev and config changes. For now it
    exits with status 1 and starts nothing; the hook works without it.
    """
    raise Failure("the agent is not implemented yet; nothing was started (the hook works without it)")
