"""Where the files janus-hooks installs (hooks/, udev/, systemd/, templates/) live on this machine.

A wheel carries them inside the package as ``janus_hooks/data/<dir>`` (pyproject's force-include); a
source checkout or an editable install has them at the repository root, beside the package.
"""

from __future__ import annotations

from pathlib import Path

from janus_hooks.errors import JanusError

DATA_DIRS = ("hooks", "udev", "systemd", "templates")


class ResourceMissing(JanusError):
    """A data file that should ship with janus-hooks is not there (a broken install)."""


def _bases() -> list[Path]:
    package = Path(__file__).resolve().parent
    bases = [package / "data"]
    # Only a real checkout: beside an installed package sit other distributions' top-level directories.
    if (package.parent / "pyproject.toml").is_file():
        bases.append(package.parent)
    return bases


def data_dir(name: str) -> Path:
    """One of DATA_DIRS, from the wheel's data or the checkout."""
    if name not in DATA_DIRS:
        raise ValueError(f"unknown data directory {name!r}")
    for base in _bases():
        if (base / name).is_dir():
            return base / name
    raise ResourceMissing(f"janus-hooks' {name}/ files are missing from {Path(__file__).resolve().parent}")


def data_file(name: str, *parts: str) -> Path:
    """A file inside one of DATA_DIRS; raises ResourceMissing naming it when absent."""
    path = data_dir(name).joinpath(*parts)
    if not path.is_file():
        raise ResourceMissing(f"{path} is missing: reinstall janus-hooks")
    return path


def data_files(name: str, suffix: str) -> list[Path]:
    """Every file of one data directory ending in ``suffix``, sorted by name."""
    return sorted(p for p in data_dir(name).iterdir() if p.is_file() and p.name.endswith(suffix))
