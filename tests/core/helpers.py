"""Assertions shared by the core tests."""

from __future__ import annotations


def diff(before: dict, after: dict) -> list[str]:
    """Paths whose type or content differ between two tree snapshots."""
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def assert_same_tree(before: dict, after: dict) -> None:
    changed = diff(before, after)
    assert not changed, f"host tree differs at {changed[:10]}"
