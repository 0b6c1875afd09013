"""The only place that knows where the kernel and the system keep their state.

Everything goes through ``Host(root)``: production uses ``/``, tests use a temporary tree that a fake kernel
animates. Writes go through the ``Kernel`` seam, commands through the ``Runner`` seam.
"""

from janus_hooks.host.kernel import Kernel, RealKernel
from janus_hooks.host.model import (
    Framebuffer,
    HugepagePool,
    Module,
    PciDevice,
    ProcessHold,
    Session,
    VtConsole,
)
from janus_hooks.host.paths import resolve_beneath
from janus_hooks.host.runner import Runner, SubprocessRunner
from janus_hooks.host.services import Services, SystemdServices
from janus_hooks.host.storage import BackingDevice
from janus_hooks.host.sysfs import Host

__all__ = [
    "BackingDevice",
    "Framebuffer",
    "Host",
    "HugepagePool",
    "Kernel",
    "Module",
    "PciDevice",
    "ProcessHold",
    "RealKernel",
    "Runner",
    "Services",
    "Session",
    "SubprocessRunner",
    "SystemdServices",
    "VtConsole",
    "resolve_beneath",
]
