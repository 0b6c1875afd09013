"""Host drivers and vfio-pci: module unloading in holders order, transient binding via driver_override."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from janus_hooks.actions.base import Action, Context, wait_until
from janus_hooks.errors import StepFailed
from janus_hooks.schema import DRIVER, MODULE, PCI_ADDRESS, boolean, list_of, mapping, optional

log = logging.getLogger(__name__)

VFIO_DRIVER = "vfio-pci"


def refuse_if_held(ctx: Context, address: str) -> None:
    """Never unbind a function while a process holds one of its nodes: the driver's remove() would wait for
    it (snd_hda_intel in snd_card_free) in a write nobody can cancel. Checked right before, not only planned."""
    held = ctx.host.holders_of(ctx.host.function_nodes(address))
    if held:
        raise StepFailed(f"{address} is held by {held[0].describe()}: not unbinding it while it is")


@dataclass(frozen=True)
class UnloadModule(Action):
    """A host GPU driver's module unloaded (in holders order), loaded again after."""

    kind = "unload-module"
    schema = {"module": MODULE}
    old_schema = {"loaded": boolean, "bound": mapping(PCI_ADDRESS, DRIVER)}
    module: str

    def describe(self) -> str:
        return f"unload module {self.module}"

    def capture(self, ctx: Context) -> dict[str, Any]:
        return {"loaded": ctx.host.module_loaded(self.module), "bound": ctx.host.pci_devices_of_module(self.module)}

    def apply(self, ctx: Context, old: dict[str, Any]) -> None:
        if ctx.host.module_loaded(self.module):
            for address in ctx.host.pci_devices_of_module(self.module.replace("-", "_")):
                refuse_if_held(ctx, address)
            ctx.host.kernel.unload_module(self.module)

    def verify(self, ctx: Context, old: dict[str, Any]) -> None:
        wait_until(ctx, lambda: not ctx.host.module_loaded(self.module), ctx.config.timeouts.module,
                   f"module {self.module} unloading")

    def revert(self, ctx: Context, old: dict[str, Any]) -> None:
        if not old.get("loaded"):
            return
        if not ctx.host.module_loaded(self.module):
            ctx.host.kernel.load_module(self.module)
        for address, driver in old.get("bound", {}).items():
            # Loading a module probes its devices; one whose driver_override was still set is probed again.
            if ctx.host.pci_driver(address) is None:
                ctx.host.kernel.write(ctx.host.pci_probe_path(), address)
            wait_until(ctx, lambda a=address, d=driver: ctx.host.pci_driver(a) == d, ctx.config.timeouts.driver,
                       f"{address} binding to {driver}")


@dataclass(frozen=True)
class LoadModule(Action):
    """A vfio module loaded; unloaded after only if this step loaded it and nothing else uses it."""

    kind = "load-module"
    schema = {"module": MODULE, "devices": list_of(PCI_ADDRESS)}
    old_schema = {"loaded": boolean}
    module: str
    # The VM's own devices: while one of them is still bound, unloading waits for a later replay.
    devices: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"load module {self.module}"

    def _name(self) -> str:
        return self.module.replace("-", "_")

    def capture(self, ctx: Context) -> dict[str, Any]:
        return {"loaded": ctx.host.module_loaded(self.module)}

    def apply(self, ctx: Context, old: dict[str, Any]) -> None:
        if not ctx.host.module_loaded(self.module):
            ctx.host.kernel.load_module(self.module)

    def verify(self, ctx: Context, old: dict[str, Any]) -> None:
        wait_until(ctx, lambda: ctx.host.module_loaded(self.module), ctx.config.timeouts.module,
                   f"module {self.module} loading")

    def revert(self, ctx: Context, old: dict[str, Any]) -> None:
        if old.get("loaded") or not ctx.host.module_loaded(self.module):
            return
        in_use = ctx.host.pci_devices_of_module(self._name())
        ours = sorted(set(in_use) & set(self.devices))
        if ours:
            raise StepFailed(f"module {self.module} still drives {ours[0]}, which did not go back")
        module = ctx.host.module(self._name())
        if in_use or (module is not None and (module.refcnt or module.holders)):
            # Another VM's devices still use it (unloading would unbind them): loaded is the right state.
            log.info("module %s stays loaded: still in use (%s)", self.module, ", ".join(in_use) or "refcnt")
            return
        ctx.host.kernel.unload_module(self.module)


@dataclass(frozen=True)
class BindVfio(Action):
    """Transient binding: driver_override + drivers_probe; nothing persists past a reboot, new_id is never used."""

    kind = "bind-vfio"
    schema = {"address": PCI_ADDRESS, "host_driver": optional(DRIVER)}
    old_schema = {"driver": optional(DRIVER), "override": optional(DRIVER)}
    address: str
    # The driver the planner saw: by the time this step runs, unloading its module may have unbound the
    # device already, and that capture alone would not know where the device belongs.
    host_driver: str | None = None

    def describe(self) -> str:
        return f"bind {self.address} to {VFIO_DRIVER}"

    def capture(self, ctx: Context) -> dict[str, Any]:
        return {
            "driver": ctx.host.pci_driver(self.address),
            "override": ctx.host.pci_driver_override(self.address),
        }

    def _unbind(self, ctx: Context) -> None:
        driver = ctx.host.pci_driver(self.address)
        if driver:
            ctx.host.kernel.write(ctx.host.pci_driver_dir(driver) / "unbind", self.address)

    def apply(self, ctx: Context, old: dict[str, Any]) -> None:
        host = ctx.host
        if host.pci_driver(self.address) == VFIO_DRIVER:
            return
        if host.pci_driver(self.address):
            refuse_if_held(ctx, self.address)
        host.kernel.write(host.pci_dir(self.address) / "driver_override", VFIO_DRIVER)
        self._unbind(ctx)
        host.kernel.write(host.pci_probe_path(), self.address)

    def verify(self, ctx: Context, old: dict[str, Any]) -> None:
        # A probe "succeeds" even when nothing bound: the driver link is the only truth.
        wait_until(ctx, lambda: ctx.host.pci_driver(self.address) == VFIO_DRIVER, ctx.config.timeouts.driver,
                   f"{self.address} binding to {VFIO_DRIVER} (driver now: {ctx.host.pci_driver(self.address)})")

    def revert(self, ctx: Context, old: dict[str, Any]) -> None:
        host = ctx.host
        old_driver, old_override = old.get("driver") or self.host_driver, old.get("override")
        if host.pci_driver_override(self.address) != old_override:
            # An empty write clears driver_override (the kernel shows "(null)" again).
            host.kernel.write(host.pci_dir(self.address) / "driver_override", old_override or "\n")
        if host.pci_driver(self.address) == old_driver:
            return
        self._unbind(ctx)
        if old_driver is None:
            return
        if not host.pci_driver_loaded(old_driver):
            # Its module was unloaded; reloading it (a later revert) binds the device again.
            return
        host.kernel.write(host.pci_probe_path(), self.address)
        wait_until(ctx, lambda: host.pci_driver(self.address) == old_driver, ctx.config.timeouts.driver,
                   f"{self.address} binding back to {old_driver}")
