"""Bench rows for the event agent against the real libvirtd (``bench/run --only agent``).

``measure_agent_idle(runs)``
    ``janus-hooks agent`` connected to the real libvirtd (``qemu:///system``), kernel uevent monitor, inotify
    on its directories, left idle: context switches (voluntary + involuntary, summed over every thread from
    ``/proc/PID/task/*/status``) per second over 30 s windows, and its RSS. The baseline, measured over the
    same windows, is the floor any libvirt client pays: a bare libvirt-python process with the default event
    loop in a thread and one lifecycle callback (libvirtd pings each client every 5 s). Goals: at most
    0.25 wakeups/s, RSS at most 40 MiB.

``measure_agent_rollback(runs)``
    A managed 128 MiB hugepage VM whose QEMU is killed with SIGKILL while janus-hooks' release hook cannot
    run (the drop-in is made non-executable after the start: what a killed libvirtd means for the hook).
    The value is the time from the kill to the pool being back, with the agent following the VM's QEMU (as
    it does while libvirtd is away: by pidfd); the baseline is the same kill with the hook executable and
    no agent, i.e. libvirt noticing the death and running ``release end`` itself.

Both reuse the libvirt bench's environment (``bench/libvirt_rows.bench()``): its lock, daemons, scratch
root with the real ``sys``/``proc`` bind-mounted, and drop-in hook. The agent runs with ``--root`` on that
scratch root, so its journals, lock and logs stay there too.
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.libvirt_rows import (  # noqa: E402
    DROP_IN,
    PREFIX,
    RUN_DIR,
    SCRATCH,
    STAMP_AFTER,
    STAMP_BEFORE,
    Skip,
    _pool,
    _skipped,
    _spread,
    _wait,
    bench,
)
from bench.stats import interleave  # noqa: E402

WINDOW = 30.0
SETTLE = 3.0
IDLE_GOAL = 0.25
RSS_GOAL_MIB = 40
TIMEOUT = 60.0

# The floor: what any connected libvirt client costs (the default event loop in one thread, one callback).
BARE_CLIENT = """
import sys, threading, libvirt
libvirt.virEventRegisterDefaultImpl()
threading.Thread(target=lambda: [libvirt.virEventRunDefaultImpl() for _ in iter(int, 1)], daemon=True).start()
conn = libvirt.open("qemu:///system")
conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lambda *a: None, None)
print("ready", flush=True)
sys.stdin.read()
"""


def ctxt_switches(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Agent:
    """``janus-hooks agent --root SCRATCH`` with a notify socket; stopped with SIGTERM."""

    def __init__(self, *args: str, name: str = "bench-agent") -> None:
        self.log = RUN_DIR / f"{name}.log"
        self.notify = RUN_DIR / f"{name}-notify.sock"
        self.notify.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.notify))
        self.sock.settimeout(TIMEOUT)
        cli = str(Path(sys.executable).with_name("janus-hooks"))
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "NOTIFY_SOCKET": str(self.notify)}
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([cli, "agent", "--root", str(SCRATCH), *args],  # noqa: S603
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        if not self.sock.recv(4096).startswith(b"READY=1"):
            raise RuntimeError("the agent did not say READY=1")

    def logged(self, text: str) -> bool:
        return text in self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(TIMEOUT)
        self.sock.close()
        self.notify.unlink(missing_ok=True)
        if self.proc.returncode not in (0, -signal.SIGKILL):
            raise RuntimeError(f"the agent exited {self.proc.returncode}: {self.log.read_text()[-500:]}")


def measure_agent_idle(runs: int = 3) -> list[dict]:
    name = "agent: idle wakeups/s, connected to libvirtd"
    rss_name = "agent: idle RSS"
    try:
        with bench():
            agent = Agent("--udev-source", "kernel")
            # The same agent without a uevent monitor, in the same windows: the kernel source cannot filter in
            # the kernel, so every uevent on a busy machine wakes it; this one shows what remains without them.
            quiet = Agent("--udev-source", "off", name="bench-agent-quiet")
            bare = subprocess.Popen([sys.executable, "-c", BARE_CLIENT], stdin=subprocess.PIPE,  # noqa: S603
                                    stdout=subprocess.PIPE, text=True)
            try:
                _wait(lambda: agent.logged("libvirt at qemu:///system: connected"), TIMEOUT, "the agent to connect")
                if bare.stdout.readline().strip() != "ready":
                    raise RuntimeError("the bare libvirt client did not connect")
                _wait(lambda: quiet.logged("libvirt at qemu:///system: connected"), TIMEOUT, "the agent to connect")
                time.sleep(SETTLE)  # noqa: S110 - a window, not a wait for a condition: start-up work ends
                values, floors, quiets, rss, bare_rss = [], [], [], [], []
                pids = (agent.proc.pid, bare.pid, quiet.proc.pid)
                for _ in range(runs):
                    before, t0 = [ctxt_switches(p) for p in pids], time.monotonic()
                    time.sleep(WINDOW)  # the measurement window itself
                    after, t1 = [ctxt_switches(p) for p in pids], time.monotonic()
                    rates = [(a - b) / (t1 - t0) for a, b in zip(after, before, strict=True)]
                    values.append(rates[0])
                    floors.append(rates[1])
                    quiets.append(rates[2])
                    rss.append(rss_mib(agent.proc.pid))
                    bare_rss.append(rss_mib(bare.pid))
                threads = len(list(Path(f"/proc/{agent.proc.pid}/task").iterdir()))
            finally:
                bare.stdin.close()
                bare.wait(TIMEOUT)
                agent.stop()
                quiet.stop()
    except Skip as why:
        return [_skipped(name, str(why)), _skipped(rss_name, str(why))]
    value, floor = statistics.median(values), statistics.median(floors)
    return [
        {"name": name, "value": round(value, 3), "baseline": round(floor, 3),
         "ratio": round(value / floor, 2) if floor else None, "unit": "/s", "spread": _spread(values), "runs": runs,
         "baseline_label": "a bare libvirt-python client (default event loop thread, one lifecycle callback)",
         "goal": f"<= {IDLE_GOAL}/s", "goal_met": value <= IDLE_GOAL,
         "note": (f"{WINDOW:g} s windows after {SETTLE:g} s settling; context switches of all {threads} threads "
                  f"(per window: {', '.join(f'{v:.3f}' for v in values)}); the same agent without its uevent "
                  f"monitor: {statistics.median(quiets):.3f}/s; libvirtd pings each client every 5 s")},
        {"name": rss_name, "value": round(max(rss), 1), "baseline": None, "ratio": None, "unit": "MiB",
         "spread": 0.0, "runs": runs, "goal": f"<= {RSS_GOAL_MIB} MiB", "goal_met": max(rss) <= RSS_GOAL_MIB,
         "note": (f"VmRSS at the end of each idle window, the largest shown; the bare libvirt-python client: "
                  f"{max(bare_rss):.1f} MiB")},
    ]


def measure_agent_rollback(runs: int = 3) -> dict:
    name = "agent: QEMU killed to hugepages free, release hook unable to run"
    try:
        with bench() as b:
            start = _pool()
            if start["free"] >= 64:
                raise Skip(f"the pool already has {start['free']} free pages: the VM would take none from it")
            dom = b.define("agent-rollback", managed=True)
            b.make_seen(dom)
            b.enable(STAMP_BEFORE, STAMP_AFTER, on=False)
            vm = PREFIX + "agent-rollback"

            def kill_and_time() -> float:
                pid = int(Path(f"/run/libvirt/qemu/{vm}.pid").read_text())
                t0 = time.perf_counter()
                os.kill(pid, signal.SIGKILL)
                _wait(lambda: _pool()["nr"] == start["nr"], TIMEOUT, "the pool to be back")
                took = time.perf_counter() - t0
                _wait(lambda: not dom.isActive(), TIMEOUT, f"libvirt to see {vm} stopped")
                return took

            def with_agent() -> float:
                b.enable(DROP_IN)
                dom.create()
                b.enable(DROP_IN, on=False)  # release end will not reach janus-hooks
                agent = Agent("--no-libvirt", "--udev-source", "off")
                try:
                    _wait(lambda: agent.logged(f"VM {vm}: following QEMU pid"), TIMEOUT, "the agent to follow QEMU")
                    return kill_and_time()
                finally:
                    agent.stop()
                    b.enable(DROP_IN)

            def libvirt_alone() -> float:
                b.enable(DROP_IN)
                dom.create()
                return kill_and_time()

            samples = interleave({"agent": with_agent, "libvirt": libvirt_alone}, runs, 0, seed=11)
    except Skip as why:
        return _skipped(name, str(why))
    value = statistics.median(s * 1000 for s in samples["agent"])
    baseline = statistics.median(s * 1000 for s in samples["libvirt"])
    return {"name": name, "value": round(value, 1), "baseline": round(baseline, 1),
            "ratio": round(value / baseline, 2), "unit": "ms", "spread": _spread(samples["agent"]), "runs": runs,
            "baseline_label": "libvirt noticing the death and running janus-hooks' release end itself",
            "note": ("the agent follows the VM's QEMU by pidfd, as while libvirtd is away, and rolls back at once; "
                     "128 MiB VM, 64 x 2 MiB pages; TCG")}

