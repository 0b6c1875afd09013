"""CPU isolation rows: what isolating a pinned VM adds to its prepare (and release), against the bare writes.

On the fake kernel (``tests/fake/hosts.pinned_nvidia``: 8 threads, cpufreq, cgroup v2 under systemd, 11 IRQs
of which the kernel refuses 3, the workqueue masks), a VM with no GPU, pinned to cores 2 and 6, asking for
isolation with the governor and workqueue steps on: every step of its plan is an isolation step. The value
is janus' time for ``prepare`` (``release``) in process, Janus.open, XML, snapshot and plan included, minus
the time spent inside the fake kernel and fake systemd (as in the engine row).

Baseline: the bare writes of the same run, replayed: one plain file write of the same value per kernel write
janus made, and one per ``systemctl set-property`` (the cpuset.cpus write systemd makes for it), in the
journal's directory. The ratio is what capture, journal (fsynced intents), read-back checks and the scan of
other VMs' journals cost on top of the writes themselves. Not in either side: on a real host each
``systemctl set-property``/``stop`` is a process (milliseconds each), which this row cannot show.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.engine_rows import IoCounter, Timed
from bench.stats import BenchError, Row, ratio_row

GROUP = "isolation"
VM = "pinned"
CONFIG = """
[cpu]
governor = "performance"
workqueues = true
"""


def _xml() -> str:
    from tests.conftest import domain_xml

    cputune = "<cputune><vcpupin vcpu='0' cpuset='2'/><vcpupin vcpu='1' cpuset='6'/></cputune>"
    return domain_xml(name=VM, mode="passthrough", vcpu="<vcpu placement='static'>2</vcpu>", cputune=cputune,
                      isolate="yes")


def _bare_writes(values: list[str], scratch: Path) -> float:
    targets = [scratch / f"bare-{i}" for i in range(len(values))]
    for target in targets:
        target.write_text("0\n")
    start = time.perf_counter()
    for target, value in zip(targets, values, strict=True):
        fd = os.open(target, os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    seconds = time.perf_counter() - start
    for target in targets:
        target.unlink()
    return seconds


def measure(scratch: Path, runs: int, warmup: int) -> list[Row]:
    from janus_hooks.domain import parse_domain
    from janus_hooks.host import Host
    from janus_hooks.runtime import Janus
    from tests.fake import hosts
    from tests.fake.kernel import FakeKernel
    from tests.fake.services import FakeRunner, FakeServices
    from tests.fake.world import snapshot_tree

    root = scratch / "isolation-host"
    hosts.pinned_nvidia(root)
    (root / "etc/janus-hooks").mkdir(parents=True, exist_ok=True)
    (root / "etc/janus-hooks/janus.toml").write_text(CONFIG)
    before = snapshot_tree(root)
    counter = IoCounter(root)
    kernel, fake_services = FakeKernel(root), FakeServices(root)
    services, runner = Timed(fake_services, counter), Timed(FakeRunner(root), counter)
    host = Host(root, Timed(kernel, counter))
    spec = parse_domain(_xml())
    journal_dir = root / "var/lib/janus-hooks/journal"
    info: dict[str, Any] = {}

    def timed(phase: str, body: Callable[[], Any]) -> tuple[float, list[str]]:
        log_before, calls_before = len(kernel.log), len(fake_services.calls)
        counter.reset()
        start = time.perf_counter()
        body()
        wall = time.perf_counter() - start
        writes = [value for op, _rel, value in kernel.log[log_before:] if op == "write"]
        set_property = [t for c, t in fake_services.calls[calls_before:] if c == "set-property"]
        values = writes + [t.split("=", 1)[1] for t in set_property]
        info[phase] = {"wall_ms": wall * 1000, "fake_ms": counter.collab_seconds * 1000,
                       "kernel_writes": len(writes), "set_property": len(set_property),
                       "other_systemctl": len(fake_services.calls) - calls_before - len(set_property)}
        return wall - counter.collab_seconds, values

    def prepare() -> None:
        plan, report = Janus.open(host, services=services, runner=runner).prepare(spec)
        if report is None or len(report.steps) != len(plan.actions) or not plan.actions:
            raise BenchError(f"VM {VM} was not isolated: {plan.render()}")
        info["steps"] = len(report.steps)

    def release() -> None:
        report = Janus.open(host, services=services, runner=runner).release(VM)
        if report.reverted != info["steps"]:
            raise BenchError(f"release reverted {report.reverted} of {info['steps']} isolation steps")

    results: dict[str, list[float]] = {"prepare": [], "release": [], "bare-prepare": [], "bare-release": []}
    for round_ in range(warmup + runs):
        for phase, body in (("prepare", prepare), ("release", release)):
            seconds, values = timed(phase, body)
            bare = _bare_writes(values, journal_dir)
            if round_ >= warmup:
                results[phase].append(seconds)
                results[f"bare-{phase}"].append(bare)
    after = snapshot_tree(root)
    changed = [k for k in set(before) | set(after)
               if before.get(k) != after.get(k) and not k.startswith("run/systemd/system.control")]
    if changed:
        raise BenchError(f"the fake host differs after prepare+release at {sorted(changed)[:3]}")
    rows = []
    for phase in ("prepare", "release"):
        i = info[phase]
        note = (f"{info['steps']} isolation steps (AllowedCPUs x3, governor, irqbalance, default IRQ affinity, "
                f"IRQs, 2 workqueue masks); {i['kernel_writes']} kernel writes + {i['set_property']} "
                f"set-property + {i['other_systemctl']} other systemctl; wall {i['wall_ms']:.1f} ms of which fake "
                f"kernel/systemd {i['fake_ms']:.1f} ms (excluded); janus fsyncs "
                f"{info['steps'] + 1 if phase == 'prepare' else info['steps']} journal records (begin and one intent "
                "per step; one reverted record per step), which the bare writes do not")
        row = ratio_row(GROUP, f"isolation: pinned VM {phase} (fake kernel)", results[phase],
                        results[f"bare-{phase}"], baseline_label="the same values written to plain files",
                        note=note)
        row.extra = dict(i)
        rows.append(row)
    return rows
