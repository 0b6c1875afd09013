"""A PCI function's reset method for the VM's run (vendor-reset's ``device_specific`` for AMD's reset bug)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from janus_hooks.actions.base import Action, Context
from janus_hooks.errors import StepFailed
from janus_hooks.schema import PCI_ADDRESS, RESET_METHOD, pattern

# What reset_method reads back: the enabled methods in the order the kernel tries them ("flr bus"), or
# nothing when a person disabled every method.
RESET_METHODS = pattern(r"([a-z_]{1,32}( [a-z_]{1,32}){0,7})?", "a list of reset methods", 300)


@dataclass(frozen=True)
class SetResetMethod(Action):
    """Write ``method`` to the function's ``reset_method`` (kernels >= 5.15); revert writes back the list it
    had. The kernel refuses a method that no reset of the device provides (EINVAL), so a device_specific that
    vendor-reset does not handle fails here rather than when the VM stops."""

    kind = "reset-method"
    schema = {"address": PCI_ADDRESS, "method": RESET_METHOD}
    old_schema = {"methods": RESET_METHODS}
    address: str
    method: str

    def describe(self) -> str:
        return f"set the reset method of {self.address} to {self.method}"

    def _current(self, ctx: Context) -> str:
        methods = ctx.host.pci_reset_methods(self.address)
        if methods is None:
            raise StepFailed(f"{ctx.host.pci_reset_method_path(self.address)} cannot be read")
        return methods

    def capture(self, ctx: Context) -> dict[str, Any]:
        return {"methods": self._current(ctx)}

    def apply(self, ctx: Context, old: dict[str, Any]) -> None:
        if old["methods"] != self.method:
            ctx.host.kernel.write(ctx.host.pci_reset_method_path(self.address), self.method)

    def verify(self, ctx: Context, old: dict[str, Any]) -> None:
        # The store takes effect before the write returns: read back once, nothing to wait for.
        now = self._current(ctx)
        if now != self.method:
            raise StepFailed(f"{self.address} reset method reads {now!r} after writing {self.method!r}")

    def revert(self, ctx: Context, old: dict[str, Any]) -> None:
        if "methods" not in old or ctx.host.pci_reset_methods(self.address) in (None, old["methods"]):
            # Nothing captured, the device is gone, or it has its methods back already.
            return
        # An empty write disables every method, as it did before if that is what was captured.
        ctx.host.kernel.write(ctx.host.pci_reset_method_path(self.address), old["methods"] or "\n")
