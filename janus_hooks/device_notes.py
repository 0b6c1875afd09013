"""Devices that came or went while the host ran, as the agent saw them: kept for ``status``.

The agent notes GPUs added and removed, what it did with a hot-added reserved GPU, and a device an open
journal holds that left the bus; ``status`` shows the last few. One JSON file in the state dir (0600), the
last KEEP notes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from janus_hooks.errors import JanusError
from janus_hooks.files import atomic_write, check_trusted, ensure_private_dir

log = logging.getLogger(__name__)

KEEP = 20  # notes kept for status
NOTES_FILE = "devices.json"


@dataclass(frozen=True)
class DeviceNote:
    time: float
    address: str
    event: str  # added, removed
    detail: str  # one line: what it is and what the agent did
    vm: str | None = None  # the VM whose journal holds it

    def line(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.time))
        return f"{when} {self.address} {self.event}: {self.detail}"


class DeviceNotes:
    """``<state dir>/devices.json``: the last KEEP device events the agent acted on or reported."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / NOTES_FILE

    def all(self) -> list[DeviceNote]:
        try:
            check_trusted(self.path)
            data = json.loads(self.path.read_text())
            return [DeviceNote(float(d["time"]), str(d["address"]), str(d["event"]), str(d["detail"]),
                               d.get("vm") if isinstance(d.get("vm"), str) else None) for d in data]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError, JanusError) as err:
            log.warning("ignoring the device notes %s: %s", self.path, err)
            return []

    def add(self, note: DeviceNote) -> None:
        notes = [*self.all(), note][-KEEP:]
        ensure_private_dir(self.state_dir)
        data = json.dumps([asdict(n) for n in notes], sort_keys=True) + "\n"
        atomic_write(self.path, data.encode(), mode=0o600)
