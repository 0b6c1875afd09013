"""``python -m janus_hooks``: what the systemd units run, so they need no console script on PATH."""

from janus_hooks.cli import main

main(prog_name="janus-hooks")
