"""Write-ahead journal: one JSON-lines file per VM, each intent fsynced before the change it describes.

Records: ``begin`` (vm, boot id, devices), ``intent`` (step, action, captured old state) written *before*
a change, ``done`` after it was verified, ``reverted`` after its inverse ran. A journal file exists exactly
while a VM's changes are (or may be) on the host; it is removed once everything was reverted.
A host-wide lock serialises every transition.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from janus_hooks.actions import Action, action_from_json
from janus_hooks.errors import JournalError, LockBusy
from janus_hooks.files import check_trusted, ensure_private_dir, fsync_dir
from janus_hooks.layout import vm_filename, vm_from_filename

log = logging.getLogger(__name__)

SUFFIX = ".jsonl"


@dataclass
class Step:
    index: int
    action: Action
    old: dict[str, Any]
    started: float
    done: bool = False
    reverted: bool = False
    duration_ms: float | None = None


@dataclass
class JournalState:
    """A journal file read back: what was changed, in order."""

    vm: str
    boot_id: str
    started: float
    devices: tuple[str, ...]
    steps: list[Step] = field(default_factory=list)
    complete: bool = False  # every step of the plan was applied and verified

    @property
    def open_steps(self) -> list[Step]:
        return [s for s in self.steps if not s.reverted]


class JournalStore:
    """The journal directory below the state dir (0700, root-owned, refused otherwise)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.dir = state_dir / "journal"

    def prepare(self) -> None:
        ensure_private_dir(self.state_dir)
        ensure_private_dir(self.dir)

    def path(self, vm: str) -> Path:
        return self.dir / f"{vm_filename(vm)}{SUFFIX}"

    def exists(self, vm: str) -> bool:
        return self.path(vm).exists()

    def vms(self) -> list[str]:
        try:
            names = os.listdir(self.dir)
        except OSError:
            return []
        return sorted(vm_from_filename(n[: -len(SUFFIX)]) for n in names if n.endswith(SUFFIX))

    @contextmanager
    def lock(self, timeout: float, clock: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep) -> Iterator[None]:
        """Hold the host-wide transition lock; give up after ``timeout`` seconds naming the lock file."""
        ensure_private_dir(self.state_dir)
        path = self.state_dir / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            deadline = clock() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as err:
                    if err.errno not in (errno.EAGAIN, errno.EACCES):
                        raise JournalError(f"cannot lock {path}: {err.strerror}") from err
                    if clock() >= deadline:
                        raise LockBusy(
                            f"another janus-hooks transition holds {path} for more than {timeout:g} s"
                        ) from err
                    sleep(0.02)
            yield
        finally:
            os.close(fd)

    def open_writer(self, vm: str, boot_id: str, devices: tuple[str, ...]) -> JournalWriter:
        self.prepare()
        path = self.path(vm)
        if path.exists():
            raise JournalError(f"{path} already exists: VM {vm!r} has changes that were not reverted")
        writer = JournalWriter(path, create=True)
        writer.append({"type": "begin", "vm": vm, "boot_id": boot_id, "devices": list(devices),
                       "time": time.time(), "pid": os.getpid()})
        fsync_dir(self.dir)
        return writer

    def append_writer(self, vm: str) -> JournalWriter:
        return JournalWriter(self.path(vm), create=False)

    def read(self, vm: str) -> JournalState | None:
        path = self.path(vm)
        if not path.exists():
            return None
        check_trusted(self.dir)
        check_trusted(path)
        return parse_journal(path)

    def remove(self, vm: str) -> None:
        path = self.path(vm)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.dir)

    def notes_path(self, vm: str) -> Path:
        return self.state_dir / "notes" / f"{vm_filename(vm)}.txt"

    def save_notes(self, vm: str, notes: list[str]) -> None:
        """Keep what the last release of ``vm`` warned about (for ``status``); no notes removes the file."""
        path = self.notes_path(vm)
        if not notes:
            if path.exists():
                path.unlink()
            return
        ensure_private_dir(path.parent)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, "".join(f"{n}\n" for n in notes).encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def noted_vms(self) -> list[str]:
        try:
            names = os.listdir(self.state_dir / "notes")
        except OSError:
            return []
        return sorted(vm_from_filename(n[: -len(".txt")]) for n in names if n.endswith(".txt"))

    def notes(self, vm: str) -> list[str]:
        try:
            return self.notes_path(vm).read_text().splitlines()
        except OSError:
            return []

    def open_steps(self, except_vm: str | None, boot_id: str) -> list[tuple[str, Step]]:
        """Steps not yet reverted in the other journals of this boot (a journal from before a reboot
        holds nothing any more: its non-persistent changes went with the reboot)."""
        found = []
        for vm in self.vms():
            if vm == except_vm:
                continue
            state = self.read(vm)
            if state is not None and state.boot_id == boot_id:
                found += [(vm, step) for step in state.open_steps]
        return found

    def cpu_claims(self, boot_id: str, except_vm: str | None = None) -> dict[str, frozenset[int]]:
        """Host cores that running VMs' open journals keep for them: {vm: cores}."""
        claimed: dict[str, frozenset[int]] = {}
        for vm, step in self.open_steps(except_vm, boot_id):
            cores = step.action.held_cpus()
            if cores:
                claimed[vm] = claimed.get(vm, frozenset()) | cores
        return claimed

    def claims(self, except_vm: str | None = None) -> dict[str, str]:
        """PCI addresses that other VMs' open journals hold: {address: vm}."""
        claimed = {}
        for vm in self.vms():
            if vm == except_vm:
                continue
            state = self.read(vm)
            if state is not None:
                for address in state.devices:
                    claimed[address] = vm
        return claimed


class JournalWriter:
    """Appends records, each as one write() of one line.

    What recovery depends on is made durable before anything else happens: ``begin`` and ``intent``
    (before the change) and ``reverted`` (a hugepage give-back must not run twice). ``done`` and
    ``complete`` only speed recovery up; the next synced record carries them to disk.
    """

    def __init__(self, path: Path, create: bool) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
        try:
            self._fd = os.open(path, flags, 0o600)
        except OSError as err:
            raise JournalError(f"cannot open journal {path}: {err.strerror}") from err
        self.path = path

    def append(self, record: dict[str, Any], durable: bool = True) -> None:
        line = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
        try:
            os.write(self._fd, line.encode())
            if durable:
                # Data and size are what a reader needs; the inode's times are not.
                os.fdatasync(self._fd)
        except OSError as err:
            raise JournalError(f"cannot append to journal {self.path}: {err.strerror}") from err

    def intent(self, step: int, action: Action, old: dict[str, Any]) -> None:
        self.append({"type": "intent", "step": step, "action": action.to_json(), "old": old, "time": time.time()})

    def done(self, step: int, duration_ms: float, result: dict[str, Any] | None = None) -> None:
        record: dict[str, Any] = {"type": "done", "step": step, "ms": round(duration_ms, 3)}
        if result:
            record["result"] = result
        self.append(record, durable=False)

    def reverted(self, step: int) -> None:
        self.append({"type": "reverted", "step": step})

    def complete(self) -> None:
        self.append({"type": "complete"}, durable=False)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> JournalWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_journal(path: Path) -> JournalState:
    """Read a journal; a torn last line (a crash mid-append) is ignored, a torn line elsewhere is an error."""
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as err:
        raise JournalError(f"cannot read journal {path}: {err.strerror}") from err
    records = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw))
        except ValueError as err:
            if number >= len(lines) - 1:  # the last line (the split leaves "" after a final newline)
                log.warning("journal %s: ignoring torn last record", path)
                break
            raise JournalError(f"journal {path} line {number} is corrupt") from err
    if not records or records[0].get("type") != "begin":
        raise JournalError(f"journal {path} has no begin record")
    head = records[0]
    state = JournalState(head["vm"], head["boot_id"], head["time"], tuple(head.get("devices", ())))
    by_index: dict[int, Step] = {}
    for record in records[1:]:
        kind = record.get("type")
        if kind == "intent":
            step = Step(record["step"], action_from_json(record["action"]), record["old"], record["time"])
            by_index[step.index] = step
            state.steps.append(step)
        elif kind in ("done", "reverted") and record.get("step") in by_index:
            step = by_index[record["step"]]
            if kind == "done":
                step.done, step.duration_ms = True, record.get("ms")
                step.old = {**step.old, **record.get("result", {})}
            else:
                step.reverted = True
        elif kind == "complete":
            state.complete = True
    return state
