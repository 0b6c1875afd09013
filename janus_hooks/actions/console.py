"""The host's text console on the GPU: fbcon vtconsoles and the boot framebuffer (efifb/simplefb/simpledrm)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from janus_hooks.actions.base import Action, Context, wait_until
from janus_hooks.errors import StepFailed
from janus_hooks.schema import DRIVER, FRAMEBUFFER, VTCONSOLE, boolean, optional

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnbindVtconsole(Action):
    """A framebuffer console let go of the GPU (its vtconsole unbound), bound again on the way back."""

    kind = "unbind-vtconsole"
    schema = {"name": VTCONSOLE}
    old_schema = {"bound": boolean}
    name: str  # vtcon0

    def describe(self) -> str:
        return f"unbind framebuffer console {self.name}"

    def _bind_path(self, ctx: Context):
        return ctx.host.vtconsole_dir(self.name) / "bind"

    def capture(self, ctx: Context) -> dict[str, Any]:
        con = ctx.host.vtconsole(self.name)
        return {"bound": bool(con and con.bound)}

    def apply(self, ctx: Context, old: dict[str, Any]) -> None:
        con = ctx.host.vtconsole(self.name)
        if con and con.bound:
            ctx.host.kernel.write(self._bind_path(ctx), "0")

    def verify(self, ctx: Context, old: dict[str, Any]) -> None:
        def unbound() -> bool:
            con = ctx.host.vtconsole(self.name)
            return con is None or not con.bound

        wait_until(ctx, unbound, ctx.config.timeouts.driver, f"{self.name} unbinding")

    def revert(self, ctx: Context, old: dict[str, Any]) -> None:
        if not old.get("bound"):
            return
        # fbcon's vtconsole disappears with the last framebuffer and returns when the driver binds again,
        # bound by itself; it only needs help when its framebuffer never went away.
        wait_until(ctx, lambda: ctx.host.vtconsole(self.name) is not None, ctx.config.timeouts.driver,
                   f"{self.name} reappearing")
        if self._bound(ctx):
            return
        ctx.host.kernel.write(self._bind_path(ctx), "1")
        if not self._bound(ctx):
            # Seen on 6.1: "1" into fbcon's bind is silently ignored once the dummy console took over;
            # unbinding the dummy console hands the consoles back to fbcon.
            for con in ctx.host.vtconsoles():
                if con.name != self.name and con.bound:
                    ctx.host.kernel.write(ctx.host.vtconsole_dir(con.name) / "bind", "0")
        wait_until(ctx, lambda: self._bound(ctx), ctx.config.timeouts.driver, f"{self.name} binding")

    def _bound(self, ctx: Context) -> bool:
        con = ctx.host.vtconsole(self.name)
        return bool(con and con.bound)


@dataclass(frozen=True)
class DetachFramebuffer(Action):
    """The boot framebuffer's platform device unbound from its driver (efifb, simplefb, simpledrm)."""

    kind = "detach-framebuffer"
    schema = {"device": FRAMEBUFFER, "driver": DRIVER}
    old_schema = {"driver": optional(DRIVER)}
    device: str  # efi-framebuffer.0
    driver: str  # efi-framebuffer, simple-framebuffer, simpledrm, vesa-framebuffer

    def describe(self) -> str:
        return f"detach boot framebuffer {self.device} from {self.driver}"

    def capture(self, ctx: Context) -> dict[str, Any]:
        return {"driver": ctx.host.framebuffer_driver(self.device)}

    def apply(self, ctx: Context, old: dict[str, Any]) -> None:
        if ctx.host.framebuffer_driver(self.device) == self.driver:
            ctx.host.kernel.write(ctx.host.platform_driver_dir(self.driver) / "unbind", self.device)

    def verify(self, ctx: Context, old: dict[str, Any]) -> None:
        wait_until(ctx, lambda: ctx.host.framebuffer_driver(self.device) is None, ctx.config.timeouts.driver,
                   f"{self.device} detaching from {self.driver}")

    def revert(self, ctx: Context, old: dict[str, Any]) -> None:
        driver = old.get("driver")
        if not driver or ctx.host.framebuffer_driver(self.device) == driver:
            return
        if not ctx.host.platform_device_exists(self.device):
            # Kernels >= 6.0 remove the boot framebuffer's platform device when the native driver takes
            # the aperture over: the native driver's own fbdev is the console now, nothing to re-attach.
            log.info("boot framebuffer %s is gone (the native driver took it over): nothing to re-attach",
                     self.device)
            return
        try:
            ctx.host.kernel.write(ctx.host.platform_driver_dir(driver) / "bind", self.device)
            wait_until(ctx, lambda: ctx.host.framebuffer_driver(self.device) == driver,
                       ctx.config.timeouts.driver, f"{self.device} binding to {driver}")
        except StepFailed as err:
            # Seen on real cards ("BAR has moved"): the native driver's console works without it, and a
            # journal kept open for it would be replayed before the VM's next start for nothing.
            ctx.warn(f"boot framebuffer {self.device} could not be re-attached to {driver} ({err}); "
                     "the console stays on the GPU driver's own framebuffer")
