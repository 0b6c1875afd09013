"""Row records, medians and spreads, and the interleaved runner every row uses."""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

# Row status: measured, not measurable yet for a documented reason (does not fail the run), or failed.
OK, NOT_AVAILABLE, FAILED = "ok", "n/a", "FAILED"


class BenchError(Exception):
    """A row could not be measured; the message says why in one sentence."""


@dataclass
class Row:
    group: str
    name: str
    value: float | None = None
    baseline: float | None = None
    unit: str = "ms"
    ratio: float | None = None
    goal: str = ""  # e.g. "<= 1.5x" (on the ratio) or "<= 50 ms" (on the value)
    goal_met: bool | None = None
    spread: str = ""
    runs: int | None = None
    baseline_label: str = ""
    note: str = ""
    status: str = OK
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def quartiles(samples: list[float]) -> tuple[float, float]:
    if len(samples) < 2:
        return samples[0], samples[0]
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, q3


def iqr_percent(samples: list[float]) -> float:
    """Half the interquartile range as a percentage of the median: the +-% column."""
    q1, q3 = quartiles(samples)
    mid = median(samples)
    return 0.0 if mid == 0 else (q3 - q1) / 2 / mid * 100


def spread_text(samples: list[float], ratios: list[float] | None = None) -> str:
    """``+-x%`` of the value (half its IQR), and the IQR of the per-round ratios when rounds were paired."""
    text = f"+-{iqr_percent(samples):.1f}%"
    if ratios:
        lo, hi = quartiles(ratios)
        text += f" (ratio IQR {lo:.2f}-{hi:.2f})"
    return text


def ratio_row(group: str, name: str, samples: list[float], base: list[float], *, unit: str = "ms",
              scale: float = 1000.0, goal_ratio: float | None = None, goal_value: float | None = None,
              baseline_label: str = "", note: str = "", paired: bool = True) -> Row:
    """A row from raw samples in seconds: medians, ratio of medians, goal check, spread."""
    value, baseline = median(samples) * scale, median(base) * scale
    ratio = value / baseline if baseline else None
    ratios = [s / b for s, b in zip(samples, base, strict=False) if b] if paired else None
    row = Row(group, name, value, baseline, unit, ratio, spread=spread_text(samples, ratios), runs=len(samples),
              baseline_label=baseline_label, note=note)
    if goal_ratio is not None and ratio is not None:
        row.goal, row.goal_met = f"<= {goal_ratio:g}x", ratio <= goal_ratio
    elif goal_value is not None:
        row.goal, row.goal_met = f"<= {goal_value:g} {unit}", value <= goal_value
    return row


def interleave(variants: dict[str, Callable[[], float]], runs: int, warmup: int = 0,
               seed: int = 6) -> dict[str, list[float]]:
    """Run every variant once per round, in a fresh random order each round, so drift hits all alike.

    Each callable measures itself and returns seconds (so its own setup is never timed). Warm-up rounds
    run the same way and are discarded.
    """
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_ in range(warmup + runs):
        rng.shuffle(names)
        for name in names:
            seconds = variants[name]()
            if round_ >= warmup:
                samples[name].append(seconds)
    return samples
