"""Row 3: allocating 1 GiB of 2 MiB hugepages on this machine, for real (root).

Measured in one helper process, interleaved round by round:
- janus: the AllocateHugepages step as the engine runs it (capture, journal intent appended and fsynced,
  write, verified read-back, done record fsynced), the journal in a scratch state dir;
- bare: one write of nr_hugepages and its read-back, in the same process;
- hook: the whole rendered shim as a subprocess for a managed hugepage-only VM (prepare begin, then
  release end right after), so the interpreter's share is visible.

The hook needs a host root. It is not ``/`` (that would write the real /var/lib/janus-hooks and
/var/log/janus-hooks): the helper runs in a private mount namespace (``unshare --mount``) where a scratch
tree gets ``sys`` and ``proc`` bind-mounted from the real ones. The hook therefore reads the real kernel and
the real processes, writes the real nr_hugepages, and keeps its journal and log in the scratch tree; the
mounts vanish with the helper. The parent restores the pool in ``finally`` whatever happened.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as the helper: make the repo importable without site-packages tricks
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import FLOOR_ARGV, REPO, VENV_PYTHON, domain_xml, fs_type, render_shim, timed_spawn  # noqa: E402
from bench.stats import BenchError, Row, interleave, median, ratio_row  # noqa: E402

GROUP = "hugepages"
SIZE_KB = 2048
PAGES = 512  # 1 GiB
NR = Path(f"/sys/kernel/mm/hugepages/hugepages-{SIZE_KB}kB/nr_hugepages")
VM = "janus-bench-hugepages"
SETTLE_TIMEOUT = 30.0


def read_nr() -> int:
    return int(NR.read_text())


def write_nr(value: int) -> None:
    fd = os.open(NR, os.O_WRONLY)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def restore_pool(target: int) -> int:
    """Shrink (or grow) the pool back to ``target`` and wait, bounded, until the kernel says so."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        if read_nr() == target:
            return target
        write_nr(target)
        if read_nr() == target:
            return target
        if time.monotonic() >= deadline:
            raise BenchError(f"{NR} did not return to {target} within {SETTLE_TIMEOUT:g} s (now {read_nr()})")
        time.sleep(0.05)


def _mem_available_kb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


# --- the helper, inside the private mount namespace --------------------------------------------------------
def _inner(tree: Path, runs: int, warmup: int, out: Path) -> None:
    from janus_hooks.actions import AllocateHugepages, Context
    from janus_hooks.host import Host
    from janus_hooks.journal import JournalStore

    for name in ("sys", "proc"):
        (tree / name).mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", f"/{name}", str(tree / name)], check=True, timeout=10)  # noqa: S603,S607
    shim = render_shim(tree / "etc/libvirt/hooks/qemu.d/janus-hooks", root=str(tree))
    xml = domain_xml(VM, mode="passthrough", memory_mib=PAGES * SIZE_KB // 1024, hugepages=True).encode()
    orig = read_nr()
    host = Host("/")
    ctx = Context(host=host)
    action = AllocateHugepages(SIZE_KB, None, PAGES)
    store = JournalStore(tree / "var/lib/janus-bench-step")
    info: dict[str, list] = {"hook_added": [], "release": [], "floor": [], "phases": []}

    def unchanged() -> None:
        now = read_nr()
        if now != orig:
            raise BenchError(f"{NR} is {now}, expected {orig}: someone else changed the pool during the bench")

    def janus_step() -> float:
        unchanged()
        writer = store.open_writer(VM, host.boot_id(), ())
        try:
            t0 = time.perf_counter()
            old = action.capture(ctx)
            t1 = time.perf_counter()
            writer.intent(0, action, old)
            t2 = time.perf_counter()
            result = action.apply(ctx, old)
            action.verify(ctx, old)
            t3 = time.perf_counter()
            writer.done(0, (t3 - t0) * 1000, result)
            t4 = time.perf_counter()
            seconds = t4 - t0
            info["phases"].append([t1 - t0, t2 - t1, t3 - t2, t4 - t3])
        finally:
            writer.close()
            store.remove(VM)
            restore_pool(orig)
        return seconds

    def bare() -> float:
        unchanged()
        try:
            start = time.perf_counter()
            write_nr(orig + PAGES)
            granted = read_nr()
            seconds = time.perf_counter() - start
        finally:
            restore_pool(orig)
        if granted < orig + PAGES:
            raise BenchError(f"the kernel granted {granted - orig} of {PAGES} hugepages to a bare write")
        return seconds

    def hook() -> float:
        unchanged()
        try:
            seconds = timed_spawn([str(shim), VM, "prepare", "begin", "-"], xml)
            info["hook_added"].append(read_nr() - orig)
        finally:
            info["release"].append(timed_spawn([str(shim), VM, "release", "end", "-"], xml))
        if read_nr() != orig:
            raise BenchError(f"the hook's release end left {NR} at {read_nr()}, not {orig}")
        info["floor"].append(timed_spawn(FLOOR_ARGV, xml))
        return seconds

    samples = interleave({"janus": janus_step, "bare": bare, "hook": hook}, runs, warmup)
    for key in info:  # one entry per round, warm-up rounds first
        info[key] = info[key][warmup:]
    out.write_text(json.dumps({"samples": samples, "info": info, "orig": orig}))


# --- the parent side ---------------------------------------------------------------------------------------
def measure(scratch: Path, runs: int, warmup: int) -> list[Row]:
    if os.geteuid() != 0:
        raise BenchError("needs root: it writes the real nr_hugepages")
    if not NR.exists():
        raise BenchError(f"{NR} does not exist: no {SIZE_KB} kB hugepage pool on this kernel")
    if _mem_available_kb() < 2 * PAGES * SIZE_KB:
        raise BenchError(f"less than {2 * PAGES * SIZE_KB // 1024} MiB available: not allocating 1 GiB of hugepages")
    tree = scratch / "hugepage-root"
    out = scratch / "hugepages.json"
    orig = read_nr()
    argv = ["unshare", "--mount", "--propagation", "private", VENV_PYTHON, "-m", "bench.hugepage_rows",
            str(tree), str(runs), str(warmup), str(out)]
    timeout = 60 + (runs + warmup) * 10
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,  # noqa: S603
                            start_new_session=True)
    try:
        try:
            _, err = proc.communicate(timeout=timeout)
        except BaseException as exc:  # timeout, Ctrl-C, SIGTERM: the helper must not outlive us
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)
            if isinstance(exc, subprocess.TimeoutExpired):
                raise BenchError(f"the hugepage helper did not finish within {timeout} s") from exc
            raise
        if proc.returncode != 0:
            lines = err.decode(errors="replace").strip().splitlines()
            raise BenchError(f"the hugepage helper failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    finally:
        after = read_nr()
        if after != orig:
            restore_pool(orig)
    data = json.loads(out.read_text())
    s, info = data["samples"], data["info"]
    fs = fs_type(scratch)
    added = sorted(set(info["hook_added"]))
    capture, intent, apply, done = (median([p[i] for p in info["phases"]]) * 1000 for i in range(4))
    rows = [
        ratio_row(GROUP, "hugepages: 1 GiB via janus' AllocateHugepages step vs bare write (real kernel)",
                  s["janus"], s["bare"], goal_ratio=1.2, baseline_label="one write of nr_hugepages + read-back",
                  note=f"{PAGES} x {SIZE_KB} kB on the global pool (was {data['orig']}); janus medians: capture "
                       f"{capture:.2f} ms, intent record + fsync {intent:.2f} ms, write + read-back check "
                       f"{apply:.2f} ms, done record + fsync {done:.2f} ms (journal on {fs}); pool restored "
                       "after every run"),
        ratio_row(GROUP, "hugepages: 1 GiB via the whole hook (prepare begin, subprocess) vs bare write",
                  s["hook"], s["bare"], baseline_label="one write of nr_hugepages + read-back", paired=True,
                  note=f"shim for a managed hugepage-only VM; root = scratch tree with the real sys/ and proc/ "
                       f"bind-mounted in a private mount namespace; pages added per run {added}; of its time "
                       f"the interpreter floor is {median(info['floor']) * 1000:.1f} ms; release end right "
                       f"after took {median(info['release']) * 1000:.1f} ms (median)"),
    ]
    return rows


if __name__ == "__main__":
    try:
        _inner(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
    except BenchError as err:
        print(f"bench: {err}", file=sys.stderr)
        sys.exit(1)
