"""The last failed start of each VM, kept where ``status`` and the agent can read it.

In single-GPU mode the person's virt-manager dies with the desktop, so the one line libvirt shows for a
refused or failed start is seen by nobody. The hook records it here (root-owned, 0700 directory, one JSON
file per VM); ``status`` prints it and the agent shows it on the desktop once a graphical session is back.
A later start that succeeds (libvirt's ``started`` phase, or its STARTED event seen by the agent) clears it:
the record is the time and reason of a failure that still stands, not a history.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from janus_hooks.errors import JanusError
from janus_hooks.files import atomic_write, check_trusted, ensure_private_dir, fsync_dir
from janus_hooks.layout import vm_filename, vm_from_filename

log = logging.getLogger(__name__)

SUFFIX = ".json"


@dataclass(frozen=True)
class StartFailure:
    vm: str
    time: float
    reason: str  # the one line libvirt carried in its error
    notified: bool = False  # shown on the desktop already


class FailureStore:
    """``<state dir>/failures/<vm>.json``: the last failed start of each VM."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.dir = state_dir / "failures"

    def path(self, vm: str) -> Path:
        return self.dir / f"{vm_filename(vm)}{SUFFIX}"  # layout.failure_file, for the hook's fast path

    def record(self, vm: str, reason: str, when: float | None = None) -> StartFailure:
        failure = StartFailure(vm, time.time() if when is None else when, reason)
        self._write(failure)
        return failure

    def mark_notified(self, failure: StartFailure) -> None:
        current = self.read(failure.vm)
        if current == failure:  # a newer failure written meanwhile keeps its own flag
            self._write(replace(failure, notified=True))

    def clear(self, vm: str, started: float) -> StartFailure | None:
        """Forget the VM's failed start if it happened before a start that succeeded at ``started``.

        A record newer than that start (written by a later attempt) stands; returns the record cleared.
        """
        current = self.read(vm)
        if current is None or current.time > started:
            return None
        try:
            self.path(vm).unlink()
        except FileNotFoundError:
            return None
        fsync_dir(self.dir)
        return current

    def read(self, vm: str) -> StartFailure | None:
        path = self.path(vm)
        try:
            check_trusted(self.dir)
            check_trusted(path)
            data = json.loads(path.read_text())
            return StartFailure(str(data["vm"]), float(data["time"]), str(data["reason"]), bool(data.get("notified")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, JanusError) as err:
            log.warning("ignoring the failure record %s: %s", path, err)
            return None

    def all(self) -> dict[str, StartFailure]:
        try:
            names = sorted(os.listdir(self.dir))
        except OSError:
            return {}
        found = {}
        for name in names:
            if name.endswith(SUFFIX):
                failure = self.read(vm_from_filename(name[: -len(SUFFIX)]))
                if failure is not None:
                    found[failure.vm] = failure
        return found

    def _write(self, failure: StartFailure) -> None:
        ensure_private_dir(self.state_dir)
        ensure_private_dir(self.dir)
        data = json.dumps(asdict(failure), sort_keys=True) + "\n"
        atomic_write(self.path(failure.vm), data.encode(), mode=0o600)
