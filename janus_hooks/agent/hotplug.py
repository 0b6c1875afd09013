"""GPUs that come and go while the host runs: an eGPU plugged in, a card that fell off the bus.

- A function of a GPU reserved for VMs (``janus-hooks reserve``) that is hot-added goes to vfio-pci, as the
  reservation's udev rule would have done: without udevd (the kernel source) or when the rule did not apply,
  the agent writes ``driver_override`` (transient: gone with the device; the rule file stays the only
  persistent change) and probes it. A host driver that got there first is unbound only while nothing holds
  the function's nodes.
- A device that an open journal holds and that leaves the bus is named with its VM.

What happened is kept for ``status`` (``device_notes``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from janus_hooks.errors import JanusError
from janus_hooks.host import Host

log = logging.getLogger(__name__)

VFIO = "vfio-pci"
VFIO_MODULE = "vfio_pci"


class HotplugError(JanusError):
    """A hot-added reserved GPU function that could not be put on vfio-pci; the message names it and why."""


def reserved_slot(host: Host, address: str) -> str | None:
    """The reserved GPU (slot) ``address`` is a function of, if any."""
    # Imported here: reading reservations needs the host model; an idle agent does not carry it.
    from janus_hooks.reserve import reserved_slot as slot_of

    return slot_of(host, address)


def claim_reserved(host: Host, address: str, timeout: float,
                   clock: Callable[[], float] = time.monotonic) -> str:
    """Put a hot-added function of a reserved GPU on vfio-pci; returns what was done, in a few words.

    Transient, like the hook's binding: ``driver_override`` and a probe, never ``new_id``.
    Raises HotplugError naming the function when it cannot.
    """
    driver = host.pci_driver(address)
    if driver == VFIO:
        return "on vfio-pci (udev's rule applied)"
    if driver is not None:
        held = host.holders_of(host.function_nodes(address))
        if held:
            raise HotplugError(f"{address} (reserved for VMs) was taken by {driver} and is held by "
                               f"{held[0].describe()}: not unbinding it while it is (the reservation "
                               "applies at the next boot)")
    rule_ran = host.pci_driver_override(address) == VFIO
    try:
        if not rule_ran:
            host.kernel.write(host.pci_dir(address) / "driver_override", VFIO)
        if driver is not None:
            host.kernel.write(host.pci_driver_dir(driver) / "unbind", address)
        if host.pci_driver_loaded(VFIO):
            host.kernel.write(host.pci_probe_path(), address)
        else:
            host.kernel.load_module(VFIO_MODULE)  # vfio-pci binds what names it in driver_override as it loads
    except JanusError as err:
        raise HotplugError(f"{address} (reserved for VMs): {err}") from err
    start, delay = clock(), 0.002
    while host.pci_driver(address) != VFIO:  # a probe "succeeds" with nothing bound: the link is the truth
        if clock() - start >= timeout:
            now = host.pci_driver(address) or "no driver"
            raise HotplugError(f"{address} (reserved for VMs) did not bind to {VFIO} within {timeout:g} s "
                               f"(driver now: {now})")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    if driver and rule_ran:  # the kernel probed the new device before udevd ran the rule
        return f"put on vfio-pci by the agent ({driver} bound it before udev's rule ran)"
    took = f", taken from {driver}" if driver else ""
    return f"put on vfio-pci by the agent (udev's rule did not apply{took})"
