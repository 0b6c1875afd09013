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
mounts vanish with the helper.

The pool is global and other work (a libvirt suite, a running VM) may use it at the same time. So the bench
gives back exactly what it added, never "the old size" (janus' own revert does the same): before each
allocation the helper records in a file how many pages it owes, and clears it once they are given back; the
parent settles whatever a dead helper still owed. A pool that moved under the bench fails the row (the
figures would be meaningless) without touching anybody else's pages.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
HOST_LOCK = Path("/var/lib/janus-hooks/lock")
LOCK_TIMEOUT = 60.0


def read_nr() -> int:
    return int(NR.read_text())


def write_nr(value: int) -> None:
    fd = os.open(NR, os.O_WRONLY)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def give_back(pages: int) -> None:
    """Shrink the pool by ``pages`` from what it is now, and wait (bounded) until the kernel shows it."""
    if pages <= 0:
        return
    target = max(0, read_nr() - pages)
    write_nr(target)
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while read_nr() > target:
        if time.monotonic() >= deadline:
            raise BenchError(f"{NR} did not shrink to {target} within {SETTLE_TIMEOUT:g} s (now {read_nr()})")
        time.sleep(0.05)


class Debt:
    """How many pages the bench may have added above which pool size and not given back yet, in a file the
    parent reads if the helper dies: it is recorded before each allocation and cleared after the give-back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.set(0, 0)

    def set(self, pages: int, base: int) -> None:
        self.path.write_text(f"{pages} {base}\n")

    @staticmethod
    def owed(path: Path) -> int:
        """What is still ours: at most the recorded pages, and never below the size the pool had before."""
        try:
            pages, base = (int(x) for x in path.read_text().split())
        except (OSError, ValueError):
            return 0
        return max(0, min(pages, read_nr() - base))


@contextmanager
def janus_host_lock(timeout: float = LOCK_TIMEOUT) -> Iterator[str]:
    """Hold the installed janus-hooks' host-wide transition lock, if there is an install, so that its hooks
    (a VM starting under a libvirt suite) do not change the pool while the bench does. Never creates it."""
    try:
        fd = os.open(HOST_LOCK, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        yield f"no janus-hooks install here ({HOST_LOCK} absent): no lock held"
        return
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as err:
                if time.monotonic() >= deadline:
                    raise BenchError(f"{HOST_LOCK} stayed held by a janus-hooks transition for {timeout:g} s") from err
                time.sleep(0.05)
        yield f"held {HOST_LOCK} so that installed janus hooks did not change the pool meanwhile"
    finally:
        os.close(fd)


def _mem_available_kb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


# --- the helper, inside the private mount namespace --------------------------------------------------------
def _inner(tree: Path, runs: int, warmup: int, out: Path, debt_file: Path) -> None:
    from janus_hooks.actions import AllocateHugepages, Context
    from janus_hooks.host import Host
    from janus_hooks.journal import JournalStore

    debt = Debt(debt_file)
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
    hook_store = JournalStore(tree / "var/lib/janus-hooks")
    info: dict[str, list] = {"hook_added": [], "release": [], "floor": [], "phases": []}

    def unchanged() -> None:
        now = read_nr()
        if now != orig:
            raise BenchError(f"{NR} is {now}, was {orig} when the bench started: another process changed the "
                             "pool during the bench (a libvirt suite or a VM?); its pages were left alone")

    def added_since(before: int) -> int:
        return max(0, min(PAGES, read_nr() - before))

    def janus_step() -> float:
        unchanged()
        writer = store.open_writer(VM, host.boot_id(), ())
        debt.set(PAGES, orig)
        result = None
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
            give_back(result["added"] if result else added_since(orig))
            debt.set(0, orig)
        return seconds

    def bare() -> float:
        unchanged()
        debt.set(PAGES, orig)
        granted = 0
        try:
            start = time.perf_counter()
            write_nr(orig + PAGES)
            granted = read_nr() - orig
            seconds = time.perf_counter() - start
        finally:
            give_back(max(0, min(PAGES, granted)) if granted else added_since(orig))
            debt.set(0, orig)
        if granted < PAGES:
            raise BenchError(f"the kernel granted {granted} of {PAGES} hugepages to a bare write")
        return seconds

    def hook() -> float:
        unchanged()
        debt.set(PAGES, orig)
        try:
            seconds = timed_spawn([str(shim), VM, "prepare", "begin", "-"], xml)
            info["hook_added"].append(read_nr() - orig)
        finally:
            # The hook's own release gives back what its journal says it added; only if it fails twice
            # does the bench give the pages back itself.
            try:
                info["release"].append(timed_spawn([str(shim), VM, "release", "end", "-"], xml))
            except BenchError:
                try:
                    timed_spawn([str(shim), VM, "release", "end", "-"], xml)
                except BenchError:
                    if hook_store.exists(VM):
                        state = hook_store.read(VM)
                        give_back(sum(s.old.get("added", 0) for s in state.open_steps) if state else 0)
                        hook_store.remove(VM)
                    raise
            finally:
                if not hook_store.exists(VM):
                    debt.set(0, orig)
        unchanged()
        info["floor"].append(timed_spawn(FLOOR_ARGV, xml))
        return seconds

    samples = interleave({"janus": janus_step, "bare": bare, "hook": hook}, runs, warmup)
    for key in info:  # one entry per round, warm-up rounds first
        info[key] = info[key][warmup:]
    out.write_text(json.dumps({"samples": samples, "info": info, "orig": orig}))


# --- the parent side ---------------------------------------------------------------------------------------
def _run_helper(scratch: Path, tree: Path, out: Path, debt_file: Path, runs: int, warmup: int) -> dict:
    before = read_nr()
    argv = ["unshare", "--mount", "--propagation", "private", VENV_PYTHON, "-m", "bench.hugepage_rows",
            str(tree), str(runs), str(warmup), str(out), str(debt_file)]
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
        # Whatever the helper still owed when it ended (killed mid-run): give back exactly that.
        give_back(Debt.owed(debt_file))
        if read_nr() != before:
            print(f"bench: {NR} is {read_nr()}, was {before} before the hugepage rows; the bench gave back all "
                  "it added, so another process changed it", file=sys.stderr)
    return json.loads(out.read_text())


def measure(scratch: Path, runs: int, warmup: int) -> list[Row]:
    if os.geteuid() != 0:
        raise BenchError("needs root: it writes the real nr_hugepages")
    if not NR.exists():
        raise BenchError(f"{NR} does not exist: no {SIZE_KB} kB hugepage pool on this kernel")
    if _mem_available_kb() < 2 * PAGES * SIZE_KB:
        raise BenchError(f"less than {2 * PAGES * SIZE_KB // 1024} MiB available: not allocating 1 GiB of hugepages")
    tree = scratch / "hugepage-root"
    out, debt_file = scratch / "hugepages.json", scratch / "hugepages.owed"
    with janus_host_lock() as lock_note:
        data = _run_helper(scratch, tree, out, debt_file, runs, warmup)
    s, info = data["samples"], data["info"]
    fs = fs_type(scratch)
    added = sorted(set(info["hook_added"]))
    capture, intent, apply, done = (median([p[i] for p in info["phases"]]) * 1000 for i in range(4))
    rows = [
        ratio_row(GROUP, "hugepages: 1 GiB via janus' AllocateHugepages step vs bare write (real kernel)",
                  s["janus"], s["bare"], goal_ratio=1.2, baseline_label="one write of nr_hugepages + read-back",
                  note=f"{PAGES} x {SIZE_KB} kB on the global pool (was {data['orig']}); janus medians: capture "
                       f"{capture:.2f} ms, intent record + fsync {intent:.2f} ms, write + read-back check "
                       f"{apply:.2f} ms, done record + fsync {done:.2f} ms (journal on {fs}); every page given "
                       f"back after every run; {lock_note}"),
        ratio_row(GROUP, "hugepages: 1 GiB via the whole hook (prepare begin, subprocess) vs bare write",
                  s["hook"], s["bare"], baseline_label="one write of nr_hugepages + read-back",
                  note=f"shim for a managed hugepage-only VM; root = scratch tree with the real sys/ and proc/ "
                       f"bind-mounted in a private mount namespace; pages added per run {added}; of its time "
                       f"the interpreter floor is {median(info['floor']) * 1000:.1f} ms; release end right "
                       f"after took {median(info['release']) * 1000:.1f} ms (median)"),
    ]
    return rows


if __name__ == "__main__":
    try:
        _inner(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]))
    except BenchError as err:
        print(f"bench: {err}", file=sys.stderr)
        sys.exit(1)
