"""CPU sets in the kernel's and libvirt's spellings: lists ("0-3,8") and hex masks ("ff", "00000000,000000ff").

Pure and stdlib-only: the domain parser, the host model and the isolation steps all speak these.
"""

from __future__ import annotations

from collections.abc import Iterable

MAX_CPUS = 8192  # the kernel's NR_CPUS at its largest


def parse_cpulist(text: str) -> frozenset[int]:
    """A cpulist ("0-3,8", the kernel's ``*_list`` files and cpuset.cpus), a libvirt cpuset ("1-4,^3") or
    systemd's spelling ("0-3 8", as ``systemctl show -p AllowedCPUs`` prints it).

    ``^N`` excludes (libvirt); ``a-b:s`` takes every s-th (the kernel's stride form). Raises ValueError.
    """
    cpus: set[int] = set()
    excluded: set[int] = set()
    for part in text.replace(",", " ").split():
        target = excluded if part.startswith("^") else cpus
        part = part.lstrip("^")
        stride = 1
        if ":" in part:
            part, step = part.split(":", 1)
            stride = int(step.split("/", 1)[0])
        if "-" in part:
            lo, hi = (int(x) for x in part.split("-", 1))
            if hi < lo or stride < 1:
                raise ValueError(f"bad CPU range {part[:32]!r}")
            if hi >= MAX_CPUS:
                # A hostile "0-1000000000000" must not build the whole set.
                raise ValueError(f"CPU {hi} is beyond the kernel's limit of {MAX_CPUS}")
            target.update(range(lo, hi + 1, stride))
        else:
            target.add(int(part))
    if any(c < 0 or c >= MAX_CPUS for c in cpus | excluded):
        raise ValueError(f"a CPU number in {text[:32]!r} is negative or beyond {MAX_CPUS}")
    return frozenset(cpus - excluded)


def format_cpulist(cpus: Iterable[int]) -> str:
    """The shortest cpulist: {0, 1, 2, 5} -> "0-2,5"; empty -> ""."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def parse_cpumask(text: str) -> frozenset[int]:
    """A hex mask as /proc/irq/default_smp_affinity and workqueue ``cpumask`` files show it:
    32-bit groups separated by commas, most significant first. Raises ValueError."""
    digits = text.strip().replace(",", "")
    if not digits:
        raise ValueError("empty CPU mask")
    value = int(digits, 16)
    return frozenset(i for i in range(value.bit_length()) if value >> i & 1)


def format_cpumask(cpus: Iterable[int], like: str = "") -> str:
    """A hex mask in the kernel's grouping; ``like`` (a mask read from the same file) sets the width so
    that what is written back looks like what was read."""
    value = 0
    for cpu in cpus:
        value |= 1 << cpu
    groups = max(like.count(",") + 1 if like else 1, (value.bit_length() + 31) // 32, 1)
    if groups == 1 and "," not in like:
        width = max(len(like.strip()), 1)
        return f"{value:0{width}x}"
    words = [(value >> (32 * i)) & 0xFFFFFFFF for i in reversed(range(groups))]
    return ",".join(f"{w:08x}" for w in words)
