"""Vendor backends: what each GPU driver family needs beyond the generic steps.

The generic path is the same for every vendor (who holds the GPU decides what must stop, modules go in
``holders`` order, every function is bound to vfio-pci). A backend adds the services and device nodes
the vendor's stack is known to use, and whether its module may be unloaded at all.
"""

from __future__ import annotations

from typing import NamedTuple

from janus_hooks.host.sysfs import dev_node


class Backend(NamedTuple):
    """One vendor's driver family (a NamedTuple: defined by every hook process, cheaper than a dataclass)."""

    name: str
    drivers: tuple[str, ...]
    # Units that keep this vendor's GPUs busy without drawing anything (stopped in every mode).
    units: tuple[str, ...] = ()
    # Device nodes shared by every GPU of the vendor (not tied to one card in sysfs).
    shared_nodes: tuple[str, ...] = ()
    # False: never unload the module, only unbind the device (the driver usually drives another GPU too).
    unload: bool = True
    note: str = ""


BACKENDS = (
    Backend(
        "nvidia",
        ("nvidia",),
        units=("nvidia-persistenced.service",),
        shared_nodes=(dev_node("nvidiactl"), dev_node("nvidia-modeset"), dev_node("nvidia-uvm")),
    ),
    Backend(
        "amdgpu",
        ("amdgpu",),
        shared_nodes=(dev_node("kfd"),),
        # The cards with AMD's reset bug are listed by device id in gpu/amdgpu.py (the planner acts on them).
    ),
    Backend("intel", ("i915", "xe"), unload=False, note="Intel graphics is only unbound, never unloaded"),
    Backend("nouveau", ("nouveau",)),
    Backend("radeon", ("radeon",)),
)
GENERIC = Backend("generic", ())


def backend_for(driver: str | None) -> Backend:
    for backend in BACKENDS:
        if driver in backend.drivers:
            return backend
    return GENERIC


def nodes_for(backend: Backend, minor: int | None) -> tuple[str, ...]:
    """Per-card nodes beyond /dev/dri that the backend knows (nvidia's /dev/nvidiaN)."""
    if backend.name == "nvidia" and minor is not None and minor >= 0:
        return (dev_node(f"nvidia{minor}"),)
    return ()


def quirks(driver: str | None, reset_method: str) -> list[str]:
    """Warnings about a GPU that do not refuse a start: its vendor's quirks, a missing reset method."""
    notes = [backend_for(driver).note] if backend_for(driver).note else []
    if not reset_method:
        notes.append("reports no reset method: it may not come back cleanly after a VM")
    return notes
