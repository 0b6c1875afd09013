"""Hugepages for the VM, per NUMA node; what the kernel granted is read back, never assumed."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from janus_hooks.actions.base import Action, Context, wait_until
from janus_hooks.errors import StepFailed
from janus_hooks.schema import integer, optional

log = logging.getLogger(__name__)


def _pool_name(size_kb: int, node: int | None) -> str:
    where = f"node {node}" if node is not None else "the host"
    return f"{size_kb} kB hugepages on {where}"


@dataclass(frozen=True)
class AllocateHugepages(Action):
    """Hugepages added to a pool for the VM, exactly those given back after."""

    kind = "allocate-hugepages"
    schema = {"size_kb": integer(4, 16 * 1024 * 1024), "node": optional(integer(0, 1023)), "pages": integer(0, 1 << 40)}
    old_schema = {"total": integer(0, 1 << 40), "added": integer(0, 1 << 40)}
    size_kb: int
    node: int | None
    pages: int  # how many more pages the pool needs

    def describe(self) -> str:
        return f"add {self.pages} x {_pool_name(self.size_kb, self.node)} ({self.pages * self.size_kb // 1024} MiB)"

    def _nr_path(self, ctx: Context):
        return ctx.host.hugepage_dir(self.size_kb, self.node) / "nr_hugepages"

    def _total(self, ctx: Context) -> int:
        total = ctx.host.hugepage_total(self.size_kb, self.node)
        if total is None:
            raise StepFailed(f"{self._nr_path(ctx)} cannot be read")
        return total

    def capture(self, ctx: Context) -> dict[str, Any]:
        return {"total": self._total(ctx)}

    def apply(self, ctx: Context, old: dict[str, Any]) -> dict[str, Any]:
        target = old["total"] + self.pages
        ctx.host.kernel.write(self._nr_path(ctx), str(target))
        # The write asks; what the kernel granted is only known by reading back.
        total = self._total(ctx)
        if total < target:
            # A fragmented host often has the memory but not in contiguous pages: compact once, ask again.
            log.info("%s: granted %d of %d, compacting memory", _pool_name(self.size_kb, self.node), total, target)
            ctx.host.kernel.write(ctx.host.compact_memory_path(), "1")
            ctx.host.kernel.write(self._nr_path(ctx), str(target))
            total = self._total(ctx)
        granted = total - old["total"]
        if granted < self.pages:
            raise StepFailed(
                f"only {granted} of {self.pages} {_pool_name(self.size_kb, self.node)} could be allocated "
                f"({granted * self.size_kb // 1024} of {self.pages * self.size_kb // 1024} MiB)"
            )
        return {"added": granted}

    def revert(self, ctx: Context, old: dict[str, Any]) -> None:
        current = self._total(ctx)
        # Give back what this step added, not "the old size": another VM may have grown the pool since.
        # Without a done record (crash or failure inside apply) the most it can have added is the difference.
        added = old["added"] if "added" in old else max(0, min(self.pages, current - old["total"]))
        if added == 0:
            return
        target = current - added
        ctx.host.kernel.write(self._nr_path(ctx), str(target))
        wait_until(ctx, lambda: self._total(ctx) <= target, ctx.config.timeouts.hugepages,
                   f"{_pool_name(self.size_kb, self.node)} shrinking to {target} pages")
