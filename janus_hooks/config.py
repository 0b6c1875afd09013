"""janus.toml and per-VM profiles -> frozen dataclasses (tomllib to read, tomli-w to write).

janus.toml's keys are declared beside the code that reads them where that code is on every hook's path:
``[timeouts]`` in actions/base.py (the waits), ``log_level`` in logfile.py (the log). ``[display]``, ``[cpu]``
and a profile's keys stay here: their readers (the planner, CPU isolation and its actions, the GPU backends)
are loaded only by the starts that need them, and a release or a plain start would pay for importing them
just to check a table. This module collects every table and checks a file against them strictly.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, TypeVar

from janus_hooks.actions.base import Timeouts
from janus_hooks.errors import ConfigError
from janus_hooks.files import check_trusted
from janus_hooks.layout import vm_filename
from janus_hooks.logfile import TOP_LEVEL_KEYS
from janus_hooks.schema import (
    GOVERNOR,
    UNIT,
    Schema,
    SchemaError,
    argv,
    boolean,
    empty_or,
    list_of,
    pattern,
    quote,
    record,
)

T = TypeVar("T")
MAX_CONFIG_BYTES = 256 << 10

# How a managed VM uses its GPU: the only one of the host (the desktop goes away while the VM runs),
# or a second GPU the host does not display on.
MODES = ("single-gpu", "passthrough")
# A profile's reset_risk: what a single-GPU start does with a GPU that only resets with vendor-reset (gpu/amdgpu.py)
# while that module is not loaded: refuse (the desktop may never come back), or accept the risk and start anyway.
# Declared here with the profile's other keys, not in gpu/: a release would import the GPU backends to read it.
RESET_RISKS = ("refuse", "accept")


@dataclass(frozen=True)
class CpuConfig:
    """``[cpu]``: host work moved off the cores a running VM is pinned to."""

    isolate: bool = False  # every pinned managed VM; a VM's own profile can ask for it or decline it
    governor: str = ""  # cpufreq governor for the VM's cores while it runs ("performance"); empty: untouched
    irqs: bool = True  # move IRQ affinity (and the default for new IRQs) off the VM's cores
    workqueues: bool = False  # the writeback and unbound-workqueue cpumasks too

    KEYS: ClassVar[Schema] = {"isolate": boolean, "governor": empty_or(GOVERNOR), "irqs": boolean,
                              "workqueues": boolean}


@dataclass(frozen=True)
class DisplayConfig:
    """``[display]``: what frees the GPU from the host's desktop (read by the planner)."""

    manager: str = ""  # empty: whatever display-manager.service points to
    stop_units: tuple[str, ...] = ()  # system units
    stop_user_units: tuple[str, ...] = ()  # units of users' systemd instances (Sunshine, a GPU job)
    end_sessions: bool = True
    # Hosts without systemd (OpenRC, runit, a container): how to stop and start the display server.
    stop_command: tuple[str, ...] = ()
    start_command: tuple[str, ...] = ()

    KEYS: ClassVar[Schema] = {"manager": empty_or(UNIT), "stop_units": list_of(UNIT, 64),
                              "stop_user_units": list_of(UNIT, 64), "end_sessions": boolean,
                              "stop_command": argv, "start_command": argv}


# janus.toml's tables: each is a frozen dataclass whose KEYS say what it accepts, declared beside the code
# that reads it when that code is loaded by every hook (see the module's docstring). Work that reads new
# settings declares its table there, adds it here and its field to Config; unknown tables and keys are refused.
SECTIONS: dict[str, type] = {"display": DisplayConfig, "timeouts": Timeouts, "cpu": CpuConfig}
TOP_LEVEL: Schema = TOP_LEVEL_KEYS


@dataclass(frozen=True)
class Config:
    display: DisplayConfig = field(default_factory=DisplayConfig)
    log_level: str = "info"
    timeouts: Timeouts = field(default_factory=Timeouts)
    cpu: CpuConfig = field(default_factory=CpuConfig)

    # The planner's names for the [display] settings.
    @property
    def display_manager(self) -> str:
        return self.display.manager

    @property
    def stop_units(self) -> tuple[str, ...]:
        return self.display.stop_units

    @property
    def stop_user_units(self) -> tuple[str, ...]:
        return self.display.stop_user_units

    @property
    def end_sessions(self) -> bool:
        return self.display.end_sessions

    @property
    def stop_command(self) -> tuple[str, ...]:
        return self.display.stop_command

    @property
    def start_command(self) -> tuple[str, ...]:
        return self.display.start_command

    def isolates(self, requested: bool | None) -> bool:
        """Whether a VM's cores are isolated: its own request (isolate yes/no) first, then ``[cpu] isolate``."""
        return requested is True or (requested is None and self.cpu.isolate)


@dataclass(frozen=True)
class VmProfile:
    """A VM marked as managed by /etc/janus-hooks/vms/<name>.toml rather than by its XML metadata."""

    mode: str
    stop_units: tuple[str, ...] = ()
    isolate: bool | None = None  # None: janus.toml's cpu.isolate decides
    reset_risk: str = "refuse"  # see RESET_RISKS

    KEYS: ClassVar[Schema] = {"mode": pattern("|".join(MODES), "one of " + ", ".join(MODES)),
                              "stop_units": list_of(UNIT, 64), "isolate": boolean,
                              "reset_risk": pattern("|".join(RESET_RISKS), "one of " + ", ".join(RESET_RISKS))}


def config_path(config_dir: Path) -> Path:
    return config_dir / "janus.toml"


def profile_path(config_dir: Path, vm: str) -> Path:
    return config_dir / "vms" / f"{vm_filename(vm)}.toml"


def _load_toml(path: Path) -> dict:
    check_trusted(path.parent)
    check_trusted(path)
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{path}: {err.strerror}") from err
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 10} KiB; not a janus-hooks config")
    try:
        return tomllib.loads(data.decode())
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: {str(err)[:200]}") from err


def _suggest(name: str, known: list[str]) -> str:
    import difflib  # only a mistyped key needs it: not every hook process

    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _section(path: Path, cls: type[T], prefix: str, data: object, all_keys: list[str]) -> T:
    """One table checked against ``cls.KEYS``: every key known, every value of its type and range."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {prefix or 'the file'} must be a table ([{prefix}]), not {type(data).__name__}")
    values = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        check = cls.KEYS.get(key)
        if check is None:
            raise ConfigError(f"{path}: unknown key {quote(dotted)}{_suggest(dotted, all_keys)}")
        try:
            values[key] = check(value)
        except SchemaError as err:
            raise ConfigError(f"{path}: {dotted}: {err}") from None
    return cls(**values)


def load_config(config_dir: Path) -> Config:
    """Read janus.toml; a missing file means defaults, an unsafe or invalid one is refused naming the file
    and the key (a start refuses; a release, a rollback and the agent fall back, see their callers)."""
    path = config_path(config_dir)
    if not path.exists():
        return Config()
    data = _load_toml(path)
    all_keys = [*TOP_LEVEL, *SECTIONS] + [f"{name}.{key}" for name, cls in SECTIONS.items() for key in cls.KEYS]
    sections = {}
    for key, value in data.items():
        if key in SECTIONS:
            sections[key] = _section(path, SECTIONS[key], key, value, all_keys)
        elif key not in TOP_LEVEL:
            raise ConfigError(f"{path}: unknown key {quote(key)}{_suggest(key, all_keys)}")
    top = {k: v for k, v in data.items() if k in TOP_LEVEL}
    try:
        level = record(TOP_LEVEL, {k: v.lower() if isinstance(v, str) else v for k, v in top.items()})
    except SchemaError as err:
        raise ConfigError(f"{path}: {err}") from None
    display = sections.get("display", DisplayConfig())
    if bool(display.stop_command) != bool(display.start_command):
        raise ConfigError(f"{path}: display.stop_command and display.start_command go together: set both")
    return Config(log_level=level.get("log_level", "info"), **sections)


def load_profile(config_dir: Path, vm: str) -> VmProfile | None:
    path = profile_path(config_dir, vm)
    if not path.exists():
        return None
    data = _load_toml(path)
    values = _section(path, _ProfileKeys, "", data, list(VmProfile.KEYS))
    return VmProfile(mode=values.mode, stop_units=values.stop_units, isolate=values.isolate,
                     reset_risk=values.reset_risk)


@dataclass(frozen=True)
class _ProfileKeys:
    # A profile's keys, all optional (mode defaults to single-gpu).
    mode: str = "single-gpu"
    stop_units: tuple[str, ...] = ()
    isolate: bool | None = None
    reset_risk: str = "refuse"
    KEYS: ClassVar[Schema] = VmProfile.KEYS
