"""Scenarios run INSIDE the real-kernel lab (see tests/lab/README.md), as a person would use janus-hooks.

    tests/lab/run -- .venv/bin/python tests/lab/scenario.py demo|all|bench [--runs N]

The lab's host has what a single-GPU desktop has: a GPU (bochs VGA, 0000:00:02.0) driven by bochs-drm with
fbcon on vtcon0, a display server (Xorg under runit) holding /dev/dri/card0, libvirtd, an IOMMU. Janus is
installed with `janus-hooks install` and told how to stop the display server (no systemd here).

Every check reads the real kernel (/sys, /proc, /dev) and the real processes, never janus-hooks' own
output. Results go to $LAB_OUT/<scenario>.json; the story goes to stdout, step by step with durations.
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

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
GPU = "0000:00:02.0"
GROUP = "2"
VM = "lab-gpu"
OUT = Path(os.environ.get("LAB_OUT", "/lab-out"))
JOURNAL = Path("/var/lib/janus-hooks/journal") / f"{VM}.jsonl"
HOOK = Path("/etc/libvirt/hooks/qemu.d/janus-hooks")
PROFILE_NS = "https://janus-hooks.org/xmlns/profile/1"

CONFIG = """\
log_level = "debug"

[display]
# No systemd in the lab: Xorg is a runit service, stopped and started like a display manager.
stop_command = ["/usr/bin/sv", "down", "xorg"]
start_command = ["/usr/bin/sv", "up", "xorg"]

[timeouts]
release = 8.0
driver = 10.0
module = 20.0
"""

def domain_xml(vm: str, functions: tuple[str, ...], hugepages: bool = True) -> str:
    """A small managed single-GPU guest (TCG) with the given PCI functions of slot 00:02 as hostdevs."""
    hostdevs = "".join(f"""\
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x00' slot='0x02' function='0x{fn}'/></source>
    </hostdev>
""" for fn in functions)
    backing = "  <memoryBacking><hugepages/></memoryBacking>\n" if hugepages else ""
    return f"""\
<domain type='qemu'>
  <name>{vm}</name>
  <metadata><janus:profile xmlns:janus='{PROFILE_NS}' mode='single-gpu'/></metadata>
  <memory unit='MiB'>64</memory>
{backing}  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
{hostdevs}    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
"""


DOMAIN = domain_xml(VM, ("0",))
# The bench switches the GPU only: hugepages are measured on their own (bench/hugepage_rows.py).
DOMAIN_NO_HUGEPAGES = domain_xml(VM, ("0",), hugepages=False)


# --- the real kernel and processes -------------------------------------------------------------------------
def pci_driver(address: str) -> str | None:
    try:
        return os.path.basename(os.readlink(f"/sys/bus/pci/devices/{address}/driver"))
    except OSError:
        return None


def gpu_driver() -> str | None:
    return pci_driver(GPU)


def stop_process(proc: subprocess.Popen, timeout: float = 60) -> int | str:
    """SIGTERM, then its exit status; SIGKILL (and "killed") if it does not end within ``timeout``."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
        return "killed"


def vtcon_fb_bound() -> bool | None:
    """bind of the fbcon vtconsole; None when no framebuffer console exists (no framebuffer at all)."""
    for con in sorted(Path("/sys/class/vtconsole").iterdir()):
        if "frame buffer" in (con / "name").read_text():
            return (con / "bind").read_text().strip() == "1"
    return None


def module_loaded(name: str) -> bool:
    return any(line.split()[0] == name for line in Path("/proc/modules").read_text().splitlines())


def card_holders() -> list[tuple[int, str]]:
    """(pid, comm) of every process with /dev/dri/card0 open."""
    holders = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") == "/dev/dri/card0":
                    comm = Path(f"/proc/{entry}/comm").read_text().strip()
                    holders.append((int(entry), comm))
                    break
            except OSError:
                continue
    return holders


def xorg_holds_card() -> bool:
    return any(comm == "Xorg" for _, comm in card_holders())


def hugepages() -> tuple[int, int]:
    base = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")
    return int((base / "nr_hugepages").read_text()), int((base / "free_hugepages").read_text())


def host_state() -> dict:
    nr, free = hugepages()
    return {
        "gpu_driver": gpu_driver(),
        "fbcon_bound": vtcon_fb_bound(),
        "bochs_loaded": module_loaded("bochs"),
        "vfio_group_node": Path(f"/dev/vfio/{GROUP}").exists(),
        "card_holders": [comm for _, comm in card_holders()],
        "xorg_holds_card": xorg_holds_card(),
        "hugepages_total": nr,
        "hugepages_free": free,
        "journal_open": JOURNAL.exists(),
        "vfio_modules": sorted(m for m in ("vfio", "vfio_pci", "vfio_pci_core", "vfio_iommu_type1")
                               if module_loaded(m)),
    }


def show(state: dict) -> str:
    """One line a person can read: what the real kernel and processes say right now."""
    fbcon = {True: "bound", False: "unbound", None: "gone (no framebuffer)"}[state["fbcon_bound"]]
    holders = ", ".join(state["card_holders"]) or "nobody"
    return (f"GPU {GPU} on {state['gpu_driver'] or 'no driver'}; bochs module "
            f"{'loaded' if state['bochs_loaded'] else 'unloaded'}; fbcon {fbcon}; /dev/dri/card0 held by {holders}; "
            f"/dev/vfio/{GROUP} {'present' if state['vfio_group_node'] else 'absent'}; hugepages "
            f"{state['hugepages_total'] - state['hugepages_free']}/{state['hugepages_total']} in use; "
            f"journal {'open' if state['journal_open'] else 'closed'}; "
            f"vfio modules: {', '.join(state['vfio_modules']) or 'none'}")


# --- helpers ---------------------------------------------------------------------------------------------
def say(message: str) -> None:
    print(f"[lab] {message}", flush=True)


def run(argv: list[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def wait_for(condition, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"gave up after {timeout:g} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def journal_steps(journal: Path = JOURNAL) -> list[dict]:
    """The journal's records (read while the VM runs: it is removed once everything is back)."""
    if not journal.exists():
        return []
    return [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]


def print_steps(records: list[dict]) -> list[dict]:
    intents = {r["step"]: r for r in records if r.get("type") == "intent"}
    steps = []
    for r in records:
        if r.get("type") == "done":
            action = intents[r["step"]]["action"]
            steps.append({"kind": action["kind"], "ms": r["ms"], "action": action})
            say(f"    {r['ms']:8.1f} ms  {describe(action)}")
    return steps


def describe(action: dict) -> str:
    fields = ", ".join(f"{k}={v}" for k, v in action.items() if k != "kind" and v not in (None, ""))
    return f"{action['kind']} {fields}"


# --- setup ---------------------------------------------------------------------------------------------
def setup() -> dict:
    timings = {}
    start = time.monotonic()
    run(["bash", str(REPO / "tests/lab/display-service"), "start", "60"])
    timings["display_start_s"] = time.monotonic() - start
    say(f"display server up: Xorg holds /dev/dri/card0 ({timings['display_start_s']:.1f} s)")
    # The runner mounts these as empty tmpfs (mode 755) so nothing of this machine leaks in; janus-hooks
    # rightly refuses state directories others can read.
    for private in ("/var/lib/janus-hooks", "/var/log/janus-hooks"):
        if Path(private).is_dir():
            os.chmod(private, 0o700)
    start = time.monotonic()
    run([str(VENV_BIN / "janus-hooks"), "install", "--yes"])
    Path("/etc/janus-hooks/janus.toml").write_text(CONFIG)
    timings["install_s"] = time.monotonic() - start
    say(f"janus-hooks install: hook at {HOOK} ({timings['install_s']:.1f} s)")
    start = time.monotonic()
    run(["bash", str(REPO / "tests/lab/libvirt-up"), "90"], timeout=200)
    timings["libvirtd_s"] = time.monotonic() - start
    say(f"libvirtd up ({timings['libvirtd_s']:.1f} s)")
    return timings


def connect():
    import libvirt

    libvirt.registerErrorHandler(lambda *_: None, None)
    return libvirt.open("qemu:///system")


def nested_qemu_has_gpu(dom) -> bool:
    import libvirt_qemu

    reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, '{"execute":"query-pci"}', 0))
    for bus in reply["return"]:
        for dev in bus["devices"]:
            if dev["id"]["vendor"] == 0x1234 and dev["id"]["device"] == 0x1111:
                return True
    return False


# --- scenarios -------------------------------------------------------------------------------------------
def janus_json(*args: str) -> tuple[int, dict]:
    proc = run([str(VENV_BIN / "janus-hooks"), *args, "--json"], check=False, timeout=120)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}


def scenario_cli(conn) -> dict:
    """What the CLI says about this real host: check, devices and the plan for the VM, read-only."""
    result: dict = {}
    result["check_status"], check = janus_json("check")
    result["check_gpu"] = next((g for g in check.get("gpus", []) if g["address"] == GPU), None)
    result["check_failed"] = [c["name"] for c in check.get("checks", []) if c["status"] == "fail"]
    result["devices_status"], devices = janus_json("devices")
    result["devices_gpu"] = next((g for g in devices.get("gpus", []) if g["address"] == GPU), None)
    dom = conn.defineXML(DOMAIN)
    try:
        result["plan_status"], plan = janus_json("plan", VM)
    finally:
        dom.undefine()
    result["plan_kinds"] = [a["kind"] for a in plan.get("actions", [])]
    result["plan_refusal"] = plan.get("refusal")
    gpu = result["check_gpu"] or {}
    say(f"janus-hooks check: exit {result['check_status']}; {GPU}: {gpu.get('summary')}")
    say(f"janus-hooks plan {VM}: {len(result['plan_kinds'])} change(s): {', '.join(result['plan_kinds'])}")
    return result


def scenario_switch(conn) -> dict:
    """Start the managed VM through libvirt as virt-manager would, check, destroy, check."""
    result: dict = {"before": host_state()}
    say(f"before: {show(result['before'])}")
    dom = conn.defineXML(DOMAIN)
    try:
        say(f"virsh start {VM} ...")
        t0 = time.time()
        dom.create()
        t_started = time.time()
        records = journal_steps()
        binds = [r for r in records if r.get("type") == "intent" and r["action"]["kind"] == "bind-vfio"]
        done_ms = {r["step"]: r["ms"] for r in records if r.get("type") == "done"}
        t_bound = binds[-1]["time"] + done_ms[binds[-1]["step"]] / 1000 if binds else None
        result["start_to_vfio_s"] = (t_bound - t0) if t_bound else None
        result["start_to_running_s"] = t_started - t0
        say(f"VM running after {result['start_to_running_s']:.2f} s; the GPU was on vfio-pci "
            f"{result['start_to_vfio_s']:.2f} s after the start was requested. janus-hooks did:")
        result["steps"] = print_steps(records)
        result["during"] = host_state()
        result["nested_qemu_has_gpu"] = nested_qemu_has_gpu(dom)
        result["qemu_uses_hugepages"] = result["during"]["hugepages_free"] < result["during"]["hugepages_total"]
        say(f"during: {show(result['during'])}")
        say(f"nested QEMU (query-pci) has the GPU 1234:1111: {result['nested_qemu_has_gpu']}")
        say(f"virsh destroy {VM} ...")
        t0 = time.time()
        dom.destroy()
        t_destroyed = time.time()
        result["destroy_to_xorg_s"] = (t_destroyed - t0) + wait_for(xorg_holds_card, 30, "Xorg holding the GPU")
        say(f"display server holds the GPU again {result['destroy_to_xorg_s']:.2f} s after the destroy; "
            "janus-hooks did (newest change first):")
        log = Path("/var/log/janus-hooks/hook.log")
        undo = [line.split(": ", 1)[1] for line in log.read_text().splitlines() if ": reverted " in line]
        for line in undo:
            say(f"    undo {line.split(': reverted ', 1)[1]}")
        result["undo"] = undo
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    result["after"] = host_state()
    say(f"after: {show(result['after'])}")
    return result


def scenario_refuse(conn) -> dict:
    """A process janus-hooks may not stop keeps the card open: the start is refused, the desktop stays."""
    result: dict = {}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; f = open('/dev/dri/card0', 'rb'); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: holder.pid in [p for p, _ in card_holders()], 20, "the holder opening the card")
    result["holder_pid"] = holder.pid
    dom = conn.defineXML(DOMAIN)
    try:
        import libvirt

        say(f"pid {holder.pid} (python3) holds /dev/dri/card0; virsh start {VM} ...")
        t0 = time.monotonic()
        try:
            dom.create()
            result["error"] = None
        except libvirt.libvirtError as err:
            result["error"] = str(err)
        result["refused_after_s"] = time.monotonic() - t0
        say(f"libvirt said: {result['error']}")
        # The desktop comes back on its own: Xorg was stopped, then started again by the rollback.
        result["xorg_back_s"] = wait_for(xorg_holds_card, 30, "Xorg holding the GPU again")
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
        holder.stdin.close()
        holder.wait(timeout=10)
    result["after"] = host_state()
    say(f"after: {show(result['after'])}")
    return result


def scenario_crash(kill_at: str) -> dict:
    """kill -9 of the hook in the middle of the switch (once the journal has an intent of ``kill_at``),
    then `janus-hooks rollback`."""
    result: dict = {}
    proc = subprocess.Popen([str(HOOK), VM, "prepare", "begin", "-"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc.stdin.write(DOMAIN)
    proc.stdin.close()
    killed_at = None
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        kinds = [r["action"]["kind"] for r in journal_steps() if r.get("type") == "intent"]
        if kill_at in kinds:
            proc.send_signal(signal.SIGKILL)
            killed_at = kinds[-1]
            break
        time.sleep(0.01)
    proc.wait(timeout=30)
    result["killed_at"] = killed_at
    result["hook_status"] = proc.returncode
    result["crashed"] = host_state()
    say(f"hook killed (-9) at step {killed_at!r}: {show(result['crashed'])}")
    t0 = time.monotonic()
    rollback = run([str(VENV_BIN / "janus-hooks"), "rollback", VM], check=False, timeout=120)
    result["rollback_status"] = rollback.returncode
    result["rollback_output"] = (rollback.stdout + rollback.stderr).strip().splitlines()[-5:]
    result["xorg_back_s"] = (time.monotonic() - t0) + wait_for(xorg_holds_card, 30, "Xorg holding the GPU")
    result["after"] = host_state()
    say(f"janus-hooks rollback -> exit {rollback.returncode}; after: {show(result['after'])}")
    return result


def scenario_bench(runs: int) -> dict:
    """The switch both ways, timed from real timestamps: janus-hooks' hook (the installed shim, as libvirt
    runs it) against the guides' script with fixed sleeps, alternating, in the same lab."""
    guide = REPO / "bench" / "guide-switch.sh"
    times: dict[str, list[float]] = {"janus_start": [], "janus_stop": [], "guide_start": [], "guide_stop": []}

    def janus(op: str, sub: str) -> None:
        proc = subprocess.run([str(HOOK), VM, op, sub, "-"], input=DOMAIN_NO_HUGEPAGES, capture_output=True,
                              text=True, timeout=120)
        if proc.returncode != 0:
            raise SystemExit(f"janus-hooks {op} {sub} failed: {proc.stderr.strip()}")

    def timed(name: str, action, done) -> None:
        t0 = time.monotonic()
        action()
        wait_for(done, 60, name)
        times[name].append(time.monotonic() - t0)

    on_vfio = lambda: gpu_driver() == "vfio-pci"  # noqa: E731
    for _ in range(runs):
        timed("janus_start", lambda: janus("prepare", "begin"), on_vfio)
        timed("janus_stop", lambda: janus("release", "end"), xorg_holds_card)
        timed("guide_start", lambda: run(["bash", str(guide), "start"]), on_vfio)
        timed("guide_stop", lambda: run(["bash", str(guide), "stop"]), xorg_holds_card)
        last = {k: v[-1] for k, v in times.items()}
        say(f"janus start {last['janus_start']:.2f} s stop {last['janus_stop']:.2f} s | "
            f"guide start {last['guide_start']:.2f} s stop {last['guide_stop']:.2f} s")
    return times


def save(name: str, data: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(data, indent=1, sort_keys=True))
    # The hook's own log, for a person reading a failed run (the assertions never use it).
    log = Path("/var/log/janus-hooks/hook.log")
    if log.exists():
        (OUT / "hook.log").write_text(log.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=["demo", "all", "bench"])
    parser.add_argument("--runs", type=int, default=3, help="bench: switches per side")
    args = parser.parse_args()
    if "lab.timeout=" not in Path("/proc/cmdline").read_text():
        print("scenario.py: runs inside the real-kernel lab only (tests/lab/run -- ...)", file=sys.stderr)
        return 2
    results: dict = {"setup": setup()}
    if args.scenario == "bench":
        results["bench"] = scenario_bench(args.runs)
        save("bench", results)
        return 0
    conn = connect()
    results["switch"] = scenario_switch(conn)
    save(args.scenario, results)
    if args.scenario == "all":
        results["cli"] = scenario_cli(conn)
        results["refuse"] = scenario_refuse(conn)
        save(args.scenario, results)
        # Before the host driver goes (fbcon unbound, driver still loaded), and after (GPU unbound).
        for kill_at in ("unload-module", "bind-vfio"):
            results[f"crash-{kill_at}"] = scenario_crash(kill_at)
            save(args.scenario, results)
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
