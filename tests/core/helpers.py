"""Assertions shared by the core tests."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def diff(before: dict, after: dict) -> list[str]:
    """Paths whose type or content differ between two tree snapshots."""
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def assert_same_tree(before: dict, after: dict) -> None:
    changed = diff(before, after)
    assert not changed, f"host tree differs at {changed[:10]}"


def kill_hook_at(root: Path, vm: str, xml_file: Path, event: str, step: int, timeout: float = 120) -> None:
    """Run the hook's prepare on the fake host at ``root`` in a child that kill -9s itself at ``step``'s
    ``event`` (tests/core/crash_child.py), and check that it died that way."""
    child = subprocess.run(
        [sys.executable, "-m", "tests.core.crash_child", str(root), vm, str(xml_file), event, str(step)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
