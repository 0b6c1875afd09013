"""janus.toml and per-VM profiles -> frozen dataclasses (tomllib to read, tomli-w to write)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from janus_hooks.errors import ConfigError
from janus_hooks.files import check_trusted
from janus_hooks.layout import vm_filename

LOG_LEVELS = ("debug", "info", "warning", "error")
# How a managed VM uses its GPU: the only one of the host (the desktop goes away while the VM runs),
# or a second GPU the host does not display on.
MODES = ("single-gpu", "passthrough")


@dataclass(frozen=True)
class Timeouts:
    """Seconds; every wait janus-hooks does is bounded by one of these."""

    unit_stop: float = 30.0
    release: float = 15.0  # processes letting go of the GPU after their unit stopped
    driver: float = 10.0  # a driver binding or letting go of a device
    module: float = 30.0
    hugepages: float = 30.0
    lock: float = 60.0


@dataclass(frozen=True)
class CpuConfig:
    """``[cpu]``: host work moved off the cores a running VM is pinned to."""

    isolate: bool = False  # every pinned managed VM; a VM's own profile can ask for it or decline it
    governor: str = ""  # cpufreq governor for the VM's cores while it runs ("performance"); empty: untouched
    irqs: bool = True  # move IRQ affinity (and the default for new IRQs) off the VM's cores
    workqueues: bool = False  # the writeback and unbound-workqueue cpumasks too


@dataclass(frozen=True)
class Config:
    display_manager: str = ""  # empty: whatever display-manager.service points to
    stop_units: tuple[str, ...] = ()  # system units
    stop_user_units: tuple[str, ...] = ()  # units of users' systemd instances (Sunshine, a GPU job)
    end_sessions: bool = True
    # Hosts without systemd (OpenRC, runit, a container): how to stop and start the display server.
    stop_command: tuple[str, ...] = ()
    start_command: tuple[str, ...] = ()
    log_level: str = "info"
    timeouts: Timeouts = field(default_factory=Timeouts)
    cpu: CpuConfig = field(default_factory=CpuConfig)


@dataclass(frozen=True)
class VmProfile:
    """A VM marked as managed by /etc/janus-hooks/vms/<name>.toml rather than by its XML metadata."""

    mode: str
    stop_units: tuple[str, ...] = ()
    isolate: bool | None = None  # None: janus.toml's cpu.isolate decides


def config_path(config_dir: Path) -> Path:
    return config_dir / "janus.toml"


def profile_path(config_dir: Path, vm: str) -> Path:
    return config_dir / "vms" / f"{vm_filename(vm)}.toml"


def _load_toml(path: Path) -> dict:
    check_trusted(path.parent)
    check_trusted(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: {err}") from err
    except OSError as err:
        raise ConfigError(f"{path}: {err.strerror}") from err


def _argv(path: Path, key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{path}: {key} must be a list of strings (an argv, never a shell line)")
    return tuple(value)


def _bool(path: Path, key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: {key} must be true or false")
    return value


def _cpu(path: Path, data: object) -> CpuConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: [cpu] must be a table")
    unknown = set(data) - {f.name for f in fields(CpuConfig)}
    if unknown:
        raise ConfigError(f"{path}: unknown key cpu.{sorted(unknown)[0]}")
    governor = data.get("governor", "")
    if not isinstance(governor, str) or (governor and not governor.replace("_", "").isalnum()):
        raise ConfigError(f"{path}: cpu.governor must be a cpufreq governor name such as \"performance\"")
    return CpuConfig(
        isolate=_bool(path, "cpu.isolate", data.get("isolate", False)),
        governor=governor,
        irqs=_bool(path, "cpu.irqs", data.get("irqs", True)),
        workqueues=_bool(path, "cpu.workqueues", data.get("workqueues", False)),
    )


def load_config(config_dir: Path) -> Config:
    """Read janus.toml; a missing file means defaults, an unsafe or invalid one is refused."""
    path = config_path(config_dir)
    if not path.exists():
        return Config()
    data = _load_toml(path)
    display = data.get("display", {})
    known_timeouts = {f.name for f in fields(Timeouts)}
    raw_timeouts = data.get("timeouts", {})
    unknown = set(raw_timeouts) - known_timeouts
    if unknown:
        raise ConfigError(f"{path}: unknown timeout {sorted(unknown)[0]!r}")
    seconds = {}
    for key, value in raw_timeouts.items():
        try:
            seconds[key] = float(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{path}: timeouts.{key} must be a number of seconds, not {value!r}") from err
        if seconds[key] <= 0:
            raise ConfigError(f"{path}: timeouts.{key} must be positive")
    timeouts = Timeouts(**seconds)
    level = str(data.get("log_level", "info")).lower()
    if level not in LOG_LEVELS:
        raise ConfigError(f"{path}: log_level must be one of {', '.join(LOG_LEVELS)}")
    return Config(
        display_manager=str(display.get("manager", "")),
        stop_units=_argv(path, "display.stop_units", display.get("stop_units", [])),
        stop_user_units=_argv(path, "display.stop_user_units", display.get("stop_user_units", [])),
        end_sessions=bool(display.get("end_sessions", True)),
        stop_command=_argv(path, "display.stop_command", display.get("stop_command", [])),
        start_command=_argv(path, "display.start_command", display.get("start_command", [])),
        log_level=level,
        timeouts=timeouts,
        cpu=_cpu(path, data.get("cpu", {})),
    )


def load_profile(config_dir: Path, vm: str) -> VmProfile | None:
    path = profile_path(config_dir, vm)
    if not path.exists():
        return None
    data = _load_toml(path)
    mode = data.get("mode", "single-gpu")
    if mode not in MODES:
        raise ConfigError(f"{path}: mode must be one of {', '.join(MODES)}")
    isolate = data.get("isolate")
    return VmProfile(mode=mode, stop_units=_argv(path, "stop_units", data.get("stop_units", [])),
                     isolate=None if isolate is None else _bool(path, "isolate", isolate))
