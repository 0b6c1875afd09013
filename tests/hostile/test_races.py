"""Races between real processes on one fake host: every transition plans, checks claims and applies under
one hold of the host-wide lock, so concurrent starts, releases and rollbacks leave a consistent host."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from janus_hooks.domain import parse_domain
from tests.conftest import FAST_TIMEOUTS, FakeHost, domain_xml
from tests.core.helpers import diff
from tests.fake import hosts
from tests.hostile import tally

REPO = Path(__file__).resolve().parents[2]
DGPU = ("0000:03:00.0", "0000:03:00.1")
RACES = 50


class Worker:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.hostile.race_child"], cwd=REPO, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def load(self, root: Path, op: str, vm: str, xml_file: Path) -> None:
        self.proc.stdin.write(f"{root} {op} {vm} {xml_file}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ready"

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self) -> tuple[int, str]:
        line = self.proc.stdout.readline().rstrip("\n")
        code, _, err = line.partition(" ")
        return int(code), err

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture
def workers() -> Iterator[tuple[Worker, Worker]]:
    pair = (Worker(), Worker())
    yield pair
    for w in pair:
        w.close()


def _race(pair: tuple[Worker, Worker], jobs: list[tuple[Path, str, str, Path]]) -> list[tuple[int, str]]:
    for worker, job in zip(pair, jobs, strict=True):
        worker.load(*job)
    for worker in pair:
        worker.go()
    results = [w.result() for w in pair]
    tally.record("races run")
    return results


def _host(tmp_path: Path, n: int) -> FakeHost:
    root = tmp_path / f"host-{n}"
    hosts.amd_dgpu_with_igpu(root)
    host = FakeHost(root)
    host.config(FAST_TIMEOUTS)
    return host


def _xml(tmp_path: Path, vm: str) -> Path:
    path = tmp_path / f"{vm}.xml"
    path.write_text(domain_xml(vm, hostdevs=DGPU, mode="passthrough"))
    return path


def _consistent(host: FakeHost, before: dict, vm: str) -> str:
    """'switched' with a complete journal and every device on vfio-pci, or 'restored' to ``before``."""
    state = host.janus().store.read(vm)
    if state is None:
        changed = diff(before, host.snapshot())
        assert not changed, f"no journal, yet the host differs at {changed[:5]}"
        return "restored"
    assert state.complete and not any(s.reverted for s in state.steps), "an open journal that is not complete"
    assert [host.driver(a) for a in DGPU] == ["vfio-pci", "vfio-pci"]
    return "switched"


def test_two_vms_claiming_one_gpu_started_together_exactly_one_wins(tmp_path, workers):
    xml_a, xml_b = _xml(tmp_path, "vm-a"), _xml(tmp_path, "vm-b")
    for n in range(RACES):
        host = _host(tmp_path, n)
        before = host.snapshot()
        results = _race(workers, [(host.root, "prepare", "vm-a", xml_a), (host.root, "prepare", "vm-b", xml_b)])
        codes = sorted(code for code, _ in results)
        assert codes == [0, 1], f"race {n}: {results}"
        winner, loser = ("vm-a", "vm-b") if results[0][0] == 0 else ("vm-b", "vm-a")
        loser_err = results[1 if winner == "vm-a" else 0][1]
        assert loser_err == (f"janus-hooks: VM {loser!r}: PCI device {DGPU[0]} is in use by VM {winner!r} "
                             "(its journal is open)"), f"race {n}"
        assert host.journal_vms() == [winner]
        assert _consistent(host, before, winner) == "switched"
        # Releasing the winner gives the card back, and the loser left nothing behind to undo.
        assert host.hook(winner, "release", "end", xml_a.read_text())[0] == 0
        assert host.hook(loser, "release", "end", xml_a.read_text())[0] == 0
        tally.check_host(before, host.snapshot())


@pytest.mark.parametrize("first, second", [("release", "prepare"), ("prepare", "rollback")])
def test_transitions_of_one_vm_racing_leave_the_host_consistent(tmp_path, workers, first, second):
    """Prepare while a release still runs, and a rollback while a prepare runs: never a half-switched host."""
    xml = _xml(tmp_path, "vm-a")
    outcomes = set()
    for n in range(10):
        host = _host(tmp_path, n)
        before = host.snapshot()
        if first == "release":
            host.janus().prepare(parse_domain(xml.read_text()))
        results = _race(workers, [(host.root, first, "vm-a", xml), (host.root, second, "vm-a", xml)])
        assert all(code == 0 for code, _ in results), f"{first}/{second} {n}: {results}"
        outcomes.add(_consistent(host, before, "vm-a"))
        assert host.hook("vm-a", "release", "end", xml.read_text())[0] == 0
        tally.check_host(before, host.snapshot())
    assert outcomes  # which interleavings occurred depends on scheduling; each one was checked above
