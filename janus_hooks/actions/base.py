"""What every change has in common: capture the old state, apply, verify, and revert from any state.

``revert`` must be idempotent and work from every intermediate state (the engine may have been killed
half-way through ``apply``): it looks at the host and restores the captured state, it does not replay
the forward steps backwards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from janus_hooks.config import Config
from janus_hooks.errors import StepFailed
from janus_hooks.host import Host, Runner, Services, SubprocessRunner, SystemdServices

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What actions act on; collaborators are injected so tests can play the kernel and the services."""

    host: Host
    config: Config = field(default_factory=Config)
    services: Services = field(default_factory=SystemdServices)
    runner: Runner = field(default_factory=SubprocessRunner)
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    # What did not come back exactly but does not keep a journal open (shown by `status`).
    warnings: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        """Log ``message`` as a warning and keep it for the journal store's notes."""
        log.warning("%s", message)
        self.warnings.append(message)


def wait_until(ctx: Context, done: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``done`` with a short back-off until it holds or ``timeout`` passes; return the seconds waited.

    Raises StepFailed naming ``what``. No fixed sleeps: the first check is immediate.
    """
    start = ctx.clock()
    delay = 0.002
    while True:
        if done():
            return ctx.clock() - start
        if ctx.clock() - start >= timeout:
            raise StepFailed(f"{what} did not happen within {timeout:g} s")
        ctx.sleep(delay)
        delay = min(delay * 2, 0.05)


_REGISTRY: dict[str, type[Action]] = {}


@dataclass(frozen=True)
class Action:
    kind: ClassVar[str] = ""
    # A persistent change outlives a reboot and must be reverted even when the boot id changed.
    persistent: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _REGISTRY[cls.kind] = cls

    def describe(self) -> str:
        raise NotImplementedError

    def held_cpus(self) -> frozenset[int]:
        """Host cores this change keeps for its VM while its journal is open (CPU isolation)."""
        return frozenset()

    def capture(self, ctx: Context) -> dict[str, Any]:
        return {}

    def apply(self, ctx: Context, old: dict[str, Any]) -> dict[str, Any] | None:
        """Make the change. May return what it learned (merged into ``old`` for revert once done)."""
        raise NotImplementedError

    def verify(self, ctx: Context, old: dict[str, Any]) -> None:
        """Wait (bounded) until the change is really in place; raise StepFailed otherwise."""

    def revert(self, ctx: Context, old: dict[str, Any]) -> None:
        """Bring back ``old``; a no-op when it is already in place."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return {"kind": self.kind, **data}


def action_from_json(data: dict[str, Any]) -> Action:
    data = dict(data)
    try:
        cls = _REGISTRY[data.pop("kind")]
    except KeyError as err:
        raise StepFailed(f"unknown action kind {err.args[0]!r} in journal") from err
    fields_ = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**fields_)
