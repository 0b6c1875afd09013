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
from typing import TYPE_CHECKING, Any

from janus_hooks.errors import JanusError, JournalError, LockBusy
from janus_hooks.files import check_trusted, ensure_private_dir, fsync_dir
from janus_hooks.layout import is_hashed, vm_filename, vm_from_filename
from janus_hooks.schema import (
    BOOT_ID,
    PCI_ADDRESS,
    VM_NAME,
    SchemaError,
    integer,
    list_of,
    number,
    pattern,
    quote,
    record,
)

if TYPE_CHECKING:
    from janus_hooks.actions import Action

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
    pending: dict[str, Any] | None = None  # {"pid", "command"} of a kernel write still asleep past its deadline


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

    def __init__(self, state_dir: Path, listdir: Callable[[Path], list[str]] = os.listdir) -> None:
        """``listdir``: ``Host.list_dir`` for commands that say when, not being root, they could not see the
        journals."""
        self.state_dir = state_dir
        self.dir = state_dir / "journal"
        self._listdir = listdir

    def prepare(self) -> None:
        ensure_private_dir(self.state_dir)
        ensure_private_dir(self.dir)

    def path(self, vm: str) -> Path:
        return self.dir / f"{vm_filename(vm)}{SUFFIX}"

    def exists(self, vm: str) -> bool:
        return self.path(vm).exists()

    def vms(self) -> list[str]:
        try:
            names = self._listdir(self.dir)
        except OSError:
            return []
        vms = []
        for name in names:
            if not name.endswith(SUFFIX):
                continue
            stem = name[: -len(SUFFIX)]
            # A shortened name stands for a VM whose whole name is in the journal's begin record.
            vm = self._begin_vm(self.dir / name) if is_hashed(stem) else vm_from_filename(stem)
            vms.append(vm if vm is not None and vm_filename(vm) == stem else vm_from_filename(stem))
        return sorted(vms)

    @staticmethod
    def _begin_vm(path: Path) -> str | None:
        try:
            with path.open("rb") as fh:
                head = json.loads(fh.readline(65536).decode(), parse_constant=_refuse_constant)
        except (OSError, ValueError):
            return None
        vm = head.get("vm") if isinstance(head, dict) else None
        return vm if isinstance(vm, str) else None

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
        """Append to an existing journal (reverted records), its torn tail cut off first."""
        repair_tail(self.path(vm))
        return JournalWriter(self.path(vm), create=False)

    def read(self, vm: str) -> JournalState | None:
        path = self.path(vm)
        if not path.exists():
            return None
        check_trusted(self.dir)
        check_trusted(path)
        return parse_journal(path, vm)

    def read_each(self, names: list[str] | None = None) -> tuple[list[JournalState], dict[str, str]]:
        """Every journal (or those of ``names``) that can be read, and one line per VM whose cannot: a bad
        journal is reported on its own, never hiding the others."""
        states, problems = [], {}
        for vm in self.vms() if names is None else names:
            try:
                state = self.read(vm)
            except JanusError as err:
                problems[vm] = str(err)
                continue
            if state is not None:
                states.append(state)
        return states, problems

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
            try:
                state = self.read(vm)
            except JanusError as err:
                # One bad journal blocks only its own VM; what it holds is unknown here.
                log.warning("%s; its steps are not counted", err)
                continue
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

    def pending_hugepages(self, boot_id: str, except_vm: str | None,
                          running: Callable[[str], bool]) -> dict[tuple[int, int | None], int]:
        """Hugepages that other VMs' open journals (this boot) added and their QEMU has not taken yet:
        {(size kB, node): pages}. Such pages show as free, yet they are that VM's; once its QEMU runs, the
        kernel counts them as used or reserved itself. A node's pages count for the global pool too."""
        pending: dict[tuple[int, int | None], int] = {}
        by_vm: dict[str, list[Step]] = {}
        for vm, step in self.open_steps(except_vm, boot_id):
            if step.action.kind == "allocate-hugepages":
                by_vm.setdefault(vm, []).append(step)
        for vm, steps in by_vm.items():
            if running(vm):
                continue
            for step in steps:
                size, node = step.action.size_kb, step.action.node
                pages = step.old.get("added", step.action.pages)
                pending[(size, node)] = pending.get((size, node), 0) + pages
                if node is not None:
                    pending[(size, None)] = pending.get((size, None), 0) + pages
        return pending

    def claims(self, except_vm: str | None = None) -> dict[str, str]:
        """PCI addresses that other VMs' open journals hold: {address: vm}.

        A journal that cannot be read blocks only its own VM: its devices still count as claimed when its
        first record names them, and the others' starts go on either way.
        """
        claimed = {}
        for vm in self.vms():
            if vm == except_vm:
                continue
            try:
                state = self.read(vm)
                devices = state.devices if state is not None else ()
            except JanusError as err:
                devices = self.devices_of_unreadable(vm)
                log.warning("%s; counting %s as its VM's", err, ", ".join(devices) or "no device")
            for address in devices:
                claimed[address] = vm
        return claimed

    def devices_of_unreadable(self, vm: str) -> tuple[str, ...]:
        """The devices a journal's begin record names, when the rest of it cannot be used (or ())."""
        try:
            with self.path(vm).open("rb") as fh:
                head = json.loads(fh.readline(65536).decode(), parse_constant=_refuse_constant)
            return record(_BEGIN, head, set(_BEGIN))["devices"] if isinstance(head, dict) else ()
        except (OSError, ValueError):
            return ()

    def discard(self, vm: str) -> Path:
        """Move a journal aside (<state>/discarded/<name>.<time>.jsonl): the VM's changes are no longer
        tracked, the file stays for a person to read. Outside journal/, so that the units conditioned on a
        non-empty journal directory stay idle. Call with the lock held."""
        target_dir = ensure_private_dir(self.state_dir / "discarded")
        target = target_dir / f"{vm_filename(vm)}.{time.strftime('%Y%m%dT%H%M%S')}{SUFFIX}"
        os.rename(self.path(vm), target)
        fsync_dir(self.dir)
        return target


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

    def pending(self, step: int, pid: int, command: str) -> None:
        """A write of this step still sleeps in the kernel in process ``pid`` (see host/blocking.py)."""
        self.append({"type": "pending", "step": step, "pid": pid, "command": command, "time": time.time()})

    def complete(self) -> None:
        self.append({"type": "complete"}, durable=False)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> JournalWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


MAX_JOURNAL_BYTES = 4 << 20  # a plan is tens of records: anything this large was not written by janus-hooks
MAX_STEP = 100_000

_BEGIN = {"type": pattern("begin", "begin"), "vm": VM_NAME,
          "boot_id": BOOT_ID, "devices": list_of(PCI_ADDRESS), "time": number(0, 1e11),
          "pid": integer(1, 1 << 22)}
_STEP = integer(0, MAX_STEP)
_INTENT = {"type": lambda v: v, "step": _STEP, "action": lambda v: v, "old": lambda v: v, "time": number(0, 1e11)}
_DONE = {"type": lambda v: v, "step": _STEP, "ms": number(0, 1e9), "result": lambda v: v}
_REVERTED = {"type": lambda v: v, "step": _STEP}
_COMPLETE = {"type": lambda v: v}
_PENDING = {"type": lambda v: v, "step": _STEP, "pid": integer(-1, 1 << 22),
            "command": pattern(r"[^\x00-\x1f]{1,16}", "a command name (/proc/<pid>/comm)", 16),
            "time": number(0, 1e11)}


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _records(path: Path, data: bytes) -> list[tuple[int, Any]]:
    """(line number, decoded object) per complete line. Each record is one write() of a line and its
    newline, so a crash mid-append leaves a last piece without a newline: that torn record is left out."""
    lines = data.split(b"\n")
    if lines.pop().strip():
        log.warning("journal %s: ignoring a torn last record", path)
    records = []
    for line_no, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            records.append((line_no, json.loads(raw.decode(), parse_constant=_refuse_constant)))
        except ValueError as err:
            raise JournalError(f"journal {path} line {line_no} is not a JSON record") from err
    return records


def parse_journal(path: Path, vm: str | None = None) -> JournalState:
    """Read a journal, every record checked against its closed schema before anything is replayed.

    A torn last record (a crash mid-append: no final newline) is ignored; anything else that does not fit
    (a torn line in the middle, an unknown record type or action kind, a field of the wrong type, a unit,
    module or device name that is not one, a program path that is not absolute) is refused naming the
    file and line.
    """
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_JOURNAL_BYTES + 1)
    except OSError as err:
        raise JournalError(f"cannot read journal {path}: {err.strerror}") from err
    if len(data) > MAX_JOURNAL_BYTES:
        raise JournalError(f"journal {path} is larger than {MAX_JOURNAL_BYTES >> 20} MiB; not a janus-hooks journal")
    records = _records(path, data)
    if not records:
        raise JournalError(f"journal {path} has no begin record")
    number, head = records[0]
    try:
        if not isinstance(head, dict) or head.get("type") != "begin":
            raise SchemaError("the first record is not a begin record")
        begin = record(_BEGIN, head, set(_BEGIN))
        if vm is not None and begin["vm"] != vm:
            raise SchemaError(f"it names VM {quote(begin['vm'])}, not the VM of its file name")
    except SchemaError as err:
        raise JournalError(f"journal {path} line {number}: {err}") from None
    state = JournalState(begin["vm"], begin["boot_id"], begin["time"], begin["devices"])
    by_index: dict[int, Step] = {}
    for number, raw in records[1:]:
        try:
            _apply_record(state, by_index, raw)
        except SchemaError as err:
            raise JournalError(f"journal {path} line {number}: {err}") from None
    return state


def _apply_record(state: JournalState, by_index: dict[int, Step], raw: Any) -> None:
    # Imported when a journal is read: the agent idles without the action classes while no VM is switched.
    from janus_hooks.actions import action_from_json, old_from_json

    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "intent":
        rec = record(_INTENT, raw, set(_INTENT))
        if rec["step"] in by_index:
            raise SchemaError(f"step {rec['step']} appears twice")
        action = action_from_json(rec["action"])
        step = Step(rec["step"], action, old_from_json(action, rec["old"]), rec["time"])
        by_index[step.index] = step
        state.steps.append(step)
        return
    if kind in ("done", "reverted"):
        rec = record(_DONE if kind == "done" else _REVERTED, raw, {"type", "step"})
        step = by_index.get(rec["step"])
        if step is None:
            raise SchemaError(f"{kind} for step {rec['step']}, which has no intent")
        if kind == "reverted":
            step.reverted = True
        else:
            step.done, step.duration_ms = True, rec.get("ms")
            step.old = {**step.old, **old_from_json(step.action, rec.get("result", {}))}
        return
    if kind == "pending":
        rec = record(_PENDING, raw, set(_PENDING))
        step = by_index.get(rec["step"])
        if step is None:
            raise SchemaError(f"pending for step {rec['step']}, which has no intent")
        step.pending = {"pid": rec["pid"], "command": rec["command"]}
        return
    if kind == "complete":
        record(_COMPLETE, raw)
        state.complete = True
        return
    raise SchemaError(f"unknown record type {quote(kind)}")


def repair_tail(path: Path) -> bool:
    """Cut a torn last record off before appending after it (else it would glue onto the next record and
    turn the journal corrupt for good). Returns whether anything was cut."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise JournalError(f"cannot open journal {path}: {err.strerror}") from err
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return False
        data = os.pread(fd, min(size, MAX_JOURNAL_BYTES + 1), max(0, size - MAX_JOURNAL_BYTES - 1))
        keep = size if data.endswith(b"\n") else size - len(data) + data.rfind(b"\n") + 1
        if keep == size:
            return False
        log.warning("journal %s: cutting a torn last record (%d bytes)", path, size - keep)
        os.ftruncate(fd, keep)
        os.fsync(fd)
        return True
    except OSError as err:
        raise JournalError(f"cannot repair journal {path}: {err.strerror}") from err
    finally:
        os.close(fd)
