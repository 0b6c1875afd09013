"""A shared GPU for a shared-vram VM: a mediated device instance or SR-IOV virtual functions, made on
prepare and removed on release. The GPU itself stays with the host and its desktop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from janus_hooks.actions.base import Action, Context, wait_until
from janus_hooks.errors import StepFailed
from janus_hooks.schema import PCI_ADDRESS, boolean, integer, pattern

MDEV_UUID = pattern(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "a mediated device UUID")
MDEV_TYPE = pattern(r"[A-Za-z0-9_.:-]{1,64}", "a mediated device type (i915-GVTg_V5_4)")


@dataclass(frozen=True)
class CreateMdev(Action):
    kind = "create-mdev"
    schema = {"parent": PCI_ADDRESS, "mdev_type": MDEV_TYPE, "uuid": MDEV_UUID}
    old_schema = {"existed": boolean}
    parent: str
    mdev_type: str
    uuid: str

    def describe(self) -> str:
        return f"create mediated device {self.uuid} ({self.mdev_type}) on {self.parent}"

    def capture(self, ctx: Context) -> dict[str, Any]:
        return {"existed": ctx.host.mdev_dir(self.uuid).exists()}

    def apply(self, ctx: Context, old: dict[str, Any]) -> None:
        if old["existed"]:
            return  # made by hand or left by a crash before the journal knew: used as it is, never removed
        create = ctx.host.mdev_type_dir(self.parent, self.mdev_type) / "create"
        if not create.exists():
            raise StepFailed(f"GPU {self.parent} offers no mediated device type {self.mdev_type} ({create})")
        ctx.host.kernel.write(create, self.uuid)

    def verify(self, ctx: Context, old: dict[str, Any]) -> None:
        wait_until(ctx, ctx.host.mdev_dir(self.uuid).exists, ctx.config.timeouts.driver,
                   f"mediated device {self.uuid} to appear on {self.parent}")

    def revert(self, ctx: Context, old: dict[str, Any]) -> None:
        device = ctx.host.mdev_dir(self.uuid)
        if old.get("existed", True) or not device.exists():
            return
        ctx.host.kernel.write(device / "remove", "1")
        wait_until(ctx, lambda: not device.exists(), ctx.config.timeouts.driver,
                   f"mediated device {self.uuid} to go from {self.parent}")


@dataclass(frozen=True)
class EnableVfs(Action):
    kind = "enable-vfs"
    schema = {"parent": PCI_ADDRESS, "count": integer(1, 256)}
    old_schema = {"numvfs": integer(0, 256)}
    parent: str
    count: int

    def describe(self) -> str:
        return f"enable {self.count} SR-IOV virtual function(s) on {self.parent}"

    def _numvfs(self, ctx: Context) -> int:
        value = ctx.host.sriov_count(self.parent)
        if value is None:
            raise StepFailed(f"{ctx.host.sriov_numvfs_path(self.parent)} cannot be read")
        return value

    def capture(self, ctx: Context) -> dict[str, Any]:
        return {"numvfs": self._numvfs(ctx)}

    def apply(self, ctx: Context, old: dict[str, Any]) -> None:
        if old["numvfs"] >= self.count:
            return
        if old["numvfs"]:
            # The kernel changes the number of VFs only from zero; others may use the enabled ones.
            raise StepFailed(f"GPU {self.parent} has {old['numvfs']} virtual function(s) enabled, the VM needs "
                             f"{self.count}; disable them first (echo 0 > {ctx.host.sriov_numvfs_path(self.parent)})")
        ctx.host.kernel.write(ctx.host.sriov_numvfs_path(self.parent), str(self.count))

    def verify(self, ctx: Context, old: dict[str, Any]) -> None:
        wait_until(ctx, lambda: self._numvfs(ctx) >= self.count, ctx.config.timeouts.driver,
                   f"{self.count} virtual function(s) on {self.parent}")

    def revert(self, ctx: Context, old: dict[str, Any]) -> None:
        if old.get("numvfs", 1) != 0 or ctx.host.sriov_count(self.parent) in (None, 0):
            return
        ctx.host.kernel.write(ctx.host.sriov_numvfs_path(self.parent), "0")
        wait_until(ctx, lambda: self._numvfs(ctx) == 0, ctx.config.timeouts.driver,
                   f"the virtual functions of {self.parent} to go")
