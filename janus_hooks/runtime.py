"""What the hook and the CLI share: one object that plans, prepares and releases VMs on one host."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from janus_hooks.actions import Context
from janus_hooks.config import Config, load_config, load_profile
from janus_hooks.engine import Engine, Observer, RunReport, no_observer
from janus_hooks.errors import JanusError
from janus_hooks.files import ensure_private_dir
from janus_hooks.host import Host, Runner, Services, SubprocessRunner, SystemdServices
from janus_hooks.journal import JournalStore
from janus_hooks.logfile import RotatingLog

if TYPE_CHECKING:
    from janus_hooks.domain import DomainSpec
    from janus_hooks.plan import Plan

log = logging.getLogger(__name__)


class Janus:
    """One host's config, collaborators and journals (a plain class: every hook process creates one, and
    nothing compares or prints it)."""

    def __init__(self, host: Host, config: Config, ctx: Context, store: JournalStore,
                 observer: Observer = no_observer) -> None:
        self.host, self.config, self.ctx, self.store, self.observer = host, config, ctx, store, observer

    @classmethod
    def open(cls, host: Host, services: Services | None = None, runner: Runner | None = None,
             observer: Observer = no_observer, restoring: bool = False, config: Config | None = None) -> Janus:
        """Load the host's config (refusing unsafe files) and wire the real collaborators by default.

        ``restoring``: a config that cannot be used must not keep the desktop from coming back; the
        defaults are enough to replay a journal (what to run is in the journal itself).
        ``config``: use this one instead of reading it (the agent keeps its last good config in force).
        """
        if config is None:
            try:
                config = load_config(host.config_dir())
            except Exception as err:  # noqa: BLE001 - on the way back, any config problem means defaults
                if not restoring:
                    raise
                log.warning("%s; replaying with default settings", err)
                config = Config()
        host.kernel.use_timeouts(config.timeouts.driver, config.timeouts.hugepages, config.timeouts.module)
        runner = runner or SubprocessRunner()
        services = services or SystemdServices(runner)
        ctx = Context(host=host, config=config, services=services, runner=runner)
        return cls(host, config, ctx, JournalStore(host.state_dir(), listdir=host.list_dir), observer)

    def mode_of(self, spec: DomainSpec) -> tuple[str | None, tuple[str, ...]]:
        """The VM's janus mode (XML metadata first, then its TOML profile) and its extra units."""
        mode, units, _isolate, _risk = self._profile(spec)
        return mode, units

    def _profile(self, spec: DomainSpec) -> tuple[str | None, tuple[str, ...], bool | None, str]:
        """Mode, extra units, the VM's own isolation request and its reset risk: the XML first, then its TOML
        profile (the only place that can accept a GPU's reset risk)."""
        profile = load_profile(self.host.config_dir(), spec.name)
        isolate = spec.isolate if spec.isolate is not None else profile.isolate if profile else None
        risk = profile.reset_risk if profile else "refuse"
        if spec.mode:
            return spec.mode, profile.stop_units if profile else (), isolate, risk
        if profile:
            return profile.mode, profile.stop_units, isolate, risk
        return None, (), isolate, risk

    def plan(self, spec: DomainSpec) -> Plan:
        # Only a start plans: a release (the hook's other slow path) never imports the planner.
        from janus_hooks.plan import make_plan
        from janus_hooks.snapshot import CpuState, HostSnapshot

        mode, units, isolate, reset_risk = self._profile(spec)
        if mode is None:
            return make_plan(spec, None, self.config, None)
        spec = spec._replace(isolate=isolate)
        cpu = None
        if self.config.isolates(spec.isolate):
            cpu = CpuState.read(self.host, self.store.cpu_claims(self.host.boot_id(), except_vm=spec.name))
        snap = HostSnapshot.read(self.host, claims=self.store.claims(except_vm=spec.name),
                                 units_of_interest=tuple(self.config.stop_units) + units, cpu=cpu)
        if spec.hugepages is not None:
            pending = self.store.pending_hugepages(self.host.boot_id(), spec.name,
                                                   lambda vm: self.host.vm_process(vm) is not None)
            snap = replace(snap, pending_hugepages=pending)
        return make_plan(spec, mode, self.config, snap, units, reset_risk=reset_risk)

    def engine(self) -> Engine:
        return Engine(self.ctx, self.store, self.observer)

    def prepare(self, spec: DomainSpec) -> tuple[Plan, RunReport | None]:
        """Plan, check claims and apply while holding the host-wide lock (see ``Engine.prepare``)."""
        if self.mode_of(spec)[0] is None:
            return self.plan(spec), None
        return self.engine().prepare(spec.name, lambda: self.plan(spec))

    def release(self, vm: str, lock_timeout: float | None = None, begun: float | None = None) -> RunReport:
        return self.engine().release(vm, lock_timeout, begun)

    def switched(self, vm: str) -> bool:
        return self.store.exists(vm)

    def setup_logging(self, name: str = "hook.log") -> None:
        """Log to a private file under the log dir, bounded in size; failures to log never stop a VM.

        A log directory others could read is not used (it is no state janus-hooks acts on: a start or a
        release goes on without the log rather than be refused for it).
        """
        try:
            log_dir = ensure_private_dir(self.host.log_dir())
            handler = RotatingLog(log_dir / name, max_bytes=1 << 20, backups=3)
        except (OSError, JanusError):
            return
        handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
        handler.set_name("janus-hooks-file")
        root = logging.getLogger("janus_hooks")
        for old in [h for h in root.handlers if h.get_name() == "janus-hooks-file"]:
            root.removeHandler(old)
            old.close()
        root.addHandler(handler)
        root.setLevel(self.config.log_level.upper())
