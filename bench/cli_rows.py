"""Row 4: ``janus-hooks check`` and ``janus-hooks devices`` on a fake host tree with 200 PCI devices.

Baseline: ``janus-hooks --help`` run the same way (the console script of the venv, full interpreter start,
click imported, nothing read from the host): the ratio is what reading and judging the host adds to the
CLI's fixed cost. The interpreter floor is measured alongside and shown in the note.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from bench.common import FLOOR_ARGV, HOOK_ENV, REPO, SPAWN_TIMEOUT, timed_spawn
from bench.stats import BenchError, Row, interleave, median, ratio_row

GROUP = "cli"
CLI = REPO / ".venv/bin/janus-hooks"
DEVICES = 200


class NotAvailable(Exception):
    """The CLI has not landed yet: a documented, expected absence, not a failure."""


def available() -> None:
    """The CLI counts as landed once janus_hooks/cli/__init__.py is committed and the console script exists."""
    try:
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "janus_hooks/cli/__init__.py"],  # noqa: S603,S607
                                 cwd=REPO, capture_output=True, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        tracked = (REPO / "janus_hooks/cli/__init__.py").exists()
    if not tracked or not CLI.exists():
        raise NotAvailable("not measured (CLI not available: janus_hooks/cli/__init__.py has not landed)")


def build_host(root: Path) -> Path:
    """A desktop with the single NVIDIA GPU of tests/fake/hosts.py plus storage, network, USB and bridges
    up to 200 PCI functions, most in their own IOMMU group, as a big workstation shows them."""
    from tests.fake import hosts
    from tests.fake.builder import HostBuilder
    from tests.fake.world import load_world

    hosts.single_nvidia(root)
    b = HostBuilder(root, world=load_world(root))
    for module, driver in (("nvme", "nvme"), ("igb", "igb"), ("ahci", "ahci"), ("i2c_i801", "i801_smbus")):
        b.module(module, drivers=(driver,))
    kinds = (
        ("0x144d", "0xa80a", "0x010802", "nvme"),  # NVMe SSD
        ("0x8086", "0x1533", "0x020000", "igb"),  # Ethernet
        ("0x1022", "0x43ee", "0x0c0330", "xhci_hcd"),  # USB 3 controller
        ("0x1022", "0x43eb", "0x010601", "ahci"),  # SATA
        ("0x1022", "0x43e9", "0x060400", "pcieport"),  # PCIe bridge / switch port
        ("0x1022", "0x790b", "0x0c0500", "i801_smbus"),  # SMBus
        ("0x1022", "0x14da", "0x060000", None),  # host bridge, no driver
    )
    existing = len(list((root / "sys/bus/pci/devices").iterdir()))
    for i in range(DEVICES - existing):
        vendor, device, pci_class, driver = kinds[i % len(kinds)]
        bus, slot = 0x10 + i // 8, i % 8
        # Functions behind one switch share a group now and then, as poor ACS topologies do.
        group = 100 + (i // 2 if i % 7 == 0 else i)
        b.pci(f"0000:{bus:02x}:{slot:02x}.0", vendor, device, pci_class, driver, group, numa=0)
    b.build()
    count = len(list((root / "sys/bus/pci/devices").iterdir()))
    if count != DEVICES:
        raise BenchError(f"the fake host has {count} PCI devices, not {DEVICES}")
    return root


def _root_args(root: Path) -> tuple[list[str], list[str]]:
    """Where ``--root`` goes: after the subcommand if it takes it, before it if the group does."""
    def helps(argv: list[str]) -> str:
        proc = subprocess.run([str(CLI), *argv, "--help"], capture_output=True, timeout=SPAWN_TIMEOUT,  # noqa: S603
                              env=_env(root), check=False)
        return proc.stdout.decode(errors="replace")

    if "--root" in helps(["check"]):
        return [], ["--root", str(root)]
    if "--root" in helps([]):
        return ["--root", str(root)], []
    return [], []  # JANUS_HOOKS_ROOT in the environment is the remaining way


def _env(root: Path) -> dict[str, str]:
    return {**HOOK_ENV, "JANUS_HOOKS_ROOT": str(root), "TERM": "dumb"}


def measure(scratch: Path, runs: int, warmup: int) -> list[Row]:
    available()
    root = build_host(scratch / "cli-host")
    before, after = _root_args(root)
    env = _env(root)
    statuses: dict[str, set[int]] = {"check": set(), "devices": set()}

    def cli(command: str | None):
        argv = [str(CLI), *before, command, *after] if command else [str(CLI), "--help"]

        def run() -> float:
            start = time.perf_counter()
            try:
                proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,  # noqa: S603
                                      timeout=SPAWN_TIMEOUT, check=False)
            except subprocess.TimeoutExpired as err:
                raise BenchError(f"{' '.join(argv)} did not finish within {SPAWN_TIMEOUT:g} s") from err
            seconds = time.perf_counter() - start
            err = proc.stderr.decode(errors="replace")
            if "Traceback" in err or proc.returncode == 2 or proc.returncode < 0:
                last = err.strip().splitlines()
                raise BenchError(f"{' '.join(argv)} failed (exit {proc.returncode}): {last[-1] if last else ''}")
            if command:
                statuses[command].add(proc.returncode)
            return seconds
        return run

    samples = interleave({"check": cli("check"), "devices": cli("devices"), "help": cli(None),
                          "floor": lambda: timed_spawn(FLOOR_ARGV)}, runs, warmup)
    verdict = subprocess.run([str(CLI), *before, "check", *after], capture_output=True, env=env,  # noqa: S603
                             timeout=SPAWN_TIMEOUT, check=False).stdout.decode(errors="replace").strip().splitlines()
    how = (f"fake host tree with {DEVICES} PCI devices, root passed as "
           f"{'--root' if before or after else 'JANUS_HOOKS_ROOT'}; "
           f"interpreter floor {median(samples['floor']) * 1000:.1f} ms")
    rows = []
    for command in ("check", "devices"):
        rows.append(ratio_row(GROUP, f"cli: janus-hooks {command} (200 PCI devices) vs --help", samples[command],
                              samples["help"], baseline_label="janus-hooks --help (console script start + click)",
                              note=f"{how}; exit status {sorted(statuses[command])}"
                                   + (f"; its verdict on the tree: {verdict[-1]!r}" if command == "check" and verdict
                                      else "")))
    return rows
