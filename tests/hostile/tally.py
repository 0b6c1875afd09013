"""Counts of what the hostile and property suites did in this run (inputs tried, faults injected, races run,
host states checked), written by ``pytest --tally FILE`` for ``scripts/reliability`` to print."""

from __future__ import annotations

from collections import Counter

COUNTS: Counter[str] = Counter()


def record(what: str, n: int = 1) -> None:
    COUNTS[what] += n
