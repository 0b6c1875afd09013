"""The static description of a fake host (``.fake/world.json`` in its tree) and its mutable fake-only state.

Everything the real kernel would show lives in the tree itself (``sys/``, ``proc/``, ``run/``) so that a
fresh process (recovery after a ``kill -9``) sees exactly what the killed one left behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

WORLD = ".fake/world.json"
STATE = ".fake/state"  # fake-only bookkeeping, not part of what a host shows
FILES = ".fake/files"  # <pid>/<fd>: which open file a descriptor is (what kcmp compares)
LOGIND_PID = 480
UNIT_STATE = "run/fake-systemd"  # <unit>, user-<uid>/<unit>: "active" or "inactive"


def manager_socket(uid: int) -> str:
    """Where a running user manager has its private socket (a plain file here)."""
    return f"run/user/{uid}/systemd/private"


def session_device_file(sid: str, node: str) -> str:
    """The id of the one open file a session's device is while logind holds it for that session."""
    return f"session-{sid}:{node}"


def session_file(sid: str, uid: int, kind: str) -> str:
    """/run/systemd/sessions/<id> as logind writes it (the fields janus-hooks reads)."""
    return f"UID={uid}\nUSER=user{uid}\nACTIVE=1\nTYPE={kind}\n"


def load_world(root: Path) -> dict[str, Any]:
    return json.loads((root / WORLD).read_text())


def save_world(root: Path, world: dict[str, Any]) -> None:
    (root / WORLD).parent.mkdir(parents=True, exist_ok=True)
    (root / WORLD).write_text(json.dumps(world, indent=1, sort_keys=True))


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def link(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    os.symlink(target, path)


def unlink(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()


def rmtree(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def spawn_process(root: Path, proc: dict[str, Any]) -> None:
    """Create /proc/<pid> for a process description: comm, cgroup, uid and the device nodes it holds."""
    base = root / "proc" / str(proc["pid"])
    write(base / "comm", proc["comm"] + "\n")
    write(base / "cgroup", f"0::{proc.get('cgroup', '/')}\n")
    uid = proc.get("uid", 0)
    write(base / "status", f"Name:\t{proc['comm']}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    (base / "fd").mkdir(parents=True, exist_ok=True)
    (base / "fdinfo").mkdir(parents=True, exist_ok=True)
    for number, entry in enumerate(proc.get("fds", []), start=3):
        # An fd is a node, or {"node": ..., "file": id}: descriptors with one file id are one open file.
        node, file_id = (entry, None) if isinstance(entry, str) else (entry["node"], entry.get("file"))
        _open(root, proc["pid"], number, node, file_id, proc.get("opath", False))


def _open(root: Path, pid: int, number: int, node: str, file_id: str | None, opath: bool = False) -> None:
    base = root / "proc" / str(pid)
    link(base / "fd" / str(number), node)
    flags = "010000002" if opath else "02"
    write(base / "fdinfo" / str(number), f"pos:\t0\nflags:\t{flags}\nmnt_id:\t20\n")
    if file_id:
        write(root / FILES / str(pid) / str(number), file_id + "\n")


def open_fd(root: Path, pid: int, node: str, file_id: str) -> int:
    """Give process ``pid`` a descriptor (the lowest free number, as the kernel does) of open file ``file_id``."""
    used = {int(n) for n in os.listdir(root / "proc" / str(pid) / "fd")}
    number = next(n for n in range(3, 1 << 16) if n not in used)
    _open(root, pid, number, node, file_id)
    return number


def close_files(root: Path, pid: int, prefix: str) -> None:
    """Close every descriptor of ``pid`` whose open file id starts with ``prefix``."""
    files = root / FILES / str(pid)
    for number in sorted(os.listdir(files)) if files.is_dir() else []:
        if (files / number).read_text().strip().startswith(prefix):
            unlink(root / "proc" / str(pid) / "fd" / number)
            unlink(root / "proc" / str(pid) / "fdinfo" / number)
            unlink(files / number)


def open_file_id(root: Path, pid: int, fd: int) -> str | None:
    path = root / FILES / str(pid) / str(fd)
    if not (path.is_file() and (root / "proc" / str(pid) / "fd" / str(fd)).is_symlink()):
        return None
    return path.read_text().strip()


def kill_process(root: Path, pid: int) -> None:
    rmtree(root / "proc" / str(pid))
    rmtree(root / FILES / str(pid))
    settle_blocked_writes(root)


# --- kernel writes asleep in the kernel (a held sound card's unbind) -------------------------------------
PENDING = ".fake/pending.json"
WRITER_PID_BASE = 9100


def held_sound_nodes(root: Path, address: str) -> list[str]:
    """The /dev/snd nodes of PCI function ``address`` that some process holds."""
    nodes = {n for n, owner in load_world(root).get("nodes", {}).items()
             if owner == address and n.startswith("/dev/snd/")}
    held = []
    proc = root / "proc"
    for pid in sorted(p for p in os.listdir(proc) if p.isdigit()) if proc.is_dir() else []:
        fd_dir = proc / pid / "fd"
        for fd in os.listdir(fd_dir) if fd_dir.is_dir() else []:
            target = os.readlink(fd_dir / fd)
            if target in nodes:
                held.append(f"pid {pid} via {target}")
    return held


def _pending(root: Path) -> list[dict[str, Any]]:
    path = root / PENDING
    return json.loads(path.read_text()) if path.exists() else []


def block_write(root: Path, op: str, address: str) -> int:
    """A writer asleep in the kernel: a process named as janus-hooks' writer (dd), finishing ``op`` later."""
    pending = _pending(root)
    pid = WRITER_PID_BASE + len(pending)
    spawn_process(root, {"pid": pid, "comm": "dd", "fds": []})
    pending.append({"pid": pid, "op": op, "address": address})
    (root / PENDING).write_text(json.dumps(pending))
    return pid


def settle_blocked_writes(root: Path) -> None:
    """Writes whose device is no longer held complete now; their writers exit."""
    pending = _pending(root)
    if not pending:
        return
    left = []
    for entry in pending:
        if held_sound_nodes(root, entry["address"]):
            left.append(entry)
            continue
        dev = root / "sys/bus/pci/devices" / entry["address"]
        if (dev / "driver").is_symlink():
            driver = os.path.basename(os.readlink(dev / "driver"))
            unlink(dev / "driver")
            unlink(root / "sys/bus/pci/drivers" / driver / entry["address"])
        rmtree(root / "proc" / str(entry["pid"]))
    (root / PENDING).write_text(json.dumps(left))


def snapshot_tree(root: Path) -> dict[str, tuple[str, str]]:
    """Every file, link and directory below ``root`` with its content: equal snapshots mean equal hosts."""
    result: dict[str, tuple[str, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".fake" or rel_dir.startswith(".fake" + os.sep):
            dirnames[:] = []
            continue
        # Janus's own state (journals, logs, lock) is not host state.
        if rel_dir.startswith(("var/lib/janus-hooks", "var/log/janus-hooks")):
            dirnames[:] = []
            continue
        for name in sorted(dirnames):
            full = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if os.path.islink(full):
                result[rel] = ("link", os.readlink(full))
                dirnames.remove(name)
            else:
                result[rel] = ("dir", "")
        for name in filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if os.path.islink(full):
                result[rel] = ("link", os.readlink(full))
            else:
                result[rel] = ("file", Path(full).read_bytes().decode(errors="backslashreplace"))
    return result
