"""Telling the person at seat0 why a start failed: a freedesktop notification in their session.

In single-GPU mode virt-manager dies with the desktop, so libvirt's error reaches nobody. Once a graphical
session is active on seat0 again, the agent calls ``Notify`` on the user's session bus through
``busctl --user --machine=UID@.host`` (systemd enters the user's context; no D-Bus library needed here).
"""

from __future__ import annotations

import logging

from janus_hooks.failures import StartFailure
from janus_hooks.host import Host, Runner, Session
from janus_hooks.host.runner import check

log = logging.getLogger(__name__)

NOTIFY_TIMEOUT = 10.0
APP_NAME = "janus-hooks"


def notify_argv(uid: int, summary: str, body: str) -> list[str]:
    # "--": busctl's getopt would take the -1 (no expiry) or a reason starting with "-" for options.
    return ["busctl", "--user", f"--machine={uid}@.host", "--", "call",
            "org.freedesktop.Notifications", "/org/freedesktop/Notifications", "org.freedesktop.Notifications",
            "Notify", "susssasa{sv}i", APP_NAME, "0", "dialog-error", summary, body, "0", "0", "-1"]


class DesktopNotifier:
    def __init__(self, host: Host, runner: Runner, timeout: float = NOTIFY_TIMEOUT) -> None:
        self.host = host
        self.runner = runner
        self.timeout = timeout

    def seat0_session(self) -> Session | None:
        """The active graphical session on seat0, if the desktop is back."""
        for session in self.host.sessions():
            if session.seat == "seat0" and session.active and session.graphical and session.uid >= 0:
                return session
        return None

    def notify(self, session: Session, failure: StartFailure) -> None:
        """Show ``failure``'s one line; raises CommandFailed naming busctl's error."""
        summary = f"VM {failure.vm} did not start"
        check(self.runner.run(notify_argv(session.uid, summary, failure.reason), self.timeout))
        log.info("VM %s: told uid %d (session %s) why its start failed", failure.vm, session.uid, session.id)
