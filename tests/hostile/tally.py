"""Counts of what the hostile and property suites did in this run (inputs tried, faults injected, races run,
host states checked and left changed), written by ``pytest --tally FILE`` for ``scripts/reliability``."""

from __future__ import annotations

from collections import Counter

COUNTS: Counter[str] = Counter()


def record(what: str, n: int = 1) -> None:
    COUNTS[what] += n


def check_host(before: dict, after: dict, what: str = "host tree", ignore: tuple[str, ...] = ()) -> None:
    """Compare two snapshots of a host tree (or of what lies outside it): counted as a host state checked,
    and as one left changed when they differ, before the assertion fails the test. ``ignore``: paths the
    test itself changed (the config file it broke)."""
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k) and k not in ignore)
    record("host states checked")
    if changed:
        record("host states left changed")
    assert not changed, f"{what} differs at {changed[:10]}"
