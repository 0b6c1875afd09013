"""Closed schemas for what janus-hooks reads back and acts on as root: journal records and config values.

A validator takes a decoded JSON/TOML value and returns it (lists become tuples) or raises ``SchemaError``
with a short reason that never echoes the whole input. Names that end up in a path (PCI addresses, driver,
vtconsole and framebuffer names) or in an argv (unit and module names) match a pattern that excludes "/",
"..", a leading "-" and control characters. Stdlib only: the hook's release path imports it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

Validator = Callable[[Any], Any]
Schema = Mapping[str, Validator]

MAX_TOKEN = 64  # the longest input a message quotes


class SchemaError(ValueError):
    """A value that does not fit its schema; the message says why, quoting at most a short token."""


def quote(value: object) -> str:
    """A value as an error message may show it: repr, cut to MAX_TOKEN characters."""
    text = repr(value)
    return text if len(text) <= MAX_TOKEN else text[: MAX_TOKEN - 3] + "..."


def pattern(regex: str, what: str, max_len: int = 255) -> Validator:
    # Compiled on first use (re keeps it cached): the hook checks a handful of these, and compiling all of
    # them at import would cost every hook process a few milliseconds.
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise SchemaError(f"{what} must be a string, not {type(value).__name__}")
        if len(value) > max_len or not re.fullmatch(regex, value):
            raise SchemaError(f"{quote(value)} is not {what}")
        return value

    return check


PCI_ADDRESS = pattern(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]", "a PCI address (0000:01:00.0)")
UNIT_SUFFIXES = ("service", "socket", "target", "scope", "slice", "mount", "timer", "path", "device", "swap")
UNIT = pattern(r"[A-Za-z0-9_:@][A-Za-z0-9_:@.\\-]*\.(" + "|".join(UNIT_SUFFIXES) + ")", "a systemd unit name")
MODULE = pattern(r"[A-Za-z0-9_][A-Za-z0-9_-]*", "a kernel module name", 56)
DRIVER = pattern(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*", "a driver name", MAX_TOKEN)
VTCONSOLE = pattern(r"vtcon[0-9]{1,2}", "a vtconsole name (vtcon0)")
FRAMEBUFFER = pattern(r"(efi|simple|vesa)-framebuffer\.[0-9]{1,3}", "a boot framebuffer device")
SESSION = pattern(r"[A-Za-z0-9]{1,64}", "a logind session id")
BOOT_ID = pattern(r"[0-9a-f-]{1,64}|unknown", "a boot id")
VM_NAME = pattern(r"[^\x00-\x1f/]+|[^\x00-\x1f]*/[^\x00-\x1f]*", "a VM name", 1024)
# Lists ("0-3,8"), masks ("ff", "00000000,000000ff") and systemd's AllowedCPUs ("0-3 8").
CPU_SET = pattern(r"[0-9a-fA-F, -]*", "a CPU list or mask", 8192)
CGROUP = pattern(r"[A-Za-z0-9_][A-Za-z0-9_.@:-]*", "a top-level cgroup name", 255)
GOVERNOR = pattern(r"[a-z][a-z0-9_]{0,31}", "a cpufreq governor name")
RESET_METHOD = pattern(r"[a-z_]{1,32}", "a reset method")


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise SchemaError(f"{quote(value)} is not true or false")
    return value


def integer(low: int, high: int) -> Validator:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise SchemaError(f"{quote(value)} is not a whole number from {low} to {high}")
        return value

    return check


def number(low: float, high: float) -> Validator:
    """A finite int or float within [low, high] (nan and inf are refused: a wait must end)."""

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaError(f"{quote(value)} is not a number")
        if not math.isfinite(value) or not low <= value <= high:
            raise SchemaError(f"{quote(value)} is not a finite number from {low:g} to {high:g}")
        return float(value)

    return check


def empty_or(inner: Validator) -> Validator:
    """A string that is either empty (the default: not set) or fits ``inner``."""

    def check(value: Any) -> Any:
        return value if value == "" else inner(value)

    return check


def optional(inner: Validator) -> Validator:
    def check(value: Any) -> Any:
        return None if value is None else inner(value)

    return check


def list_of(inner: Validator, max_items: int = 256) -> Validator:
    def check(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, (list, tuple)):
            raise SchemaError(f"expected a list, not {type(value).__name__}")
        if len(value) > max_items:
            raise SchemaError(f"a list of {len(value)} items (at most {max_items})")
        return tuple(inner(v) for v in value)

    return check


def mapping(key: Validator, inner: Validator, max_items: int = 256) -> Validator:
    def check(value: Any) -> dict[Any, Any]:
        if not isinstance(value, dict):
            raise SchemaError(f"expected a table, not {type(value).__name__}")
        if len(value) > max_items:
            raise SchemaError(f"a table of {len(value)} entries (at most {max_items})")
        return {key(k): inner(v) for k, v in value.items()}

    return check


def _argument(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 4096 or "\0" in value:
        raise SchemaError(f"argument {quote(value)} is not a string of at most 4096 characters")
    return value


def argv(value: Any) -> tuple[str, ...]:
    """A command as an argv list whose program is an absolute path (never a shell line, never $PATH or
    the caller's working directory deciding what runs as root)."""
    items = list_of(_argument, 64)(value)
    if not items:
        return items
    program = items[0]
    if not program.startswith("/") or "/../" in program + "/" or "/./" in program + "/":
        raise SchemaError(f"program {quote(program)} is not an absolute path")
    return items


def record(schema: Schema, value: Any, required: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """Validate a JSON object against ``schema``: no key outside it, every ``required`` key present."""
    if not isinstance(value, dict):
        raise SchemaError(f"expected an object, not {type(value).__name__}")
    unknown = sorted(k for k in value if k not in schema)
    if unknown:
        raise SchemaError(f"unknown field {quote(unknown[0])}")
    missing = sorted(k for k in required if k not in value)
    if missing:
        raise SchemaError(f"missing field {quote(missing[0])}")
    result = {}
    for key, item in value.items():
        try:
            result[key] = schema[key](item)
        except SchemaError as err:
            raise SchemaError(f"{key}: {err}") from None
    return result
