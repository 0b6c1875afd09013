"""Device events through pyudev: GPUs appearing and vanishing, drivers binding, DRM cards coming back.

The ``udev`` source (events after udevd's rules, filtered in the kernel) needs a running udevd; without
one (containers, runit hosts) the ``kernel`` source gives the raw uevents. Either way the monitor's socket
sits on the agent's event loop: no thread, no timer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from janus_hooks.agent.events import DeviceEvent
from janus_hooks.host import Host

log = logging.getLogger(__name__)

SUBSYSTEMS = ("pci", "drm")


def choose_source(host: Host) -> str:
    return "udev" if host.udev_running() else "kernel"


def device_event(device: Any) -> DeviceEvent | None:
    """A pyudev Device from the monitor as a DeviceEvent; None for what the agent does not follow."""
    subsystem = device.subsystem
    if subsystem not in SUBSYSTEMS:
        return None
    if subsystem == "drm" and not (device.sys_name.startswith("card") and "-" not in device.sys_name):
        return None  # connectors (card0-HDMI-A-1) and render nodes say nothing new
    props = device.properties
    parent = None
    if subsystem == "drm":
        # /devices/pci0000:00/0000:00:02.0/drm/card0 -> 0000:00:02.0
        parts = device.device_path.split("/")
        parent = parts[-3] if len(parts) >= 3 else None
    return DeviceEvent(action=device.action or "", subsystem=subsystem, name=device.sys_name,
                       driver=props.get("DRIVER") or None, pci_class=props.get("PCI_CLASS"), parent=parent)


class UdevSource:
    def __init__(self, loop: asyncio.AbstractEventLoop, post: Callable[[object], None], source: str) -> None:
        self.loop = loop
        self.post = post
        self.source = source
        self._monitor: Any = None

    def start(self) -> None:
        import pyudev

        monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=self.source)
        for subsystem in SUBSYSTEMS:
            monitor.filter_by(subsystem)
        monitor.start()
        self._monitor = monitor
        self.loop.add_reader(monitor.fileno(), self._readable)
        log.info("devices: following %s events from the %s source", "/".join(SUBSYSTEMS), self.source)

    def stop(self) -> None:
        if self._monitor is not None:
            self.loop.remove_reader(self._monitor.fileno())
            self._monitor = None

    def _readable(self) -> None:
        while self._monitor is not None:
            try:
                device = self._monitor.poll(timeout=0)
            except OSError as err:  # a uevent burst overran the socket buffer: later events still come
                log.warning("devices: lost uevents (%s)", err)
                continue
            if device is None:
                return
            event = device_event(device)
            if event is not None:
                self.post(event)
