"""Row 5: the hook's slow path as a process: ``prepare begin`` of a managed single-GPU + hugepages VM, then
its ``release end``, on a fake host tree, against the interpreter's floor.

What runs is the installed hook: hooks/qemu rendered as an install writes it (absolute venv interpreter,
``-IS``, package path and host root fixed), libvirt's three-variable environment, the domain XML through a
pipe, the default janus.toml that install writes. One line differs: the shim's last line calls
``main(argv, root=..., open_janus=...)`` with the host's Kernel, Services and Runner seams answered by this
process (bench/seam_client.py, tests/fake on the tree), since the tree has no kernel behind it.

The value is the hook's wall time from spawn to exit minus the time it spent in those seams (timed inside
the hook, round trip included; a real kernel's and systemd's own time is not janus' either) and minus
importing the seam client. Everything else counts: interpreter start, imports, config, XML, snapshot,
plan, journal fsyncs, log file, exit.

The import structure is read from one more prepare run under ``-X importtime`` (inflated by the tracing,
so only its shares are meaningful): the modules imported beyond the floor's, by first importer.
"""

from __future__ import annotations

import json
import os
import random
import resource
import select
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    FLOOR_ARGV,
    HOOK_ENV,
    REPO,
    SPAWN_TIMEOUT,
    VENV_PYTHON,
    domain_xml,
    fs_type,
    render_shim,
    timed_spawn,
)
from bench.seam_client import decode, encode
from bench.stats import BenchError, Row, median, ratio_row

GROUP = "slowpath"
VM = "win11-slowpath"
SHIM_CALL = "sys.exit(main(sys.argv[1:], root=JANUS_ROOT))"
# The launcher's last lines instead of SHIM_CALL: the seam client's import is timed and subtracted.
LAUNCH = """import time as _bench_time  # noqa: E402
_bench_start = _bench_time.perf_counter()
from bench.seam_client import run_hook  # noqa: E402
sys.exit(run_hook(main, sys.argv[3:], JANUS_ROOT, int(sys.argv[1]), int(sys.argv[2]),
                  _bench_time.perf_counter() - _bench_start))
"""
SEP = "\x1f"
TRACED_RUNS = 3  # prepares under -X importtime (one with --quick); each module's least time is kept


def render_launcher(dest: Path, root: Path) -> Path:
    """The shim as installed, but for its last line (see the module's docstring)."""
    shim = render_shim(dest, root=str(root))
    text = shim.read_text()
    if text.count(SHIM_CALL) != 1:
        raise BenchError(f"hooks/qemu changed shape: no single line {SHIM_CALL!r} to hand the seams over")
    shim.write_text(text.replace(SHIM_CALL + "\n", LAUNCH))
    return shim


class SeamServer:
    """Plays the hook's Kernel, Services and Runner on the tree with tests/fake, one request at a time."""

    def __init__(self, root: Path) -> None:
        from tests.fake.kernel import FakeKernel
        from tests.fake.services import FakeRunner, FakeServices

        self.kernel, self.services, self.runner = FakeKernel(root), FakeServices(root), FakeRunner(root)

    def handle(self, fields: list[str]) -> list[str]:
        from janus_hooks.errors import JanusError

        seam, method, *rest = fields
        fake = {"kernel": self.kernel, "services": self.services, "runner": self.runner}.get(seam)
        if fake is None or method.startswith("_") or not callable(getattr(fake, method, None)):
            raise BenchError(f"the hook called {seam}.{method}, which the fakes do not play")
        args, kwargs, i = [], {}, 0
        while i < len(rest):
            if rest[i].startswith("="):
                kwargs[rest[i][1:]] = decode(rest[i + 1], Path)
                i += 2
            else:
                args.append(decode(rest[i], Path))
                i += 1
        try:
            result = getattr(fake, method)(*args, **kwargs)
        except JanusError as err:  # the hook raises the same class with the same message
            return ["err", type(err).__name__, str(err)]
        if seam == "runner":
            return ["ok", encode((str(result.returncode), result.stdout, result.stderr))]
        return ["ok", encode(result)]


def _frame(fields: list[str]) -> bytes:
    data = SEP.join(fields).encode()
    return b"%08d" % len(data) + data


class _Reader:
    """Frames from the hook's request pipe, each read bounded by the run's deadline."""

    def __init__(self, fd: int, deadline: float) -> None:
        self.fd, self.deadline, self.buf = fd, deadline, b""

    def _fill(self) -> bool:
        left = self.deadline - time.monotonic()
        if left <= 0 or not select.select([self.fd], [], [], left)[0]:
            raise BenchError(f"the hook sent nothing for {SPAWN_TIMEOUT:g} s")
        chunk = os.read(self.fd, 65536)
        self.buf += chunk
        return bool(chunk)

    def frame(self) -> list[str] | None:
        while len(self.buf) < 8:
            if not self._fill():
                return None
        size = int(self.buf[:8])
        while len(self.buf) < 8 + size:
            if not self._fill():
                raise BenchError("the hook's seam pipe closed mid-message")
        data, self.buf = self.buf[8:8 + size], self.buf[8 + size:]
        return data.decode().split(SEP)


def run_hook(launcher: Path, server: SeamServer, phase: tuple[str, str], xml: bytes,
             argv_prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """One hook process, seams served here. Returns wall and seam seconds; refuses a hook that failed."""
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    done: list[str] | None = None
    with tempfile.TemporaryFile() as err:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        try:
            proc = subprocess.Popen([*argv_prefix, str(launcher), str(rep_r), str(req_w), VM, *phase, "-"],  # noqa: S603
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err,
                                    env=HOOK_ENV, pass_fds=(rep_r, req_w))
        finally:
            os.close(rep_r)
            os.close(req_w)
        try:
            assert proc.stdin is not None
            proc.stdin.write(xml)  # a few kB: fits the pipe, the hook reads it all before any seam call
            proc.stdin.close()
            reader = _Reader(req_r, time.monotonic() + SPAWN_TIMEOUT)
            while (fields := reader.frame()) is not None:
                if fields[0] == "done":
                    done = fields
                    continue
                os.write(rep_w, _frame(server.handle(fields)))
            code = proc.wait(timeout=max(0.1, reader.deadline - time.monotonic()))
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
        except (BenchError, subprocess.TimeoutExpired) as error:
            proc.kill()
            proc.wait(timeout=10)
            raise BenchError(f"hook {' '.join(phase)} for VM {VM}: {error}") from error
        finally:
            os.close(req_r)
            os.close(rep_w)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if code != 0 or done is None:
        last = stderr.strip().splitlines()
        raise BenchError(f"hook {' '.join(phase)} for VM {VM} exited {code}: {last[-1] if last else 'no message'}")
    seams, calls, client_import = float(done[1]), int(done[2]), float(done[3])
    # The hook's own CPU time (user + system): less sensitive than wall time to a neighbour's load.
    cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    return {"wall": wall, "seams": seams, "calls": calls, "client_import": client_import, "cpu": cpu,
            "stderr": stderr}


def import_lines(stderr: str) -> list[tuple[int, str, float, float]]:
    """``-X importtime`` lines in order: (depth, module, self ms, cumulative ms)."""
    lines = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = line[len("import time:"):].split("|")
        if not parts[0].strip().isdigit():
            continue  # the header line
        raw = parts[2]
        depth = (len(raw) - len(raw.lstrip(" ")) - 1) // 2
        lines.append((depth, raw.strip(), int(parts[0]) / 1000, int(parts[1]) / 1000))
    return lines


def least_of(runs: list[str]) -> list[tuple[int, str, float, float]]:
    """Several traces of the same run, each module's least times: the run is deterministic, the load is not."""
    traces = [import_lines(stderr) for stderr in runs]
    if any([line[:2] for line in t] != [line[:2] for line in traces[0]] for t in traces):
        return traces[0]  # the import order differed: keep one trace rather than mix them
    return [(d, name, min(t[i][2] for t in traces), min(t[i][3] for t in traces))
            for i, (d, name, _, _) in enumerate(traces[0])]


def import_tree(lines: list[tuple[int, str, float, float]]) -> list[tuple[int, str, float, float, list]]:
    """The lines as a forest: (depth, module, self ms, cumulative ms, children), in order."""
    pending: dict[int, list] = {}
    roots = []
    for depth, name, self_ms, cum_ms in lines:
        node = (depth, name, self_ms, cum_ms, pending.pop(depth + 1, []))
        (roots if depth == 0 else pending.setdefault(depth, [])).append(node)
    return roots


def summarize_imports(hook_traces: list[str], floor_trace: str) -> dict[str, Any]:
    """What the hook imports beyond the interpreter's floor: by top-level importer, janus' own module bodies,
    and the standard-library modules janus imports directly (≥ 1 ms)."""
    floor = {line[1] for line in import_lines(floor_trace)}
    # The seam client is the bench's, not the hook's (its import is timed and subtracted).
    tops = [n for n in import_tree(least_of(hook_traces)) if n[1] not in floor and not n[1].startswith("bench")]
    janus_self, direct = 0.0, {}

    def walk(node: tuple, parent: str) -> None:
        nonlocal janus_self
        _, name, self_ms, cum_ms, children = node
        if name.startswith("janus_hooks"):
            janus_self += self_ms
        elif parent.startswith("janus_hooks") and cum_ms >= 1.0:
            direct[name] = (cum_ms, parent)
        for child in children:
            walk(child, name)

    for top in tops:
        walk(top, "")
    return {
        "janus_modules": [line[1] for line in import_lines(hook_traces[0]) if line[1].startswith("janus_hooks")],
        "total_ms": sum(n[3] for n in tops),
        "top_level": [(n[1], n[3]) for n in sorted(tops, key=lambda n: -n[3])],
        "janus_module_bodies_ms": janus_self,
        "stdlib_by_janus": sorted(((name, cum, parent) for name, (cum, parent) in direct.items()),
                                  key=lambda x: -x[1]),
    }


# Run in a child: how many dataclasses importing janus' slow-path modules creates, and what one costs here.
DATACLASS_PROBE = """
import dataclasses, json, sys, time
sys.path.insert(0, {repo!r})
created = []
process_class = dataclasses._process_class
def counting(cls, *args, **kwargs):
    created.append(cls.__module__ + "." + cls.__qualname__)
    return process_class(cls, *args, **kwargs)
dataclasses._process_class = counting
for name in {modules!r}:
    __import__(name)
dataclasses._process_class = process_class
best = 1.0
for _ in range(250):  # each timed alone: the least is what one costs when no neighbour interrupts it
    start = time.perf_counter()
    @dataclasses.dataclass(frozen=True)
    class Probe:
        a: str
        b: str = ""
        c: int = 0
        d: tuple = ()
    best = min(best, time.perf_counter() - start)
print(json.dumps({{"classes": len(created), "seconds_each": best}}))
"""


def dataclass_tax(modules: list[str]) -> dict[str, Any]:
    """Dataclasses created by importing ``modules`` (counted, in a child process) and the least cost of
    creating one frozen 4-field dataclass there: what that style costs each hook start."""
    proc = subprocess.run([VENV_PYTHON, "-I", "-S", "-c", DATACLASS_PROBE.format(repo=str(REPO), modules=modules)],  # noqa: S603
                          capture_output=True, text=True, env=HOOK_ENV, timeout=SPAWN_TIMEOUT, check=False)
    if proc.returncode != 0:
        raise BenchError(f"counting the slow path's dataclasses failed: {proc.stderr.strip().splitlines()[-1:]}")
    info = json.loads(proc.stdout)
    return {"classes": info["classes"], "ms_each": info["seconds_each"] * 1000,
            "ms_total": info["classes"] * info["seconds_each"] * 1000}


def _imports_note(info: dict[str, Any]) -> str:
    tops = ", ".join(f"{name} {ms:.1f}" for name, ms in info["top_level"] if ms >= 0.5)
    stdlib = ", ".join(f"{name} {ms:.1f} (from {parent})" for name, ms, parent in info["stdlib_by_janus"])
    dc = info["dataclasses"]
    return (f"imports beyond the floor's, least of {info['traced_runs']} prepare(s) under -X importtime "
            f"(inflated by the tracing): {info['total_ms']:.1f} ms; top-level: {tops}; of which janus' own "
            f"module bodies {info['janus_module_bodies_ms']:.1f} ms; stdlib modules janus imports first (>= 1 ms): "
            f"{stdlib or 'none'}; dataclasses created by these imports: {dc['classes']}, one costs "
            f"{dc['ms_each']:.2f} ms here (least of 250 creations, untraced): about {dc['ms_total']:.1f} ms")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def row_value(samples: list[float]) -> float:
    return median(samples) * 1000


def journal_intents(journal: Path) -> int:
    return sum(json.loads(line)["type"] == "intent" for line in journal.read_text().splitlines() if line.strip())


def journal_sync_floor(directory: Path, records: int) -> float:
    """Seconds for ``records`` appends each followed by fdatasync, then one directory fsync, in ``directory``:
    what janus_hooks/journal.py makes durable (prepare: begin and every intent, and the file's creation;
    release: one "reverted" per step, and the file's removal)."""
    path = directory / "bench-sync-floor"
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(records):
            os.write(fd, b'{"action":{"kind":"bind-vfio"},"old":{},"step":0,"type":"intent"}\n')
            os.fdatasync(fd)
    finally:
        os.close(fd)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def measure(scratch: Path, runs: int, warmup: int) -> list[Row]:
    from tests.fake import hosts
    from tests.fake.world import snapshot_tree

    root = scratch / "slowpath-host"
    hosts.single_nvidia(root)
    config = root / "etc/janus-hooks/janus.toml"  # what `janus-hooks install` writes
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text((REPO / "templates/janus.toml").read_text())
    launcher = render_launcher(scratch / "slowpath-hook/qemu.d/janus-hooks", root)
    xml = domain_xml(VM, mode="single-gpu", hostdevs=hosts.NVIDIA_FUNCTIONS, memory_mib=8192,
                     hugepages=True).encode()
    journal = root / "var/lib/janus-hooks/journal" / f"{VM}.jsonl"
    before = snapshot_tree(root)
    server = SeamServer(root)

    def hook(phase: tuple[str, str], prefix: tuple[str, ...] = ()) -> dict[str, Any]:
        result = run_hook(launcher, server, phase, xml, prefix)
        if journal.exists() != (phase == ("prepare", "begin")):
            raise BenchError(f"hook {' '.join(phase)} for VM {VM} exited 0 but the journal is "
                             f"{'absent' if phase[0] == 'prepare' else 'still open'}: it did not switch")
        return result

    samples: dict[str, list[float]] = {"prepare": [], "release": [], "floor": []}
    cpu: dict[str, list[float]] = {"prepare": [], "release": [], "floor": []}
    syncs: dict[str, list[float]] = {"prepare": [], "release": []}
    last: dict[str, dict[str, Any]] = {}
    rng = random.Random(9)
    for round_ in range(warmup + runs):
        # prepare comes before release by nature; the floor takes a random slot among them.
        order = ["prepare", "release"]
        order.insert(rng.randrange(3), "floor")
        for name in order:
            if name == "floor":
                used = children_cpu()
                seconds = timed_spawn(FLOOR_ARGV, xml)
                cpu_seconds = children_cpu() - used
            else:
                result = last[name] = hook(("prepare", "begin") if name == "prepare" else ("release", "end"))
                seconds = result["wall"] - result["seams"] - result["client_import"]
                cpu_seconds = result["cpu"]
                if name == "prepare":
                    intents = journal_intents(journal)
                # What the journal's durable records cost on this filesystem, replayed right after the hook.
                fsync_seconds = journal_sync_floor(journal.parent, intents + (name == "prepare"))
                last[name]["journal_fdatasyncs"] = intents + (name == "prepare")
            if round_ >= warmup:
                samples[name].append(seconds)
                cpu[name].append(cpu_seconds)
                if name != "floor":
                    syncs[name].append(fsync_seconds)
    if snapshot_tree(root) != before:
        raise BenchError("the fake host tree differs from before after prepare+release: release is incomplete")

    traces = []
    for _ in range(TRACED_RUNS if runs >= 10 else 1):
        traces.append(hook(("prepare", "begin"), (VENV_PYTHON, "-I", "-S", "-X", "importtime"))["stderr"])
        hook(("release", "end"))
    floor_trace = subprocess.run([*FLOOR_ARGV[:3], "-X", "importtime", "-c", "pass"], capture_output=True,  # noqa: S603
                                 text=True, env=HOOK_ENV, timeout=SPAWN_TIMEOUT, check=False).stderr
    imports = summarize_imports(traces, floor_trace)
    imports["dataclasses"] = dataclass_tax(imports["janus_modules"])
    imports["traced_runs"] = len(traces)

    floor_label = "python3 -I -S -c pass"
    rows = []
    for name, phase in (("prepare", "prepare begin"), ("release", "release end")):
        info = last[name]
        fsync_ms = median(syncs[name]) * 1000
        note = (f"the installed shim as a process (#!{VENV_PYTHON} -IS), {len(xml)} B XML, default janus.toml; "
                f"value = spawn-to-exit wall minus time in the fake kernel/systemd seams; last run: wall "
                f"{info['wall'] * 1000:.1f} ms, {info['calls']} seam calls {info['seams'] * 1000:.1f} ms (excluded), "
                f"seam client import {info['client_import'] * 1000:.2f} ms (excluded); CPU user+sys medians: "
                f"hook {median(cpu[name]) * 1000:.1f} ms, floor {median(cpu['floor']) * 1000:.1f} ms; "
                f"the journal's {info['journal_fdatasyncs']} fdatasync'd records + 1 directory fsync cost "
                f"{fsync_ms:.1f} ms on {fs_type(root)} when replayed alone (median), the value without them "
                f"{row_value(samples[name]) - fsync_ms:.1f} ms")
        if name == "prepare":
            note += "; " + _imports_note(imports)
        row = ratio_row(GROUP, f"hook process: single-GPU + hugepages {phase} (fake kernel) vs interpreter floor",
                        samples[name], samples["floor"], goal_value=50.0, baseline_label=floor_label, note=note)
        row.extra = {k: v for k, v in info.items() if k != "stderr"}
        row.extra |= {"cpu_ms": median(cpu[name]) * 1000, "floor_cpu_ms": median(cpu["floor"]) * 1000,
                      "journal_sync_ms": fsync_ms}
        rows.append(row)
    rows[0].extra["imports"] = imports
    return rows
