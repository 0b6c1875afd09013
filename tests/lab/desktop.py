"""Scenarios run INSIDE the desktop flavour of the real-kernel lab (see tests/lab/README.md).

    tests/lab/run --flavour desktop -- .venv/bin/python tests/lab/desktop.py smoke|all|demo|bench

The lab's host is a systemd desktop: udevd, dbus, logind, greetd (display-manager.service) logging `desk`
in automatically into weston, which has the GPU (bochs VGA, 0000:00:02.0) through logind; the GPU's audio
function (0000:00:02.1, snd_hda_intel, same IOMMU group) held by WirePlumber in desk's systemd instance;
an application of desk's holding the card; a second GPU (0000:00:06.0, bochs-drm, its own group).

Every check reads the real kernel (/sys, /proc, /dev), logind (loginctl) and the real processes, never
janus-hooks' own output. Results go to $LAB_OUT/desktop-<scenario>.json; the story goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import scenario
from scenario import VENV_BIN, module_loaded, run, say, vtcon_fb_bound, wait_for

GPU = "0000:00:02.0"
AUDIO = "0000:00:02.1"
SECOND_GPU = "0000:00:06.0"
VM = "lab-desktop"
JOURNAL = Path("/var/lib/janus-hooks/journal") / f"{VM}.jsonl"
HOOK = scenario.HOOK
OUT = scenario.OUT
USER_APP_UNIT = "janus-lab-app.service"
# QEMU's ids of the GPU's two functions, as the nested QEMU lists them (query-pci).
VGA_ID = (0x1234, 0x1111)
HDA_ID = (0x8086, 0x293E)

CONFIG = """\
log_level = "debug"

[timeouts]
release = 15.0
driver = 20.0
module = 20.0
"""

DOMAIN = scenario.domain_xml(VM, ("0", "1"))
# The bench switches the GPU only: hugepages are measured on their own (bench/hugepage_rows.py).
DOMAIN_NO_HUGEPAGES = scenario.domain_xml(VM, ("0", "1"), hugepages=False)


# --- the real kernel, logind and processes ----------------------------------------------------------------
def driver(address: str) -> str | None:
    try:
        return os.path.basename(os.readlink(f"/sys/bus/pci/devices/{address}/driver"))
    except OSError:
        return None


def iommu_group(address: str) -> str | None:
    try:
        return os.path.basename(os.readlink(f"/sys/bus/pci/devices/{address}/iommu_group"))
    except OSError:
        return None


def card_node(address: str = GPU) -> str | None:
    drm = Path(f"/sys/bus/pci/devices/{address}/drm")
    cards = sorted(p.name for p in drm.glob("card*")) if drm.is_dir() else []
    return f"/dev/dri/{cards[0]}" if cards else None


def audio_nodes() -> list[str]:
    """The /dev/snd nodes of the GPU audio function's sound card (none while it is not on snd_hda_intel)."""
    nodes = []
    for card in Path(f"/sys/bus/pci/devices/{AUDIO}/sound").glob("card*"):
        nodes += [f"/dev/snd/{n.name}" for n in sorted(card.iterdir()) if n.name.startswith(("controlC", "pcmC"))]
    return nodes


def unit_of(pid: int) -> str:
    """The last component of the process' cgroup: its unit or scope (user units included)."""
    try:
        return Path(f"/proc/{pid}/cgroup").read_text().strip().rsplit("/", 1)[-1]
    except OSError:
        return "?"


def holders(nodes: list[str]) -> list[dict]:
    """Every process with one of ``nodes`` open: pid, comm, unit (cgroup leaf) and the node."""
    wanted = set(nodes)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        seen = set()
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{entry}/fd/{fd}")
            except OSError:
                continue
            if target in wanted and target not in seen:
                seen.add(target)
                try:
                    comm = Path(f"/proc/{entry}/comm").read_text().strip()
                except OSError:
                    comm = "?"
                found.append({"pid": int(entry), "comm": comm, "unit": unit_of(int(entry)), "node": target})
    return sorted(found, key=lambda h: (h["node"], h["pid"]))


def sessions() -> list[dict]:
    """logind's sessions with the properties the scenarios look at."""
    listing = run(["loginctl", "list-sessions", "--no-legend"], check=False, timeout=30).stdout
    ids = [line.split()[0] for line in listing.splitlines() if line.split()]
    result = []
    for sid in ids:
        props = run(["loginctl", "show-session", sid, "-p", "Id", "-p", "Name", "-p", "Seat", "-p", "Type",
                     "-p", "Active", "-p", "State", "-p", "Leader", "-p", "Class"], check=False, timeout=30).stdout
        fields = dict(line.split("=", 1) for line in props.splitlines() if "=" in line)
        if fields:
            result.append(fields)
    return result


def fd_of(pid: int, node: str) -> int | None:
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == node:
                return int(fd)
    except OSError:
        pass
    return None


def same_open_file(pid_a: int, fd_a: int, pid_b: int, fd_b: int) -> bool:
    """kcmp(KCMP_FILE): do two descriptors of two processes refer to one open file description?"""
    import ctypes

    sys_kcmp, kcmp_file = 312, 0  # x86_64
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(sys_kcmp, pid_a, pid_b, kcmp_file, fd_a, fd_b) == 0


def shares_compositor_file(node: str) -> dict[str, bool]:
    """For PID 1 and systemd-logind: is their descriptor of ``node`` the compositor's open file (logind's
    TakeDevice and fd store) rather than one of their own?"""
    found = holders([node])
    weston = next((h["pid"] for h in found if h["comm"] == "weston"), None)
    result = {}
    for h in found:
        if h["comm"] in ("systemd", "systemd-logind") and (h["comm"] == "systemd-logind" or h["pid"] == 1):
            fd_a, fd_b = fd_of(h["pid"], node), fd_of(weston, node) if weston else None
            result[h["comm"]] = (fd_a is not None and fd_b is not None
                                 and same_open_file(h["pid"], fd_a, weston, fd_b))
    return result


def graphical_session() -> dict | None:
    """The active wayland session on seat0, if there is one."""
    for s in sessions():
        if s.get("Seat") == "seat0" and s.get("Type") == "wayland" and s.get("Active") == "yes":
            return s
    return None


def seat_masters() -> list[str]:
    """DRM devices logind lists as [MASTER] on seat0 (udev's master-of-seat tag)."""
    out = run(["loginctl", "seat-status", "seat0", "--no-pager", "--full"], check=False, timeout=30).stdout
    return sorted({line.split("drm:", 1)[1].split()[0] for line in out.splitlines()
                   if "[MASTER]" in line and "drm:card" in line and "-" not in line.split("drm:", 1)[1]})


def desktop_holds_card(previous_session: str | None = None) -> bool:
    """A graphical session (a new one, when ``previous_session`` is given) has the card through logind:
    weston, systemd-logind and PID 1 (logind's fd store) hold it, and WirePlumber holds the audio card."""
    session = graphical_session()
    if session is None or session.get("Id") == previous_session:
        return False
    node = card_node()
    if node is None:
        return False
    comms = {h["comm"] for h in holders([node])}
    pids = {h["pid"] for h in holders([node])}
    audio = holders(audio_nodes())
    return ({"weston", "systemd-logind"} <= comms and 1 in pids
            and any(h["comm"] == "wireplumber" for h in audio))


def systemctl_active(unit: str) -> str:
    return run(["systemctl", "is-active", unit], check=False, timeout=30).stdout.strip()


def host_state() -> dict:
    nr, free = scenario.hugepages()
    node = card_node()
    session = graphical_session()
    return {
        "gpu_driver": driver(GPU),
        "audio_driver": driver(AUDIO),
        "second_gpu_driver": driver(SECOND_GPU),
        "groups": {GPU: iommu_group(GPU), AUDIO: iommu_group(AUDIO), SECOND_GPU: iommu_group(SECOND_GPU)},
        "card": node,
        "audio_nodes": audio_nodes(),
        "fbcon_bound": vtcon_fb_bound(),
        "vfio_group_node": Path(f"/dev/vfio/{iommu_group(GPU)}").exists(),
        "card_holders": holders([node]) if node else [],
        "audio_holders": holders(audio_nodes()),
        "session": session,
        "seat_masters": seat_masters(),
        "display_manager": systemctl_active("display-manager.service"),
        "hugepages_total": nr,
        "hugepages_free": free,
        "journal_open": JOURNAL.exists(),
        "vfio_modules": sorted(m for m in ("vfio", "vfio_pci", "vfio_pci_core", "vfio_iommu_type1")
                               if module_loaded(m)),
    }


def show(state: dict) -> str:
    """One line a person can read: what the real kernel, logind and processes say right now."""
    fbcon = {True: "bound", False: "unbound", None: "gone (no framebuffer)"}[state["fbcon_bound"]]
    session = state["session"]
    card = ", ".join(f"{h['comm']}[{h['pid']}]" for h in state["card_holders"]) or "nobody"
    audio = ", ".join(f"{h['comm']}[{h['pid']}]" for h in state["audio_holders"]) or "nobody"
    return (f"GPU {state['gpu_driver'] or 'no driver'}, audio {state['audio_driver'] or 'no driver'}; "
            f"display-manager {state['display_manager']}; graphical session "
            f"{'#' + session['Id'] + ' (' + session['Name'] + ')' if session else 'none'}; card held by {card}; "
            f"audio held by {audio}; fbcon {fbcon}; hugepages "
            f"{state['hugepages_total'] - state['hugepages_free']}/{state['hugepages_total']} in use; "
            f"journal {'open' if state['journal_open'] else 'closed'}")


# --- scenarios -------------------------------------------------------------------------------------------
def scenario_smoke() -> dict:
    """What the lab booted: the desktop as a person would find it, before janus-hooks is installed."""
    state = host_state()
    state["card_same_open_file"] = shares_compositor_file(state["card"] or "/dev/dri/card0")
    say(f"desktop: {show(state)}")
    say(f"PID 1's and logind's descriptors of the card are weston's open file (kcmp): "
        f"{state['card_same_open_file']}")
    say(f"seat0 masters: {', '.join(state['seat_masters'])}; IOMMU groups: {state['groups']}")
    return state


def setup(libvirt: bool = True) -> dict:
    timings = {}
    for private in ("/var/lib/janus-hooks", "/var/log/janus-hooks"):
        if Path(private).is_dir():
            os.chmod(private, 0o700)
    start = time.monotonic()
    run([str(VENV_BIN / "janus-hooks"), "install", "--yes"])
    Path("/etc/janus-hooks/janus.toml").write_text(CONFIG)
    timings["install_s"] = time.monotonic() - start
    say(f"janus-hooks install: hook at {HOOK} ({timings['install_s']:.1f} s)")
    if not libvirt:
        return timings
    start = time.monotonic()
    run(["bash", str(scenario.REPO / "tests/lab/libvirt-up"), "120"], timeout=300)
    timings["libvirtd_s"] = time.monotonic() - start
    say(f"libvirtd up ({timings['libvirtd_s']:.1f} s)")
    return timings


def nested_qemu_devices(dom) -> list[list[int]]:
    import libvirt_qemu

    reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, '{"execute":"query-pci"}', 0))
    return [[dev["id"]["vendor"], dev["id"]["device"]] for bus in reply["return"] for dev in bus["devices"]]


def start_vm(conn, xml: str) -> tuple[object, str | None, float]:
    """Define and start the VM through libvirt; (domain, libvirt's error or None, seconds to return)."""
    import libvirt

    dom = conn.defineXML(xml)
    t0 = time.monotonic()
    try:
        dom.create()
        error = None
    except libvirt.libvirtError as err:
        error = str(err)
    return dom, error, time.monotonic() - t0


def cleanup(dom) -> None:
    try:
        if dom.isActive():
            dom.destroy()
    finally:
        dom.undefine()


def scenario_switch(conn) -> dict:
    """The managed single-GPU VM (GPU + its audio + hugepages) started and destroyed through libvirt."""
    result: dict = {"before": host_state()}
    before_session = (result["before"]["session"] or {}).get("Id")
    say(f"before: {show(result['before'])}")
    say(f"virsh start {VM} ...")
    t0 = time.time()
    dom, error, took = start_vm(conn, DOMAIN)
    try:
        result["error"] = error
        result["start_s"] = took
        if error:
            say(f"libvirt refused the start after {took:.2f} s: {error}")
            result["after_refusal"] = host_state()
            say(f"after the refusal: {show(result['after_refusal'])}")
            return result
        records = scenario.journal_steps(JOURNAL)
        binds = [r for r in records if r.get("type") == "intent" and r["action"]["kind"] == "bind-vfio"]
        done_ms = {r["step"]: r["ms"] for r in records if r.get("type") == "done"}
        t_bound = binds[-1]["time"] + done_ms[binds[-1]["step"]] / 1000 if binds else None
        result["start_to_vfio_s"] = (t_bound - t0) if t_bound else None
        say(f"VM running after {took:.2f} s; janus-hooks did:")
        result["steps"] = scenario.print_steps(records)
        result["during"] = host_state()
        result["nested_qemu_devices"] = nested_qemu_devices(dom)
        result["qemu_uses_hugepages"] = result["during"]["hugepages_free"] < result["during"]["hugepages_total"]
        say(f"during: {show(result['during'])}")
        say(f"nested QEMU (query-pci): {result['nested_qemu_devices']}")
        say(f"virsh destroy {VM} ...")
        t0 = time.monotonic()
        dom.destroy()
        result["destroy_s"] = time.monotonic() - t0
        result["destroy_to_session_s"] = result["destroy_s"] + wait_for(
            lambda: desktop_holds_card(before_session), 120, "a new graphical session holding the card")
        say(f"a new graphical session holds the card {result['destroy_to_session_s']:.2f} s after the destroy")
        # The application comes back with the user's manager, after the compositor (it waits for it).
        result["app_back_s"] = wait_for(
            lambda: any(h["unit"] == USER_APP_UNIT for h in holders([card_node() or ""])), 60,
            "the user's application holding the card again")
    finally:
        cleanup(dom)
    result["after"] = host_state()
    say(f"after: {show(result['after'])}")
    return result


def holder_process(node: str) -> subprocess.Popen:
    """A process outside any session (a root service's child, not a user's) holding ``node`` open."""
    proc = subprocess.Popen(
        [sys.executable, "-c", f"import sys; f = open({node!r}, 'rb'); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: proc.pid in [h["pid"] for h in holders([node])], 30, f"pid {proc.pid} opening {node}")
    return proc


def scenario_refuse(conn, node: str) -> dict:
    """A process janus-hooks may not stop holds ``node``: the start is refused naming it, the desktop stays."""
    result: dict = {"node": node, "before": host_state()}
    before_session = (result["before"]["session"] or {}).get("Id")
    holder = holder_process(node)
    result["holder_pid"] = holder.pid
    try:
        say(f"pid {holder.pid} (python3, outside any session) holds {node}; virsh start {VM} ...")
        dom, result["error"], result["refused_after_s"] = start_vm(conn, DOMAIN)
        cleanup(dom)
        say(f"libvirt said: {result['error']}")
        # Untouched, or put back by the rollback: the session that was there, or a new one, holds the card.
        result["desktop_back_s"] = wait_for(lambda: desktop_holds_card(None), 120, "the desktop holding the card")
        result["same_session"] = (graphical_session() or {}).get("Id") == before_session
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    result["after"] = host_state()
    say(f"after: {show(result['after'])}")
    return result


def scenario_crash(kill_at: str) -> dict:
    """kill -9 of the installed hook mid-switch (once the journal has an intent of ``kill_at``), then
    `janus-hooks rollback`."""
    result: dict = {"before": host_state()}
    before_session = (result["before"]["session"] or {}).get("Id")
    proc = subprocess.Popen([str(HOOK), VM, "prepare", "begin", "-"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc.stdin.write(DOMAIN)
    proc.stdin.close()
    killed_at = None
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        kinds = [r["action"]["kind"] for r in scenario.journal_steps(JOURNAL) if r.get("type") == "intent"]
        if kill_at in kinds:
            proc.send_signal(signal.SIGKILL)
            killed_at = kinds[-1]
            break
        time.sleep(0.01)
    if proc.poll() is None and killed_at is None:
        proc.kill()
    proc.wait(timeout=60)
    result["killed_at"] = killed_at
    result["hook_status"] = proc.returncode
    result["hook_stderr"] = proc.stderr.read().strip().splitlines()[-3:]
    result["crashed"] = host_state()
    say(f"hook killed (-9) at step {killed_at!r} (status {proc.returncode}): {show(result['crashed'])}")
    t0 = time.monotonic()
    rollback = run([str(VENV_BIN / "janus-hooks"), "rollback", VM], check=False, timeout=180)
    result["rollback_status"] = rollback.returncode
    result["rollback_output"] = (rollback.stdout + rollback.stderr).strip().splitlines()[-5:]
    result["desktop_back_s"] = (time.monotonic() - t0) + wait_for(
        lambda: desktop_holds_card(before_session if killed_at else None), 120,
        "a graphical session holding the card")
    result["after"] = host_state()
    say(f"janus-hooks rollback -> exit {rollback.returncode}; after: {show(result['after'])}")
    return result


class HookFailed(RuntimeError):
    """janus-hooks' hook exited non-zero in the bench."""


def timed_ms(argv: list[str], runs: int = 3) -> list[float]:
    """Wall time of a command, ``runs`` times (ms): the interpreter's floor and imports inside the lab."""
    times = []
    for _ in range(runs):
        t0 = time.monotonic()
        run(argv, timeout=120)
        times.append((time.monotonic() - t0) * 1000)
    return times


SLOW_PATH = "janus_hooks.hook, janus_hooks.runtime, janus_hooks.plan, janus_hooks.snapshot, janus_hooks.domain"


def hook_python(code: str) -> list[str]:
    """The hook's interpreter as libvirt runs it (-I -S), with the repository first on its path."""
    return ["/usr/bin/python3", "-I", "-S", "-c", f"import sys; sys.path.insert(0, {str(scenario.REPO)!r}); {code}"]


def hook_in_ram() -> int:
    """Copy every file the hook's slow path reads (the interpreter, the standard library modules it imports,
    janus_hooks, their cached bytecode) up into the lab's overlay, whose upper layer is tmpfs: from then on
    the hook reads them from RAM instead of over 9p, like a desktop reads them from its page cache. The
    lab's root is a throw-away overlay: nothing reaches the machine. Returns how many files."""
    listing = run(hook_python(
        f"import importlib.util, os; import {SLOW_PATH}; "
        "files = {os.path.realpath(sys.executable)}; "
        "[files.update(f for f in (m.__file__, importlib.util.cache_from_source(m.__file__) "
        "if m.__file__.endswith('.py') else None) if f and os.path.exists(f)) "
        "for m in list(sys.modules.values()) if getattr(m, '__file__', None)]; "
        "print('\\n'.join(sorted(files)))"), timeout=300).stdout.split()
    for path in listing:
        mode = os.stat(path).st_mode
        os.chmod(path, mode & 0o7777)  # a metadata change copies the file up, data and mtime included
    return len(listing)


def default_user_stop_delay() -> float:
    """The lab keeps desk's manager after the session (tests/lab/desktop-setup: the harder way back, which the
    tests take); the benchmark puts logind's default back (10 s), so that the guides' script meets the
    desktop most people have. Returns the delay logind now applies, in seconds."""
    Path("/etc/systemd/logind.conf.d/janus-lab.conf").unlink(missing_ok=True)
    run(["systemctl", "kill", "--signal=SIGHUP", "systemd-logind.service"], timeout=60)  # logind re-reads its config
    out = run(["busctl", "get-property", "org.freedesktop.login1", "/org/freedesktop/login1",
               "org.freedesktop.login1.Manager", "UserStopDelayUSec"], timeout=30).stdout.split()
    return int(out[-1]) / 1e6


def scenario_bench(runs: int) -> dict:
    """The single-GPU switch both ways on this desktop, timed from real timestamps, in rounds that run each
    side once: janus-hooks' installed hook (`prepare begin` as libvirt runs it, `release end`), the guides'
    script (bench/guide-switch-desktop.sh: fixed sleeps) and the floor (bench/floor-switch-desktop.sh: the
    same operations, no sleeps, no checks). "start": until both functions are on vfio-pci; "back": until a
    new graphical session holds the card through logind (and WirePlumber the audio)."""
    bench = scenario.REPO / "bench"
    say(f"user managers outlive their last session by {default_user_stop_delay()} s (logind's default), "
        "as on most desktops")
    # The interpreter and the imports, read over 9p, then from RAM (what the janus rows below run with).
    costs = {"interpreter_9p_ms": timed_ms(hook_python("pass")), "imports_9p_ms": timed_ms(hook_python(
        f"import {SLOW_PATH}"))}
    costs["files_in_ram"] = hook_in_ram()
    costs["interpreter_ms"] = timed_ms(hook_python("pass"))
    costs["imports_ms"] = timed_ms(hook_python(f"import {SLOW_PATH}"))
    say(f"hook's interpreter + imports: {min(costs['interpreter_9p_ms']):.0f} + "
        f"{min(costs['imports_9p_ms']):.0f} ms over 9p; {min(costs['interpreter_ms']):.0f} + "
        f"{min(costs['imports_ms']):.0f} ms from RAM ({costs['files_in_ram']} files copied up)")
    sides = {
        "janus": (lambda: hook("prepare", "begin"), lambda: hook("release", "end")),
        "guide": (lambda: run(["bash", str(bench / "guide-switch-desktop.sh"), "start"], timeout=120),
                  lambda: run(["bash", str(bench / "guide-switch-desktop.sh"), "stop"], timeout=120)),
        "floor": (lambda: run(["bash", str(bench / "floor-switch-desktop.sh"), "start"], timeout=120),
                  lambda: run(["bash", str(bench / "floor-switch-desktop.sh"), "stop"], timeout=120)),
    }
    times: dict[str, list[float]] = {f"{side}_{way}": [] for side in sides for way in ("start", "back")}
    janus_steps: list[list[dict]] = []

    def hook(op: str, sub: str) -> None:
        proc = subprocess.run([str(HOOK), VM, op, sub, "-"], input=DOMAIN_NO_HUGEPAGES, capture_output=True,
                              text=True, timeout=300)
        if proc.returncode != 0:
            raise HookFailed(f"janus-hooks {op} {sub} failed: {proc.stderr.strip()}")
        if op == "prepare":
            done = {r["step"]: r["ms"] for r in scenario.journal_steps(JOURNAL) if r.get("type") == "done"}
            janus_steps.append([{"kind": r["action"]["kind"], "ms": done.get(r["step"])}
                                for r in scenario.journal_steps(JOURNAL) if r.get("type") == "intent"])

    on_vfio = lambda: driver(GPU) == "vfio-pci" and driver(AUDIO) == "vfio-pci"  # noqa: E731
    desktop_whole = lambda: (desktop_holds_card(None)  # noqa: E731
                             and any(h["unit"] == USER_APP_UNIT for h in holders([card_node() or ""])))
    failures: dict[str, str] = {}  # a side whose start failed is not run again
    back_failures: dict[str, list[dict]] = {}
    left_incomplete: dict[str, list[dict]] = {}  # the session came back, the user's application did not
    aborted = None
    previous = None
    try:
        for n in range(runs):
            order = list(sides)[n % 3:] + list(sides)[:n % 3]  # each side goes first once in three rounds
            for side in order:
                if side in failures:
                    continue
                start, back = sides[side]
                try:
                    wait_for(desktop_whole, 60 if previous else 180, "the whole desktop (session, audio, application)")
                except SystemExit as err:
                    # Counted against the side before, then put right as a person would: the application
                    # started again.
                    left_incomplete.setdefault(previous, []).append({"error": str(err), "diagnostics": diagnostics()})
                    say(f"{previous} left the desktop incomplete: {show(host_state())}; restarting {USER_APP_UNIT}")
                    run(["systemctl", "--user", "--machine=1500@.host", "restart", USER_APP_UNIT], check=False,
                        timeout=60)
                    wait_for(desktop_whole, 120, "the whole desktop (session, audio, application)")
                previous = side
                session = (graphical_session() or {}).get("Id")
                t0 = time.monotonic()
                try:
                    start()
                except HookFailed as err:
                    # A refused start changed nothing (or was rolled back): measure the others, say why not this.
                    failures[side] = str(err)
                    say(f"{side}: {err}")
                    continue
                wait_for(on_vfio, 120, f"{side}: both functions on vfio-pci")
                times[f"{side}_start"].append(time.monotonic() - t0)
                t0 = time.monotonic()
                back()
                try:
                    wait_for(lambda s=session: desktop_holds_card(s), 90, f"{side}: a new session holding the card")
                    times[f"{side}_back"].append(time.monotonic() - t0)
                except SystemExit as err:
                    # Counted, with what the desktop looked like, then put right the way a person would (the
                    # display manager restarted), so that the next side starts from the same desktop.
                    back_failures.setdefault(side, []).append({"error": str(err), "diagnostics": diagnostics()})
                    say(f"{side}: the desktop did not come back ({err}): {show(host_state())}; "
                        "restarting the display manager")
                    run(["udevadm", "settle", "--timeout=30"], check=False, timeout=60)
                    run(["systemctl", "restart", "display-manager.service"], check=False, timeout=60)
            say(f"round {n + 1}: " + " | ".join(
                f"{side} start {times[side + '_start'][-1]:.2f} s, back "
                + (f"{times[side + '_back'][-1]:.2f} s" if len(times[side + "_back"]) > n - len(
                    back_failures.get(side, [])) else "failed")
                for side in sides if side not in failures and len(times[side + "_start"]) > n))
    except SystemExit as err:
        # The desktop could not be put right: what was measured so far stays, with why it stopped.
        aborted = {"error": str(err), "diagnostics": diagnostics()}
        say(f"bench stopped: {err}: {show(aborted['diagnostics']['state'])}")
    return {"times": times, "failures": failures, "back_failures": back_failures,
            "left_incomplete": left_incomplete, "aborted": aborted,
            "janus_steps": janus_steps, **costs}


DEBUG_NOISE = ("Got message type=", "Sent message type=", "varlink", "/run/systemd/userdb/", "Match type=")


def diagnostics() -> dict:
    """What a person needs to see why a scenario failed: the desktop's units, logind, the hook's log."""
    out = {"state": host_state()}
    for key, argv in (
        ("session", ["bash", str(scenario.REPO / "tests/lab/desktop-session"), "status"]),
        ("units", ["systemctl", "--no-pager", "list-units", "--state=failed,activating,deactivating"]),
        ("dri", ["ls", "-l", "/dev/dri", "/sys/class/drm"]),
        ("card_udev", ["udevadm", "info", "--query=all", "--name=/dev/dri/card0"]),
        ("seat", ["loginctl", "seat-status", "seat0", "--no-pager", "--full"]),
        ("journal", ["journalctl", "--no-pager", "-b", "-n", "3000", "-u", "greetd.service",
                     "-u", "systemd-logind.service", "-u", "user@1500.service"]),
    ):
        proc = run(argv, check=False, timeout=60)
        # logind logs at debug level in the lab (tests/lab/desktop-setup); its D-Bus traffic is left out.
        out[key] = [line for line in (proc.stdout + proc.stderr).splitlines()
                    if not any(noise in line for noise in DEBUG_NOISE)][-80:]
    log = Path("/var/log/janus-hooks/hook.log")
    out["hook_log"] = log.read_text().splitlines()[-60:] if log.exists() else []
    weston = Path("/var/log/janus-lab/weston.log")
    out["weston_log"] = [line for line in weston.read_text().splitlines()
                         if "Command line" in line or "drm" in line.lower() or "fail" in line.lower()
                         or "error" in line.lower()][-30:] if weston.exists() else []
    return out


def guarded(results: dict, name: str, scenario_fn, *args) -> None:
    """Run one scenario; a failure is recorded with diagnostics, and the next scenario still runs."""
    try:
        results[name] = scenario_fn(*args)
    except (SystemExit, Exception) as err:  # noqa: BLE001 - every failure is a result to show
        say(f"{name}: FAILED: {err}")
        results[name] = {"failed": str(err), "diagnostics": diagnostics()}
        for line in results[name]["diagnostics"]["session"] + results[name]["diagnostics"]["journal"][-30:]:
            say(f"    {line}")


def save(name: str, data: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"desktop-{name}.json").write_text(json.dumps(data, indent=1, sort_keys=True))
    # The whole story of logind (at debug level), greetd and udev, for what the diagnostics leave out.
    (OUT / "journal.txt").write_text(run(["journalctl", "--no-pager", "-b", "-o", "short-precise",
                                          "-u", "systemd-logind.service", "-u", "greetd.service",
                                          "-u", "systemd-udevd.service"], check=False, timeout=60).stdout)
    log = Path("/var/log/janus-hooks/hook.log")
    if log.exists():
        (OUT / "hook.log").write_text(log.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=["smoke", "all", "demo", "bench"])
    parser.add_argument("--runs", type=int, default=3, help="bench: rounds (each side once per round)")
    args = parser.parse_args()
    if os.environ.get("LAB_FLAVOUR") != "desktop":
        print("desktop.py: runs inside the desktop lab only (tests/lab/run --flavour desktop -- ...)",
              file=sys.stderr)
        return 2
    results: dict = {"smoke": scenario_smoke()}
    save(args.scenario, results)
    if args.scenario == "smoke":
        return 0
    if args.scenario == "bench":
        results["setup"] = setup(libvirt=False)
        results["bench"] = scenario_bench(args.runs)
        save(args.scenario, results)
        return 0
    results["setup"] = setup()
    conn = scenario.connect()
    guarded(results, "switch", scenario_switch, conn)
    save(args.scenario, results)
    if args.scenario == "all":
        guarded(results, "refuse-audio", scenario_refuse, conn, (audio_nodes() or ["/dev/snd/controlC0"])[0])
        save(args.scenario, results)
        guarded(results, "refuse-card", scenario_refuse, conn, card_node() or "/dev/dri/card0")
        save(args.scenario, results)
        guarded(results, "crash", scenario_crash, "bind-vfio")
        save(args.scenario, results)
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
