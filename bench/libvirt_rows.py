"""Bench rows against the real libvirtd and QEMU (TCG): what janus-hooks' qemu hook costs a VM start.

Two functions, each returning one row for ``bench/run`` (see bench/README.md, "Row modules owned by others"):

``measure_vm_start_stop(runs)``
    ``dom.create()`` + ``dom.destroy()`` of an unmanaged 64 MiB VM through libvirt-python, with the janus-hooks
    hook installed (executable) and without it (the same drop-in made non-executable, which libvirt skips),
    interleaved round by round in random order. janus-hooks should be invisible here: libvirt runs the hook
    five times per start/stop, and for an unmanaged VM each call is the fast path.

``measure_hugepage_alloc(runs)``
    A managed 128 MiB VM backed by 2 MiB hugepages: the value is the wall time of janus-hooks' ``prepare begin``
    call as libvirt runs it (process start, plan, journal with fsync, the ``nr_hugepages`` write and its
    verification), taken between two timestamping hooks that libvirt runs just before and just after it;
    the baseline is a bare write of ``nr_hugepages`` for the same number of pages plus its read-back, from
    this process, in the same rounds. The note gives the same gap with no janus hook between the
    timestamps, janus-hooks' fast path (``start begin`` of the same VM), and janus' own step time from its log.

Row format: ``{"name", "value", "baseline", "ratio", "unit": "ms", "spread", "note", "runs"}`` with medians
in ms; ``spread`` is half the interquartile range of the value's samples, in % of its median. A row that
cannot run here (not root, libvirt not installed, no hugetlbfs) comes back with ``"skipped": reason``.

How it keeps the host as it was:
- holds ``/run/janus-hooks-test/host.lock`` (the libvirt test suite's lock) for the whole measurement;
- starts virtlogd/libvirtd (and mounts hugetlbfs) with ``scripts/libvirt-services`` when they do not run,
  holding its lease meanwhile, and gives the lease back at the end (the script stops the daemons once no
  other caller holds one); kills the QEMU of a bench VM left behind if libvirtd vanished mid-measure;
- installs its hook as ``qemu.d/janus-hooks-bench``, rendered by janus-hooks' own install code, with the
  host root set to a scratch tree ``/run/janus-hooks-test/bench-root`` whose ``sys`` and ``proc`` are bind
  mounts of the real ones: the hook acts on the real kernel, while its journal, lock and log stay in the
  scratch tree (the real ``/var/lib/janus-hooks`` and ``/var/log/janus-hooks`` are never written); mounts,
  drop-ins, timestamp hooks and VMs (``janus-bench-*``) are removed in ``finally``, also after a crash of
  an earlier run;
- refuses to run while janus-hooks is installed for real (its hook would act on the bench's managed VM
  too), and gives back exactly the hugepages it added.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.stats import interleave  # noqa: E402

SERVICES = REPO / "scripts" / "libvirt-services"
RUN_DIR = Path("/run/janus-hooks-test")
LOCK = RUN_DIR / "host.lock"
SCRATCH = RUN_DIR / "bench-root"
HOOKS = Path("/etc/libvirt/hooks")
QEMU_D = HOOKS / "qemu.d"
DROP_IN = QEMU_D / "janus-hooks-bench"
STAMP_BEFORE = QEMU_D / "00-janus-bench-stamp"
STAMP_AFTER = QEMU_D / "zzzz-janus-bench-stamp"
STAMPS = RUN_DIR / "bench-stamps.log"
NR = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")
PROFILE_NS = "https://janus-hooks.org/xmlns/profile/1"
PREFIX = "janus-bench-"
GUEST_MIB = 128
PAGES = GUEST_MIB // 2
WARMUP = 2
TIMEOUT = 60.0

# bash builtins only: $EPOCHREALTIME costs no fork, so the stamp is as close to libvirt's call as it gets.
STAMP = """#!/bin/bash
printf '%s\\t%s\\t%s\\t%s\\t%s\\n' "$EPOCHREALTIME" {tag} "$1" "$2" "$3" >> {log}
"""


class Skip(Exception):
    """The row cannot run on this machine for a documented reason."""


# --- small helpers -------------------------------------------------------------------------------------------
def _wait(condition: Callable[[], object], timeout: float, what: str) -> object:
    deadline, delay = time.monotonic() + timeout, 0.005
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up after {timeout:g} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,  # noqa: S603
                          timeout=timeout, check=False)


def _spread(samples: list[float]) -> float:
    if len(samples) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    mid = statistics.median(samples)
    return round((q3 - q1) / 2 / mid * 100, 1) if mid else 0.0


def _pool() -> dict[str, int]:
    return {k: int((NR / f"{k}_hugepages").read_text()) for k in ("nr", "free", "resv", "surplus")}


def _set_pool(pages: int) -> None:
    (NR / "nr_hugepages").write_text(f"{pages}\n")


def _mounted(path: Path) -> bool:
    with open("/proc/mounts") as mounts:
        return any(line.split()[1] == str(path) for line in mounts)


def _domain_xml(name: str, managed: bool) -> str:
    meta = f"<metadata><janus:profile xmlns:janus='{PROFILE_NS}' mode='passthrough'/></metadata>" if managed else ""
    backing = "<memoryBacking><hugepages/></memoryBacking>" if managed else ""
    return (f"<domain type='qemu'><name>{name}</name>{meta}<memory unit='MiB'>{GUEST_MIB if managed else 64}"
            f"</memory>{backing}<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>"
            "<devices><emulator>/usr/bin/qemu-system-x86_64</emulator><serial type='null'/>"
            "<memballoon model='none'/></devices></domain>")


# --- the bench environment ---------------------------------------------------------------------------------------
class Bench:
    """Lock, daemons, the scratch root, the drop-in and the stamps; everything undone by ``close``."""

    def __init__(self) -> None:
        self.lock_fd: int | None = None
        self.started = False
        self.conn = None
        self.created_dirs: list[Path] = []

    # setup ------------------------------------------------------------------------------------------------------
    def open(self) -> None:
        if os.geteuid() != 0:
            raise Skip("needs root (libvirtd, /etc/libvirt/hooks, nr_hugepages)")
        if not Path("/usr/sbin/libvirtd").exists():
            raise Skip("libvirtd is not installed (scripts/bootstrap installs it)")
        RUN_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.lock_fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        _wait(self._try_lock, 600, f"{LOCK} (the libvirt suite or another bench holds it)")
        if (QEMU_D / "janus-hooks").exists():
            raise RuntimeError("janus-hooks is installed on this machine (qemu.d/janus-hooks): its hook would act "
                               "on the bench's VMs too; uninstall it for the bench")
        # Always through the script: it starts only what does not run, and its lease keeps another user's
        # `stop` (the test entry script's, say) from taking libvirtd away while the bench measures.
        proc = _run([str(SERVICES), "start"], 300)
        if proc.returncode == 3:
            raise Skip(proc.stderr.strip())
        if proc.returncode != 0:
            raise RuntimeError(f"scripts/libvirt-services start failed: {proc.stderr.strip()}")
        self.started = True
        import libvirt

        self.conn = libvirt.open("qemu:///system")
        self._clean_leftovers()
        self._scratch()
        self._drop_in()

    def _try_lock(self) -> bool:
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _scratch(self) -> None:
        for sub in ("sys", "proc"):
            target = SCRATCH / sub
            target.mkdir(parents=True, exist_ok=True)
            SCRATCH.chmod(0o755)
            if not _mounted(target):
                proc = _run(["mount", "--bind", f"/{sub}", str(target)], 30)
                if proc.returncode != 0:
                    raise RuntimeError(f"cannot bind-mount /{sub} on {target}: {proc.stderr.strip()}")

    def _drop_in(self) -> None:
        from janus_hooks.install import Identity, render_shim
        from janus_hooks.resources import data_file

        for path in (HOOKS, QEMU_D):
            if not path.exists():
                path.mkdir(mode=0o755)
                self.created_dirs.append(path)
        DROP_IN.write_text(render_shim(data_file("hooks", "qemu").read_text(), Identity.current(SCRATCH)))
        DROP_IN.chmod(0o755)
        for path, tag in ((STAMP_BEFORE, "before"), (STAMP_AFTER, "after")):
            path.write_text(STAMP.format(tag=tag, log=STAMPS))
            path.chmod(0o644)

    # teardown ---------------------------------------------------------------------------------------------------
    def _clean_leftovers(self) -> None:
        """What a killed earlier run left (VMs, drop-ins, stamps, mounts); at the end, what this one made."""
        problems = []
        if self.conn is not None:
            problems += _remove_domains(self.conn)
        for path in (DROP_IN, STAMP_BEFORE, STAMP_AFTER, STAMPS):
            path.unlink(missing_ok=True)
        for sub in ("proc", "sys"):
            target = SCRATCH / sub
            if _mounted(target):
                proc = _run(["umount", str(target)], 30)
                if proc.returncode != 0:
                    problems.append(f"cannot unmount {target}: {proc.stderr.strip()}")
        if problems:
            raise RuntimeError("; ".join(problems))

    def close(self) -> list[str]:
        import libvirt

        problems: list[str] = []
        if self.conn is not None:
            try:
                problems += _remove_domains(self.conn)
            except libvirt.libvirtError as err:
                problems.append(f"libvirtd went away ({err})")
                problems += _kill_orphans()
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None
        try:
            self._clean_leftovers()
        except RuntimeError as err:
            problems.append(str(err))
        for path in reversed(self.created_dirs):
            with contextlib.suppress(OSError):
                path.rmdir()
        if not any(SCRATCH.glob("var/lib/janus-hooks/journal/*")) and not _mounted(SCRATCH / "sys"):
            _run(["rm", "-rf", "--one-file-system", str(SCRATCH)], 30)
        with contextlib.suppress(OSError, ValueError):
            # libvirtd rescans its hooks: the bench's drop-in is gone from its list too.
            os.kill(int(Path("/run/libvirtd.pid").read_text()), signal.SIGHUP)
        if self.started:  # gives the lease back; the daemons stop only when nobody else holds one
            proc = _run([str(SERVICES), "stop"], 300)
            if proc.returncode != 0:
                problems.append(f"scripts/libvirt-services stop failed: {proc.stderr.strip()}")
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None
        return problems

    # measuring --------------------------------------------------------------------------------------------------
    def enable(self, *paths: Path, on: bool = True) -> None:
        for path in paths:
            path.chmod(0o755 if on else 0o644)

    def make_seen(self, dom) -> None:
        """SIGHUP libvirtd until a start of ``dom`` runs the stamp hooks (libvirt caches "no qemu hook")."""
        self.enable(STAMP_BEFORE, STAMP_AFTER)
        for _ in range(5):
            # libvirtd takes SIGHUP in a thread, and drops one that comes while the last reload still runs;
            # a start that missed the rescan just tries again.
            STAMPS.unlink(missing_ok=True)
            os.kill(int(Path("/run/libvirtd.pid").read_text()), signal.SIGHUP)
            cycle(dom)
            if STAMPS.exists():
                return
        raise RuntimeError("libvirtd does not run hooks in /etc/libvirt/hooks/qemu.d after SIGHUP")

    def define(self, name: str, managed: bool = False):
        return self.conn.defineXML(_domain_xml(PREFIX + name, managed))


def _remove_domains(conn) -> list[str]:
    import libvirt

    problems = []
    for dom in conn.listAllDomains():
        if not dom.name().startswith(PREFIX):
            continue
        try:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        except libvirt.libvirtError as err:
            problems.append(f"{dom.name()}: {err}")
    return problems


def _kill_orphans() -> list[str]:
    """SIGKILL the QEMUs of the bench's VMs once libvirtd is gone (it would have stopped them)."""
    killed = []
    for pidfile in Path("/run/libvirt/qemu").glob(f"{PREFIX}*.pid"):
        name = pidfile.name[:-len(".pid")]
        try:
            pid = int(pidfile.read_text().strip())
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if any(a == f"guest={name}".encode() or a.startswith(f"guest={name},".encode()) for a in args):
            os.kill(pid, signal.SIGKILL)
            _wait(lambda p=pid: not Path(f"/proc/{p}").exists(), TIMEOUT, f"QEMU {pid} to die")
            killed.append(f"killed the orphaned QEMU of {name} (pid {pid})")
    return killed


def cycle(dom) -> tuple[float, float]:
    """Seconds for ``create`` and for ``destroy``."""
    t0 = time.perf_counter()
    dom.create()
    t1 = time.perf_counter()
    dom.destroy()
    return t1 - t0, time.perf_counter() - t1


@contextlib.contextmanager
def bench() -> Iterator[Bench]:
    b = Bench()
    try:
        b.open()
        yield b
    finally:
        problems = b.close()
        if problems:
            raise RuntimeError("the libvirt bench did not leave the host as it found it: " + "; ".join(problems))


def _skipped(name: str, reason: str) -> dict:
    return {"name": name, "value": None, "baseline": None, "ratio": None, "unit": "ms", "spread": 0.0,
            "note": reason, "skipped": reason}


# --- row 1 -------------------------------------------------------------------------------------------------------
def measure_vm_start_stop(runs: int = 10) -> dict:
    """Start + destroy of an unmanaged VM with janus-hooks' hook installed vs not installed, same run."""
    name = "libvirt: unmanaged VM start+destroy, janus hook installed"
    try:
        with bench() as b:
            dom = b.define("plain")
            b.make_seen(dom)
            b.enable(STAMP_BEFORE, STAMP_AFTER, on=False)

            def run(with_hook: bool):
                def once():
                    b.enable(DROP_IN, on=with_hook)
                    return cycle(dom)
                return once

            samples = interleave({"janus": run(True), "none": run(False)}, runs, WARMUP, seed=5)
    except Skip as why:
        return _skipped(name, str(why))
    total = {k: [(s + d) * 1000 for s, d in v] for k, v in samples.items()}
    starts = {k: statistics.median(s * 1000 for s, _ in v) for k, v in samples.items()}
    value, baseline = statistics.median(total["janus"]), statistics.median(total["none"])
    return {
        "name": name, "value": round(value, 1), "baseline": round(baseline, 1), "ratio": round(value / baseline, 3),
        "unit": "ms", "spread": _spread(total["janus"]), "runs": runs,
        "baseline_label": "same VM, hook drop-in not executable", "goal": "<= 1.05x",
        "goal_met": value / baseline <= 1.05,
        "note": (f"5 hook calls per start+destroy; create alone {starts['janus']:.0f} ms vs {starts['none']:.0f} ms; "
                 f"baseline spread +-{_spread(total['none'])}%; destroy is libvirt's SIGTERM + 200 ms polls, "
                 "the bulk of either figure; TCG, 64 MiB, no disk"),
    }


# --- row 2 -------------------------------------------------------------------------------------------------------
def _gap(vm: str, phase: str) -> float:
    """ms between the stamp hook before janus-hooks and the one after it, for the last call of ``phase``."""
    rows = [line.split("\t") for line in STAMPS.read_text().splitlines()]
    before = [float(r[0]) for r in rows if r[1] == "before" and r[2] == vm and f"{r[3]} {r[4]}" == phase]
    after = [float(r[0]) for r in rows if r[1] == "after" and r[2] == vm and f"{r[3]} {r[4]}" == phase]
    if not before or not after:
        raise RuntimeError(f"no stamps around janus-hooks for {vm} {phase}")
    return (after[-1] - before[-1]) * 1000


def _step_ms(vm: str) -> float | None:
    """janus-hooks' own time for its hugepage step, from its log in the scratch root (None if not logged)."""
    try:
        text = (SCRATCH / "var/log/janus-hooks/hook.log").read_text()
    except FileNotFoundError:
        return None
    found = re.findall(rf"VM {re.escape(vm)}: add \d+ x 2048 kB hugepages.*\(([\d.]+) ms\)", text)
    return float(found[-1]) if found else None


def measure_hugepage_alloc(runs: int = 10) -> dict:
    """Hugepages for a managed VM through janus-hooks' prepare hook vs a bare nr_hugepages write, same run."""
    name = f"libvirt: {PAGES} x 2 MiB hugepages allocated by janus-hooks on prepare"
    try:
        with bench() as b:
            if not any(line.split()[2] == "hugetlbfs" for line in Path("/proc/mounts").read_text().splitlines()):
                raise Skip("no hugetlbfs mounted (scripts/libvirt-services start mounts one)")
            start = _pool()
            if start["free"] >= PAGES:
                raise Skip(f"the pool already has {start['free']} free pages: janus-hooks would allocate none")
            missing = PAGES - start["free"]
            vm = PREFIX + "hugepages"
            dom = b.define("hugepages", managed=True)
            b.make_seen(dom)
            empty_gap: list[float] = []
            step: list[float] = []

            def through_janus():
                b.enable(DROP_IN)
                cycle(dom)
                if _pool()["nr"] != start["nr"]:
                    raise RuntimeError(f"pool not given back: {start['nr']} pages before, {_pool()['nr']} after")
                ms = _step_ms(vm)
                if ms is not None:
                    step.append(ms)
                return _gap(vm, "prepare begin"), _gap(vm, "start begin")

            def bare():
                before = _pool()["nr"]
                target = before + missing
                t0 = time.perf_counter()
                fd = os.open(NR / "nr_hugepages", os.O_WRONLY)
                try:
                    os.write(fd, str(target).encode())
                finally:
                    os.close(fd)
                granted = _pool()["nr"]
                elapsed = (time.perf_counter() - t0) * 1000
                _set_pool(before)
                _wait(lambda: _pool()["nr"] == before, TIMEOUT, "the pool to shrink back")
                if granted != target:
                    raise RuntimeError(f"the kernel granted {granted - before} of {missing} pages")
                return elapsed

            def empty():
                # The same two stamps with nothing between them: what the measuring itself costs. The VM is not
                # managed for this (no janus hook runs), so libvirt's start fails only if hugepages are short:
                # give it the pages first and take them back after, untimed.
                b.enable(DROP_IN, on=False)
                base = _pool()["nr"]
                _set_pool(base + missing)
                try:
                    cycle(dom)
                finally:
                    _set_pool(base)
                empty_gap.append(_gap(vm, "prepare begin"))
                return empty_gap[-1]

            samples = interleave({"janus": through_janus, "bare": bare, "empty": empty}, runs, WARMUP, seed=5)
    except Skip as why:
        return _skipped(name, str(why))
    prepare = [p for p, _ in samples["janus"]]
    fast = statistics.median(s for _, s in samples["janus"])
    value, baseline = statistics.median(prepare), statistics.median(samples["bare"])
    step_text = f"janus' own step {statistics.median(step):.1f} ms (its log)" if step else "janus' step time not logged"
    return {
        "name": name, "value": round(value, 2), "baseline": round(baseline, 3), "ratio": round(value / baseline, 1),
        "unit": "ms", "spread": _spread(prepare), "runs": runs,
        "baseline_label": f"bare write of nr_hugepages (+{missing}) and read-back, same rounds",
        "note": (f"value: libvirt's prepare-begin call of the janus hook (process + plan + journal fsyncs + write + "
                 f"verify), between stamp hooks; {step_text}; same VM's start-begin (fast path) "
                 f"{fast:.1f} ms; stamps with no hook between {statistics.median(samples['empty']):.1f} ms; "
                 f"bare spread +-{_spread(samples['bare'])}%"),
    }


if __name__ == "__main__":
    import json

    count = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    print(json.dumps([measure_vm_start_stop(count), measure_hugepage_alloc(count)], indent=2))
