"""What every change has in common: capture the old state, apply, verify, and revert from any state.

``revert`` must be idempotent and work from every intermediate state (the engine may have been killed
half-way through ``apply``): it looks at the host and restores the captured state, it does not replay
the forward steps backwards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

from janus_hooks.errors import StepFailed
from janus_hooks.host import Host, Runner, Services, SubprocessRunner, SystemdServices
from janus_hooks.schema import Schema, SchemaError, number, record

if TYPE_CHECKING:
    from janus_hooks.config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timeouts:
    """``[timeouts]`` of janus.toml, in seconds: every wait janus-hooks does is bounded by one of these
    (``wait_until`` below, the kernel seam's blocking writes, the engine's host-wide lock). Declared here,
    beside the waits; janus_hooks.config collects the table."""

    unit_stop: float = 30.0
    release: float = 15.0  # processes letting go of the GPU after their unit stopped
    driver: float = 10.0  # a driver binding or letting go of a device
    module: float = 30.0
    hugepages: float = 30.0
    lock: float = 60.0

    # What each key accepts: a wait must end, so nan, inf, 0 and negative values are refused.
    KEYS: ClassVar[Schema] = {name: number(0.01, 3600) for name in (
        "unit_stop", "release", "driver", "module", "hugepages", "lock")}


def _default_config() -> Config:
    # janus_hooks.config imports this module for Timeouts: the other way round only when a Context is made.
    from janus_hooks.config import Config

    return Config()


class Context:
    """What actions act on; collaborators are injected so tests can play the kernel and the services.

    A plain class, not a dataclass: every hook process defines it, and nothing compares or prints it.
    """

    def __init__(self, host: Host, config: Config | None = None, services: Services | None = None,
                 runner: Runner | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.host = host
        self.config = config if config is not None else _default_config()
        self.services = services if services is not None else SystemdServices()
        self.runner = runner if runner is not None else SubprocessRunner()
        self.clock = clock
        self.sleep = sleep
        # What did not come back exactly but does not keep a journal open (shown by `status`).
        self.warnings: list[str] = []

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
# Which module of this package defines each kind: a journal record imports only its kind's module (see the
# package's docstring). A test checks this table against the kinds the modules register.
KIND_MODULES = {
    "unbind-vtconsole": "console",
    "detach-framebuffer": "console",
    "restrict-unit-cpus": "cpu",
    "restrict-cgroup-cpus": "cpu",
    "restrict-default-irq-affinity": "cpu",
    "restrict-workqueues": "cpu",
    "move-irqs": "cpu",
    "stop-irqbalance": "cpu",
    "set-governor": "cpu",
    "stop-unit": "display",
    "end-session": "display",
    "stop-user-unit": "display",
    "stop-user-units": "display",
    "display-commands": "display",
    "wait-released": "display",
    "unload-module": "driver",
    "load-module": "driver",
    "bind-vfio": "driver",
    "allocate-hugepages": "memory",
    "reset-method": "reset",
    "create-mdev": "shared",
    "enable-vfs": "shared",
}


@dataclass(frozen=True)
class Action:
    """One kind of change: capture, apply, verify, revert (subclasses name their ``kind`` and fields)."""

    kind: ClassVar[str] = ""
    # A persistent change outlives a reboot and must be reverted even when the boot id changed.
    persistent: ClassVar[bool] = False
    # What a journal may hold for this kind, declared next to the code that acts on it: ``schema`` for the
    # action's own fields, ``old_schema`` for what ``capture`` and ``apply`` return. A journal record is
    # replayed as root, so anything outside these is refused before anything runs.
    schema: ClassVar[Schema] = {}
    old_schema: ClassVar[Schema] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            if "schema" not in cls.__dict__ or "old_schema" not in cls.__dict__:
                raise TypeError(f"action kind {cls.kind!r} ({cls.__name__}) must declare schema and old_schema")
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


def action_kinds() -> dict[str, type[Action]]:
    """Every action kind: what a journal may name (imports every action module)."""
    for module in sorted(set(KIND_MODULES.values())):
        __import__(f"janus_hooks.actions.{module}")
    return dict(_REGISTRY)


def _kind_class(kind: str) -> type[Action] | None:
    if kind not in _REGISTRY and kind in KIND_MODULES:
        __import__(f"janus_hooks.actions.{KIND_MODULES[kind]}")  # (not importlib: see the package's _submodule)
    return _REGISTRY.get(kind)


def action_from_json(data: Any) -> Action:
    """The action a journal record names, checked against its kind's closed schema (SchemaError if not)."""
    if not isinstance(data, dict):
        raise SchemaError(f"action must be an object, not {type(data).__name__}")
    data = dict(data)
    kind = data.pop("kind", None)
    cls = _kind_class(kind) if isinstance(kind, str) else None
    if cls is None:
        raise SchemaError(f"unknown action kind {kind!r}"[:80])
    # Fields with a default may be absent (a journal written before the field existed).
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    try:
        return cls(**record(cls.schema, data, required))
    except SchemaError as err:
        raise SchemaError(f"{kind}: {err}") from None


def old_from_json(action: Action, data: Any) -> dict[str, Any]:
    """Captured state (or what ``apply`` learned) for ``action``, checked against its ``old_schema``."""
    try:
        checked = record(action.old_schema, data)
    except SchemaError as err:
        raise SchemaError(f"{action.kind} state: {err}") from None
    # Captured state stays as JSON gave it (lists), as the action wrote it.
    return {k: list(v) if isinstance(v, tuple) else v for k, v in checked.items()}
