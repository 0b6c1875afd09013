"""Run a command inside the real-kernel lab: a Linux VM under QEMU (TCG) with an emulated IOMMU and a
bochs VGA GPU driven by bochs-drm with fbcon, whose root is this machine's root filesystem (shared
read-only over 9p, writable through overlayfs on tmpfs).

The command runs as root in a chroot of that root, with the repository as its working directory (the
same path as here). Files it writes to ``$LAB_OUT`` (``/lab-out``, also mounted at the run's results
directory path) land in a fresh directory under ``build/lab/runs/`` on this machine.

Standard library only, so it runs before the project's virtualenv exists::

    from tests.lab.lab import run_in_lab          # or put tests/lab on sys.path
    rc, output, out_dir = run_in_lab(["bash", "tests/lab/smoke.sh"], timeout=120)

``tests/lab/run`` is the command-line front end.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent
TOP = HERE.parent.parent
BUILD = TOP / "build" / "lab"
CACHE = BUILD / "cache"

BEGIN = "@@janus-lab: begin@@"
END_RE = re.compile(r"@@janus-lab: end rc=(\d+)@@")
FAILED_RE = re.compile(r"@@janus-lab: failed: (.*)@@")
# SeaBIOS paints the serial console with terminal escapes before the kernel starts.
ESCAPES_RE = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|c)")

# Paths that start empty in the lab (tmpfs) instead of showing the machine's live state: the lab's
# libvirtd begins with no hooks and no domains of the machine that runs it.
FRESH_DEFAULT = ("/etc/libvirt/hooks", "/etc/libvirt/qemu")

# The lab mounts its own /tmp, /run, /proc, /sys and /dev: nothing of the machine's there is visible.
HIDDEN_TOPS = ("tmp", "run", "proc", "sys", "dev")
# A checkout under /tmp or /run (a CI clone, say) is shown again over the lab's own tmpfs by /init.
REEXPOSED_TOPS = ("tmp", "run")

# Exit statuses of a run that did not produce the command's own status.
RC_TIMEOUT = 124
RC_LAB_FAILED = 125
# Console silence that ends a run as stalled, for commands whose every step is bounded at 300 s or less.
STALL_AFTER = 420.0


@dataclasses.dataclass(frozen=True)
class LabResult:
    """What a lab run produced. Unpacks as ``(returncode, output, out_dir)``."""

    returncode: int
    output: str  # the command's output as seen on the lab console (kernel messages may interleave)
    out_dir: Path  # results directory: the command's $LAB_OUT, plus console.log of the whole run
    console: str  # the whole console, boot included
    boot_seconds: float | None  # from starting QEMU to starting the command
    total_seconds: float
    message: str  # one line when the lab itself failed or timed out, else ""
    stalled: bool = False  # the console fell silent for ``stall_after`` seconds while the command ran

    def __iter__(self) -> Iterator[object]:
        return iter((self.returncode, self.output, self.out_dir))


class LabError(RuntimeError):
    """The lab could not be built or started."""


def build(stream: IO[str] | None = None, timeout: float = 300) -> dict[str, str]:
    """Build (or reuse) the lab's initramfs and return build/lab/lab.env as a dict."""
    proc = subprocess.run(
        [str(HERE / "build")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    if stream is not None and proc.stdout:
        stream.write(proc.stdout)
        stream.flush()
    if proc.returncode != 0:
        raise LabError(f"tests/lab/build failed with status {proc.returncode}:\n{proc.stdout}")
    env = {}
    for line in (BUILD / "lab.env").read_text().splitlines():
        key, _, value = line.partition("=")
        env[key] = value
    return env


def new_out_dir() -> Path:
    """A fresh results directory under build/lab/runs/."""
    runs = BUILD / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.mkdtemp(prefix=f"{stamp}-", dir=runs)).resolve()


def command_script(argv: Sequence[str], cwd: Path, env: Mapping[str, str], host_out: Path) -> str:
    """The bash script /init runs in the chroot: environment, working directory, then the command."""
    lines = ["#!/bin/bash", "# Written by tests/lab/lab.py for one lab run."]
    lines.append(f"export LAB_HOST_OUT={shlex.quote(str(host_out))}")
    for key, value in env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"bad environment variable name: {key!r}")
        lines.append(f"export {key}={shlex.quote(value)}")
    lines.append(f"cd {shlex.quote(str(cwd))} || exit {RC_LAB_FAILED}")
    lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
    return "\n".join(lines) + "\n"


# The lab's flavours (see tests/lab/README.md): "runit" chroots into the root and runs the command from
# /init (busybox, runit for the display server); "desktop" boots the real systemd there, with udevd, dbus,
# logind, greetd starting weston in a logind session, PipeWire on the GPU's audio function.
FLAVOURS = ("runit", "desktop")
DESKTOP_TARGET = "janus-lab.target"

# The desktop's GPU is a real card's shape: the VGA and an HDMI-like audio function in one slot (one
# IOMMU group), plus a second GPU in its own group for passthrough of a card the host does not draw on.
RUNIT_GPU = [("-device", "VGA,addr=02.0")]
DESKTOP_GPUS = [
    ("-device", "VGA,bus=pcie.0,addr=0x2.0,multifunction=on"),
    ("-device", "ich9-intel-hda,id=gpuaudio,bus=pcie.0,addr=0x2.1"),
    ("-audiodev", "none,id=snd0"),
    ("-device", "hda-output,bus=gpuaudio.0,audiodev=snd0"),
    ("-device", "secondary-vga,bus=pcie.0,addr=0x6.0"),
]


def default_mem(flavour: str) -> int:
    """MiB the lab gets unless told: the desktop runs systemd, weston and PipeWire besides the scenario."""
    return 2560 if flavour == "desktop" else 1536


def qemu_argv(
    lab: Mapping[str, str],
    out_dir: Path,
    mem: int,
    inner_timeout: int,
    verbose: bool,
    flavour: str = "runit",
    smp: int = 2,
    state: Path | None = None,
    gpu_driver_by_udev: bool = False,
) -> list[str]:
    """QEMU command line: q35 with an emulated IOMMU, ``smp`` CPUs, the bochs VGA at 00:02.0 and three 9p
    shares (four with ``state``: kept between boots)."""
    append = [
        "console=ttyS0",
        "intel_iommu=on",
        "panic=-1",  # a dead /init reboots, and -no-reboot turns that into QEMU exiting
        # Under TCG on a loaded machine the kernel's check of the IO-APIC timer can miss its ticks and panic
        # ("timer doesn't work through Interrupt-remapped IO-APIC"); the emulated timer works.
        "no_timer_check",
        f"lab.timeout={inner_timeout}",
    ]
    append += ["loglevel=7"] if verbose else ["quiet"]
    if flavour == "desktop":
        # systemd.unit: only what the lab target pulls in starts, whatever the machine has enabled.
        append += [f"systemd.unit={DESKTOP_TARGET}", "lab.flavour=desktop"]
        if not verbose:
            append += ["systemd.show_status=error", "udev.log_level=err"]
        if gpu_driver_by_udev:
            append += ["lab.gpu_driver=udev"]
    options = [
        ("-M", "q35,kernel-irqchip=split"),
        ("-accel", "tcg"),  # KVM is not usable on our machines
        ("-device", "intel-iommu,intremap=on,caching-mode=on"),
        ("-m", str(mem)),
        ("-smp", str(smp)),
        ("-kernel", lab["KERNEL"]),
        ("-initrd", lab["INITRD"]),
        ("-append", " ".join(append)),
        # Fixed addresses keep the PCI layout (and so the IOMMU group numbers: the GPU is group 2)
        # the same as a machine with a NIC at 00:01.0 and the GPU at 00:02.0.
        ("-nic", "none"),
        ("-netdev", "user,id=lan,restrict=on"),
        ("-device", "e1000e,netdev=lan,addr=01.0,romfile="),  # no iPXE ROM: it only slows the boot
        ("-fsdev", "local,id=host,path=/,security_model=none,readonly=on,multidevs=remap"),
        ("-device", "virtio-9p-pci,fsdev=host,mount_tag=host,addr=03.0"),
        ("-fsdev", f"local,id=out,path={out_dir},security_model=none,multidevs=remap"),
        ("-device", "virtio-9p-pci,fsdev=out,mount_tag=out,addr=04.0"),
        # Writable and kept between runs: what is slow to compute under TCG (libvirt's QEMU probe).
        ("-fsdev", f"local,id=cache,path={CACHE},security_model=none,multidevs=remap"),
        ("-device", "virtio-9p-pci,fsdev=cache,mount_tag=cache,addr=05.0"),
    ]
    options += DESKTOP_GPUS if flavour == "desktop" else RUNIT_GPU
    if state is not None:
        # Writable and kept between boots of one scenario: what a host keeps on its disk (/etc).
        options += [("-fsdev", f"local,id=state,path={state},security_model=none,multidevs=remap"),
                    ("-device", "virtio-9p-pci,fsdev=state,mount_tag=state,addr=08.0")]
    return ["qemu-system-x86_64", "-nographic", "-no-reboot"] + [word for pair in options for word in pair]


def inner_timeout_for(timeout: float) -> int:
    """Time the command gets inside the lab: the run's budget less room to boot and power off."""
    return max(5, int(timeout - min(30, timeout / 3)))


def run_in_lab(
    argv: Sequence[str],
    timeout: float = 300,
    *,
    mem: int | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    out_dir: Path | str | None = None,
    stream: IO[str] | None = None,
    verbose: bool = False,
    fresh: Sequence[str] = FRESH_DEFAULT,
    flavour: str = "runit",
    smp: int = 2,
    state: Path | str | None = None,
    persistent: Sequence[str] = (),
    gpu_driver_by_udev: bool = False,
    stall_after: float | None = None,
) -> LabResult:
    """Boot the lab, run ``argv`` in it and return its exit status, output and results directory.

    ``timeout`` bounds the whole run (build, boot, command, power-off). ``stream`` receives the console
    as it arrives. ``fresh`` lists absolute paths that start as empty directories (tmpfs) in the lab.
    ``flavour`` "desktop" boots systemd with a graphical session and starts the command once the desktop
    is up (tests/lab/README.md). ``smp``: the lab's CPUs (each is a thread of the machine's QEMU under TCG).
    ``state``: a directory of this machine kept between boots; each absolute path in ``persistent`` is
    ``state/<path>`` in the lab (empty the first time), so what one boot writes there the next one sees.
    ``gpu_driver_by_udev`` (desktop): /init does not load the GPU driver; the desktop's udevd loads it at
    coldplug, after the rules in /etc/udev/rules.d, as on a host whose initramfs has no GPU driver.
    ``stall_after``: once the command runs, a console silent for that long ends the run as ``stalled``
    (status 124), for commands whose every step is bounded well below it and says what it does.
    A timeout gives status 124, a lab that failed to boot (or whose desktop
    did not come up) 125; ``message`` says which.
    """
    if not argv:
        raise ValueError("run_in_lab needs a command")
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown lab flavour {flavour!r} (one of {', '.join(FLAVOURS)})")
    if gpu_driver_by_udev and flavour != "desktop":
        raise ValueError("gpu_driver_by_udev needs the desktop flavour (the runit flavour has no udevd)")
    if persistent and state is None:
        raise ValueError("persistent paths need a state directory")
    if mem is None:
        mem = default_mem(flavour)
    started = time.monotonic()
    deadline = started + timeout
    lab = build(stream, timeout=max(1.0, timeout))
    out = Path(out_dir).resolve() if out_dir is not None else new_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    meta = out / ".lab"
    meta.mkdir(exist_ok=True)
    for stale in ("status", "failed", "desktop-ready"):
        (meta / stale).unlink(missing_ok=True)
    workdir = Path(cwd).resolve() if cwd is not None else TOP
    visible = []
    for path in (TOP, workdir, out):
        if path.parts[1:2] and path.parts[1] in HIDDEN_TOPS:
            if path.parts[1] not in REEXPOSED_TOPS:
                raise LabError(f"{path} is hidden inside the lab (its /{path.parts[1]} is its own); move it elsewhere")
            if not any(path == v or v in path.parents for v in visible):
                visible.append(path)
    (meta / "visible").write_text("".join(f"{p}\n" for p in visible))
    (meta / "cmd.sh").write_text(command_script(argv, workdir, env or {}, out))
    (meta / "hostpath").write_text(f"{out}\n")
    for path in fresh:
        if not path.startswith("/") or "\n" in path:
            raise ValueError(f"fresh paths must be absolute: {path!r}")
    (meta / "fresh").write_text("".join(f"{p}\n" for p in fresh))
    for path in persistent:
        if not path.startswith("/") or "\n" in path or ".." in path.split("/"):
            raise ValueError(f"persistent paths must be absolute: {path!r}")
    (meta / "persistent").write_text("".join(f"{p}\n" for p in persistent))
    state_dir = Path(state).resolve() if state is not None else None
    if state_dir is not None:
        for path in persistent:
            (state_dir / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
    (meta / "flavour").write_text(f"{flavour}\n")
    # /init runs it in the new root before handing over to systemd: its own path, since the repository
    # may live anywhere (tests/lab/desktop-setup writes the units that run the command from there).
    (meta / "desktop-setup").write_text(f"{HERE / 'desktop-setup'}\n")
    remaining = deadline - time.monotonic()
    inner = inner_timeout_for(remaining)
    if stream is not None:
        stream.write(f"lab: results in {out}\n")
        stream.flush()

    console: list[str] = []
    last_line_at = [time.monotonic()]
    begun = threading.Event()
    boot_at: list[float] = []
    log = (out / "console.log").open("w", encoding="utf-8")
    proc = subprocess.Popen(
        qemu_argv(lab, out, mem, inner, verbose, flavour, smp, state_dir, gpu_driver_by_udev),
        stdin=subprocess.DEVNULL,  # QEMU would put a terminal on stdin into raw mode
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )

    def pump() -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "")
            if not begun.is_set():
                line = ESCAPES_RE.sub("", line)
                if BEGIN in line:
                    boot_at.append(time.monotonic() - launched)
                    begun.set()
            console.append(line)
            last_line_at[0] = time.monotonic()
            log.write(line)
            if stream is not None:
                stream.write(line)
                stream.flush()

    launched = time.monotonic()
    reader = threading.Thread(target=pump, name="lab-console", daemon=True)
    reader.start()
    timed_out = stalled = False
    try:
        while proc.poll() is None:
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if stall_after is not None and begun.is_set() and now - last_line_at[0] > stall_after:
                stalled = True
                break
            try:
                proc.wait(timeout=min(5.0, max(0.1, deadline - now)))
            except subprocess.TimeoutExpired:
                pass
    finally:
        # Also on KeyboardInterrupt: never leave a lab running behind the caller.
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        reader.join(timeout=10)
        log.close()
    total = time.monotonic() - started

    text = "".join(console)
    output = ""
    begin_at = text.find(BEGIN)
    if begin_at >= 0:
        body = text[begin_at + len(BEGIN) :].lstrip("\n")
        end = END_RE.search(body)
        output = body[: end.start()] if end else body

    message = ""
    status_file = meta / "status"
    end = END_RE.search(text)
    failed = FAILED_RE.search(text)
    if status_file.exists() and status_file.read_text().strip().isdigit():
        rc = int(status_file.read_text().strip())
    elif end:
        rc = int(end.group(1))
    elif stalled:
        rc = RC_TIMEOUT
        last = next((line.strip() for line in reversed(console) if line.strip()), "")
        message = (f"lab: stalled, no console output for {stall_after:.0f} s after {last[:160]!r}; console in "
                   f"{out}/console.log")
    elif timed_out:
        rc = RC_TIMEOUT
        phase = "the command was still running" if begun.is_set() else "the lab had not finished booting"
        message = f"lab: timed out after {timeout:.0f} s ({phase}); console in {out}/console.log"
    else:
        rc = RC_LAB_FAILED
        why = failed.group(1) if failed else f"QEMU exited with status {proc.returncode} before the command ran"
        message = f"lab: boot failed: {why}; console in {out}/console.log (--verbose shows the kernel log)"
    if not message and rc == RC_TIMEOUT and "timeout: sending signal" in output:
        message = f"lab: the command timed out after {inner} s inside the lab"
    boot = boot_at[0] if boot_at else None
    return LabResult(rc, output, out, text, boot, total, message, stalled)


def run_in_lab_again_if_stalled(argv: Sequence[str], timeout: float, stall_after: float, **options) -> LabResult:
    """``run_in_lab``, booted once more when the first run stalled. Under TCG a lab was seen silent for
    twenty minutes inside a step its command bounds at five, its own timeout silent too (cause not found;
    the same run passed before and after). A second stall is the result; the first is reported as a
    warning, never hidden."""
    result = run_in_lab(argv, timeout, stall_after=stall_after, **options)
    if result.stalled:
        warnings.warn(f"{result.message}; booting the lab once more", stacklevel=2)
        result = run_in_lab(argv, timeout, stall_after=stall_after, **options)
    return result


def main(args: Sequence[str] | None = None) -> int:
    """Command-line entry point of tests/lab/run."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="tests/lab/run",
        description="Run COMMAND as root inside the real-kernel lab and exit with its status.",
        usage="%(prog)s [--flavour runit|desktop] [--timeout SECONDS] [--mem MiB] [--out DIR] [--env KEY=VALUE]... "
        "[--fresh PATH]... [--state DIR [--persistent PATH]...] [--gpu-driver-by-udev] "
        "-- COMMAND [ARGS...]",
    )
    parser.add_argument("--timeout", type=float, default=300, help="bound on the whole run (default 300 s)")
    parser.add_argument("--mem", type=int, help="lab memory in MiB (default 1536, desktop 2560)")
    parser.add_argument("--smp", type=int, default=2, help="lab CPUs (default 2)")
    parser.add_argument(
        "--flavour", choices=FLAVOURS, default="runit", help="runit (default) or desktop (systemd, greetd, weston)"
    )
    parser.add_argument("--out", help="results directory (default: a fresh one under build/lab/runs/)")
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="set in the command's environment"
    )
    parser.add_argument("--cwd", help="working directory inside the lab (default: the repository)")
    parser.add_argument(
        "--fresh",
        action="append",
        metavar="PATH",
        help=f"start PATH as an empty tmpfs in the lab (repeatable; default: {' '.join(FRESH_DEFAULT)})",
    )
    parser.add_argument("--state", help="directory of this machine kept between boots (with --persistent)")
    parser.add_argument("--persistent", action="append", default=[], metavar="PATH",
                        help="PATH in the lab is STATE/PATH, kept between boots (repeatable)")
    parser.add_argument("--gpu-driver-by-udev", action="store_true",
                        help="desktop: the GPU driver is loaded by udevd at coldplug, not by /init")
    parser.add_argument("--verbose", action="store_true", help="full kernel log on the console")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    opts = parser.parse_args(args)
    command = opts.command[1:] if opts.command[:1] == ["--"] else opts.command
    if not command:
        parser.error("missing COMMAND (put it after --)")
    env = {}
    for item in opts.env:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--env needs KEY=VALUE, got {item!r}")
        env[key] = value
    try:
        result = run_in_lab(
            command,
            opts.timeout,
            mem=opts.mem,
            env=env,
            cwd=opts.cwd,
            out_dir=opts.out,
            stream=sys.stdout,
            verbose=opts.verbose,
            fresh=FRESH_DEFAULT if opts.fresh is None else opts.fresh,
            flavour=opts.flavour,
            smp=opts.smp,
            state=opts.state,
            persistent=opts.persistent,
            gpu_driver_by_udev=opts.gpu_driver_by_udev,
        )
    except (LabError, subprocess.TimeoutExpired, OSError, ValueError) as err:
        print(f"lab: cannot run the lab: {err}", file=sys.stderr)
        return RC_LAB_FAILED
    boot = f"{result.boot_seconds:.1f} s" if result.boot_seconds is not None else "n/a"
    print(
        f"lab: exit status {result.returncode}; boot {boot}, total {result.total_seconds:.1f} s; "
        f"results in {result.out_dir}",
        file=sys.stderr,
    )
    if result.message:
        print(result.message, file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
