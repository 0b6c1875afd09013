"""``agent``: the event agent's entry point (run by janus-hooks-agent.service)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from janus_hooks.cli.common import DEFAULT_URI, Env, root_option


@click.command(short_help="The event agent (run by janus-hooks-agent.service).")
@root_option
@click.option("--connect", "uri", default=DEFAULT_URI, show_default=True, metavar="URI",
              help="libvirt connection whose lifecycle events to follow.")
@click.option("--no-libvirt", is_flag=True, help="Do not connect to libvirt; follow QEMU processes only.")
@click.option("--udev-source", type=click.Choice(["auto", "udev", "kernel", "off"]), default="auto",
              show_default=True, help="Device events: udevd's (after its rules) or the kernel's raw uevents.")
@click.option("--release-grace", type=float, default=5.0, show_default=True, metavar="SECONDS",
              help="After libvirt reports a VM stopped, how long its own release hook gets before the agent "
                   "rolls back.")
@click.pass_obj
def agent(env: Env, root: Path, uri: str, no_libvirt: bool, udev_source: str, release_grace: float) -> None:
    """Event agent: heal what the hooks cannot see.

    Follows libvirt's lifecycle events, the QEMU of every VM with an open
    journal, device events and changes to the config. Rolls back a VM whose
    QEMU is gone while its journal is still open (libvirtd killed, a crash),
    reports devices that are not where a running VM's journal says, and shows
    a failed start on the desktop once it is back. Runs until SIGTERM; tells
    systemd when it is ready and pings its watchdog.
    """
    # Imported here: every other command starts without asyncio and the agent's sources.
    import asyncio

    from janus_hooks.agent import Agent, AgentOptions
    from janus_hooks.agent.desktop import DesktopNotifier

    env.require_root("agent")
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    host = env.host(root)
    options = AgentOptions(uri=uri, libvirt=not no_libvirt, udev=None if udev_source == "off" else udev_source,
                           release_grace=release_grace)

    def make_janus(config):
        # Imported at the first rollback: an idle agent does not carry the engine and its actions.
        from janus_hooks.runtime import Janus

        return Janus.open(host, services=env.services, runner=env.runner, restoring=True, config=config)

    daemon = Agent(host, options, make_janus, notifier=DesktopNotifier(host, env.runner))
    asyncio.run(daemon.run())
