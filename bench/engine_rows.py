"""Row 2: the engine's own time for a full single-GPU + hugepages prepare and release on the fake kernel.

Everything is wired through constructors, as tests/conftest.py's FakeHost does; nothing is patched:
- reads are counted by giving ``Host`` a root whose Path class counts every filesystem access made through
  it (each os-level access on a Path calls ``__fspath__`` exactly once);
- writes and module operations are counted by FakeKernel (``.ops``/``.log``) behind a wrapper that also
  times them; FakeServices and FakeRunner are timed the same way.
The value is the wall time minus the time spent inside those fake collaborators (the fake kernel parses
its world description on many writes; a real kernel's own time is not janus' either).

Baseline: the raw I/O floor of the same run. Every filesystem access janus made below the root is replayed
as the bare syscall its kind needs (open+read, stat, readlink or listdir), plus as many plain file writes as
kernel writes, plus as many fsynced appends as journal records, in the same directory as the journal. The
ratio says how much of the engine's time is its own logic rather than I/O it cannot avoid.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path, PosixPath
from typing import Any

from bench.common import domain_xml, fs_type
from bench.stats import BenchError, Row, ratio_row

GROUP = "engine"
VM = "win11"
KERNEL_PREFIXES = ("sys/", "proc/")
STATE_PREFIXES = ("var/lib/janus-hooks", "var/log/janus-hooks", "etc/janus-hooks")


class IoCounter:
    """Counts filesystem accesses below one root, by kind, while ``active``; remembers them for the replay."""

    def __init__(self, root: Path) -> None:
        self.root = str(root).rstrip("/") + "/"
        self.active = False
        self.depth = 0  # >0: inside a counted method or a fake collaborator; nested accesses are not new
        self.accesses: list[tuple[str, str]] = []  # (kind, absolute path)
        self.collab_seconds = 0.0

    def reset(self) -> None:
        self.accesses = []
        self.collab_seconds = 0.0

    def record(self, kind: str, path: str) -> None:
        if self.active and self.depth == 0 and path.startswith(self.root):
            self.accesses.append((kind, path))

    def summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for kind, path in self.accesses:
            rel = path[len(self.root):]
            where = ("kernel" if rel.startswith(KERNEL_PREFIXES)
                     else "state" if rel.startswith(STATE_PREFIXES) else "system")
            counts[f"{where}_{kind}"] = counts.get(f"{where}_{kind}", 0) + 1
        return counts

    def path_class(self) -> type[PosixPath]:
        counter = self

        def counted(kind: str, method: Callable) -> Callable:
            def wrapper(self: PosixPath, *args: Any, **kwargs: Any) -> Any:
                counter.record(kind, str(self))
                counter.depth += 1
                try:
                    return method(self, *args, **kwargs)
                finally:
                    counter.depth -= 1
            return wrapper

        attrs: dict[str, Any] = {name: counted("read", getattr(PosixPath, name))
                                 for name in ("read_text", "read_bytes", "open")}
        attrs |= {name: counted("stat", getattr(PosixPath, name))
                  for name in ("stat", "lstat", "exists", "is_dir", "is_file", "is_symlink")}

        def fspath(self: PosixPath) -> str:
            text = str(self)
            counter.record("link_or_dir", text)  # os.readlink, os.listdir, os.scandir, os.open
            return text

        attrs["__fspath__"] = fspath
        return type("CountingPath", (PosixPath,), attrs)


class Timed:
    """Wraps a fake collaborator: forwards every call, and keeps its time and its path accesses out of
    janus' own figures (the fake kernel and fake systemd play the kernel's and systemd's part)."""

    def __init__(self, inner: Any, counter: IoCounter) -> None:
        self._inner = inner
        self._counter = counter

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr
        counter = self._counter

        def call(*args: Any, **kwargs: Any) -> Any:
            # Paths go to the fake as plain Paths: str() does not touch the filesystem or the counter.
            args = tuple(Path(str(a)) if isinstance(a, PosixPath) else a for a in args)
            start = time.perf_counter()
            counter.depth += 1
            try:
                return attr(*args, **kwargs)
            finally:
                counter.depth -= 1
                counter.collab_seconds += time.perf_counter() - start
        return call


def _replay_ops(accesses: list[tuple[str, str]]) -> list[tuple[Callable[[str], Any], str]]:
    """The bare syscall for each recorded access, decided before timing (lstat now, not in the loop)."""
    ops = []

    def read(p: str) -> None:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.read(fd, 65536)
        finally:
            os.close(fd)

    for kind, path in accesses:
        if kind == "read":
            ops.append((read, path))
        elif kind == "stat":
            ops.append((os.stat, path))
        elif os.path.islink(path):
            ops.append((os.readlink, path))
        elif os.path.isdir(path):
            ops.append((os.listdir, path))
        else:
            ops.append((os.stat, path))
    return ops


def _floor(ops: list[tuple[Callable[[str], Any], str]], writes: int, appends: int, scratch: Path) -> float:
    target, log = scratch / "floor-write", scratch / "floor-journal"
    target.write_text("0\n")
    start = time.perf_counter()
    for op, path in ops:
        try:
            op(path)
        except OSError:
            pass  # a path that only existed mid-switch: the failed syscall still costs its lookup
    for _ in range(writes):
        fd = os.open(target, os.O_WRONLY)
        os.write(fd, b"vfio-pci")
        os.close(fd)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(appends):
            os.write(fd, b'{"type":"intent","step":0,"action":{"kind":"bind-vfio"},"old":{}}\n')
            os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    log.unlink()
    return seconds


def measure(scratch: Path, runs: int, warmup: int) -> list[Row]:
    from janus_hooks.domain import parse_domain
    from janus_hooks.host import Host
    from janus_hooks.runtime import Janus
    from tests.fake import hosts
    from tests.fake.kernel import FakeKernel
    from tests.fake.services import FakeRunner, FakeServices
    from tests.fake.world import snapshot_tree

    root = scratch / "engine-host"
    hosts.single_nvidia(root)
    before = snapshot_tree(root)
    counter = IoCounter(root)
    kernel = FakeKernel(root)
    services, runner = Timed(FakeServices(root), counter), Timed(FakeRunner(root), counter)
    host = Host(root, Timed(kernel, counter))
    host.root = counter.path_class()(root)  # every path the engine builds derives from this root
    xml = domain_xml(VM, mode="single-gpu", hostdevs=hosts.NVIDIA_FUNCTIONS, memory_mib=8192, hugepages=True)
    journal = root / "var/lib/janus-hooks/journal" / f"{VM}.jsonl"
    last: dict[str, dict[str, Any]] = {}
    floor_ops: dict[str, tuple[list, int, int]] = {}

    def run(phase: str, body: Callable[[], Any]) -> float:
        ops_before, log_before = kernel.ops, len(kernel.log)
        counter.reset()
        counter.active = True
        start = time.perf_counter()
        try:
            body()
        finally:
            wall = time.perf_counter() - start
            counter.active = False
        new_log = kernel.log[log_before:]
        writes = sum(1 for op in new_log if op[0] == "write")
        appends = journal_records(phase)
        last[phase] = {"wall": wall, "collab": counter.collab_seconds, "io": counter.summary(),
                       "writes": writes, "module_ops": len(new_log) - writes, "kernel_ops": kernel.ops - ops_before,
                       "journal_records": appends}
        floor_ops[phase] = (_replay_ops(counter.accesses), writes, appends)
        return wall - counter.collab_seconds

    def journal_records(phase: str) -> int:
        if phase == "prepare":
            return len(journal.read_text().splitlines()) if journal.exists() else 0
        return prepared_steps  # release appends one "reverted" record per step

    prepared_steps = 0

    def prepare() -> None:
        nonlocal prepared_steps
        plan, report = Janus.open(host, services=services, runner=runner).prepare(parse_domain(xml))
        if report is None:
            raise BenchError(f"VM {VM} was not treated as managed: {plan.render()}")
        prepared_steps = len(report.steps)
        last["plan"] = {"steps": len(report.steps), "text": plan.render()}

    def release() -> None:
        report = Janus.open(host, services=services, runner=runner).release(VM)
        if report.reverted != prepared_steps:
            raise BenchError(f"release reverted {report.reverted} of {prepared_steps} steps")

    # prepare and release alternate by nature; each floor is replayed right after, on the restored tree,
    # so drift hits the engine and its floor alike. Warm-up rounds (imports, caches) are discarded.
    results: dict[str, list[float]] = {"prepare": [], "release": [], "floor-prepare": [], "floor-release": []}
    for round_ in range(warmup + runs):
        timings = {"prepare": run("prepare", prepare), "release": run("release", release)}
        for phase in ("prepare", "release"):
            ops, writes, appends = floor_ops[phase]
            floor = _floor(ops, writes, appends, journal.parent)
            if round_ >= warmup:
                results[phase].append(timings[phase])
                results[f"floor-{phase}"].append(floor)
    if snapshot_tree(root) != before:
        raise BenchError("the fake host tree differs from before after prepare+release: release is incomplete")

    fs = fs_type(root)
    rows = []
    for phase in ("prepare", "release"):
        info = last[phase]
        io = info["io"]
        note = (
            f"{last['plan']['steps']} steps; wall {info['wall'] * 1000:.1f} ms of which fake kernel/systemd "
            f"{info['collab'] * 1000:.1f} ms (excluded); sysfs+procfs accesses: {io.get('kernel_read', 0)} reads, "
            f"{io.get('kernel_stat', 0)} stats, {io.get('kernel_link_or_dir', 0)} readlink/listdir; "
            f"{info['writes']} sysfs writes + {info['module_ops']} module ops (FakeKernel.ops +{info['kernel_ops']}); "
            f"other host files {sum(v for k, v in io.items() if k.startswith('system_'))}, janus' own files "
            f"{sum(v for k, v in io.items() if k.startswith('state_'))} accesses; {info['journal_records']} fsynced "
            f"journal records on {fs}"
        )
        row = ratio_row(GROUP, f"engine: single-GPU + hugepages {phase} (fake kernel)", results[phase],
                        results[f"floor-{phase}"], goal_value=50.0,
                        baseline_label="raw I/O floor of the same accesses, writes and fsyncs", note=note)
        row.extra = {k: v for k, v in info.items()}
        rows.append(row)
    rows[0].extra["plan"] = last["plan"]["text"]
    return rows
