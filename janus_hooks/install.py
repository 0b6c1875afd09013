"""``janus-hooks install`` / ``uninstall``: the files janus-hooks puts on a host, and a manifest to take them back.

Install writes the qemu hook shim as a drop-in (``etc/libvirt/hooks/qemu.d/janus-hooks``), the udev rules, the
systemd units (enabling the boot-time recovery and the sleep guard by their [Install] links), the default
config, and janus-hooks' private state and log directories. Every file it writes or replaces goes into a
manifest under the state directory with the sha256 of what was written and where the replaced file was
backed up, so that uninstall removes exactly that and puts the backups back.

Planning and applying are separate: ``plan_install`` only reads, so ``--dry-run`` is the same listing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import janus_hooks
from janus_hooks.config import config_path
from janus_hooks.errors import JanusError
from janus_hooks.files import atomic_write, ensure_private_dir, fsync_dir
from janus_hooks.host import Host, Runner
from janus_hooks.host.paths import others_can_change, tree_others_can_change
from janus_hooks.journal import JournalStore
from janus_hooks.resources import data_file, data_files

HOOK_NAME = "janus-hooks"
MANIFEST_NAME = "install-manifest.json"
BACKUP_DIR = "backup"
MANIFEST_FORMAT = 1
# Units whose [Install] links install creates.
ENABLED_UNITS = ("janus-hooks-recover.service", "janus-hooks-sleep-guard.service", "janus-hooks-agent.service")
# libvirt daemons that run qemu hooks; both rescan hooks on SIGHUP.
LIBVIRT_DAEMONS = ("libvirtd", "virtqemud")
# Linux reads at most this many bytes of a "#!" line (BINPRM_BUF_SIZE since 5.1; 127 before).
SHEBANG_MAX = 255
RELOAD_TIMEOUT = 30.0
SHIM_CHECK_TIMEOUT = 15.0


class InstallError(JanusError):
    """Install or uninstall cannot go on; the message names the path."""


# --- what this install is -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Identity:
    """Where this copy of janus-hooks lives: what the shim and the units are written to run."""

    root: str  # absolute host root the hook acts on (JANUS_ROOT)
    interpreter: str  # resolved interpreter for the shim: runs with -I -S, needs only the stdlib
    python: str  # this environment's interpreter (venv or pipx): the units need click & co.
    package_dir: str  # the directory holding the janus_hooks package (JANUS_PATH)

    @classmethod
    def current(cls, root: str | os.PathLike[str]) -> Identity:
        package = Path(janus_hooks.__file__).resolve().parent
        return cls(
            root=os.path.abspath(root),
            interpreter=os.path.realpath(sys.executable),
            python=os.path.abspath(sys.executable),
            package_dir=str(package.parent),
        )


ROOT_OWNED_INSTALL = ("install janus-hooks where only root can change it, e.g. 'sudo python3 -m venv /opt/janus-hooks "
                      "&& sudo /opt/janus-hooks/bin/pip install janus-hooks', then run "
                      "'sudo /opt/janus-hooks/bin/janus-hooks install'")


def code_others_can_change(ident: Identity) -> str | None:
    """Why someone other than root could change the interpreter or the package of ``ident`` (None: nobody).

    The hook and the units run them as root at every VM start, suspend and boot: whoever can change either
    (or a directory on the way) would become root."""
    return (others_can_change(ident.interpreter) or others_can_change(ident.python)
            or tree_others_can_change(Path(ident.package_dir) / "janus_hooks"))


def refuse_code_others_can_change(ident: Identity) -> None:
    problem = code_others_can_change(ident)
    if problem:
        raise InstallError(f"{problem}: the hook would run as root code that others can change; {ROOT_OWNED_INSTALL}")


def render_shim(template: str, ident: Identity) -> str:
    """The hook shim with this install's interpreter, package location and root written in."""
    if re.search(r"\s", ident.interpreter):
        raise InstallError(f"interpreter path {ident.interpreter!r} contains white space; a #! line cannot hold it")
    lines = template.splitlines(keepends=True)
    if not lines or not lines[0].startswith("#!"):
        raise InstallError("hooks/qemu does not start with a #! line: reinstall janus-hooks")
    # Linux passes everything after the interpreter as ONE argument: "-I -S" would reach Python as a
    # single unknown option, so the flags are written as one word.
    shebang = f"#!{ident.interpreter} -IS\n"
    if len(shebang.encode()) > SHEBANG_MAX:
        raise InstallError(f"interpreter path {ident.interpreter} is too long for a #! line")
    text = shebang + "".join(lines[1:])
    for name, value in (("JANUS_PATH", ident.package_dir), ("JANUS_ROOT", ident.root)):
        # json.dumps is a valid Python string literal for any str, and stable across runs.
        text, count = re.subn(rf"^{name} = .*$", f"{name} = {json.dumps(value)}", text, flags=re.MULTILINE)
        if count != 1:
            raise InstallError(f"hooks/qemu has no single '{name} = ...' line: reinstall janus-hooks")
    return text


def _systemd_quote(value: str) -> str:
    # "%" starts a unit specifier; quotes keep paths with spaces one argument.
    value = value.replace("%", "%%")
    return f'"{value}"' if re.search(r"[\s\"'\\]", value) else value


def render_unit(template: str, ident: Identity, state_dir: str, log_dir: str = "") -> str:
    """A unit with the command of this install (this environment's python -m janus_hooks) and the root."""
    command = f"{_systemd_quote(ident.python)} -m janus_hooks"
    return (template.replace("@JANUS_HOOKS@", command)
            .replace("@ROOT@", _systemd_quote(ident.root))
            .replace("@STATE_DIR@", state_dir.replace("%", "%%"))
            .replace("@LOG_DIR@", log_dir.replace("%", "%%")))


def _install_targets(unit_text: str) -> list[str]:
    """``<target>.wants`` / ``<target>.requires`` directories from a unit's [Install] section."""
    dirs, section = [], ""
    for line in unit_text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Install]" and "=" in line:
            key, value = (s.strip() for s in line.split("=", 1))
            suffix = {"WantedBy": ".wants", "RequiredBy": ".requires"}.get(key)
            if suffix:
                dirs += [target + suffix for target in value.split()]
    return dirs


# --- what gets written --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One file or link install owns."""

    rel: str  # path below the root
    kind: str  # hook, udev, unit, link, config
    data: bytes = b""
    mode: int = 0o644
    target: str | None = None  # for links

    @property
    def sha256(self) -> str | None:
        return None if self.kind == "link" else hashlib.sha256(self.data).hexdigest()


def _rel(host: Host, path: Path) -> str:
    return os.path.relpath(path, host.root)


def desired_items(host: Host, ident: Identity) -> list[Item]:
    """Everything install writes, in the order it writes it (the hook last: the rest must be there first)."""
    items: list[Item] = []
    state_abs = str(Path(ident.root) / _rel(host, host.state_dir()))
    log_abs = str(Path(ident.root) / _rel(host, host.log_dir()))
    for rules in data_files("udev", ".rules"):
        items.append(Item(_rel(host, host.udev_rules_dir() / rules.name), "udev", rules.read_bytes()))
    units_rel = _rel(host, host.systemd_unit_dir())
    for unit in data_files("systemd", ".service"):
        text = render_unit(unit.read_text(), ident, state_abs, log_abs)
        items.append(Item(f"{units_rel}/{unit.name}", "unit", text.encode()))
        if unit.name in ENABLED_UNITS:
            for wants in _install_targets(text):
                # What `systemctl enable` writes: an absolute link, right once this root is booted.
                items.append(Item(f"{units_rel}/{wants}/{unit.name}", "link", target=f"/{units_rel}/{unit.name}"))
    template = data_file("templates", "janus.toml")
    items.append(Item(_rel(host, config_path(host.config_dir())), "config", template.read_bytes()))
    shim = render_shim(data_file("hooks", "qemu").read_text(), ident)
    items.append(Item(_rel(host, hook_path(host)), "hook", shim.encode(), mode=0o755))
    return items


def hook_path(host: Host) -> Path:
    return host.libvirt_hooks_dir() / "qemu.d" / HOOK_NAME


def private_dirs(host: Host) -> list[Path]:
    """Directories install creates 0700: the journal and backups, and the hook's logs."""
    return [host.state_dir(), host.log_dir()]


# --- the manifest -------------------------------------------------------------------------------------------
@dataclass
class Entry:
    rel: str
    kind: str
    sha256: str | None
    mode: int
    target: str | None = None
    backup: str | None = None  # below the root: where the file install replaced was copied

    def to_json(self) -> dict[str, Any]:
        return {"path": self.rel, "kind": self.kind, "sha256": self.sha256, "mode": f"{self.mode:04o}",
                "link": self.target, "backup": self.backup}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        return cls(data["path"], data["kind"], data.get("sha256"), int(data.get("mode", "0644"), 8),
                   data.get("link"), data.get("backup"))


@dataclass
class Manifest:
    entries: dict[str, Entry] = field(default_factory=dict)
    created_dirs: list[str] = field(default_factory=list)
    identity: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def path(host: Host) -> Path:
        return host.state_dir() / MANIFEST_NAME

    @classmethod
    def load(cls, host: Host) -> Manifest | None:
        path = cls.path(host)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise InstallError(f"cannot read the install manifest {path}: {err}") from err
        if data.get("format") != MANIFEST_FORMAT:
            raise InstallError(f"{path} has an unknown format {data.get('format')!r}")
        return cls({e["path"]: Entry.from_json(e) for e in data.get("files", [])},
                   list(data.get("created_dirs", [])), dict(data.get("install", {})))

    def to_json(self) -> dict[str, Any]:
        return {"format": MANIFEST_FORMAT, "install": self.identity,
                "files": [e.to_json() for e in self.entries.values()], "created_dirs": self.created_dirs}

    def save(self, host: Host) -> None:
        data = json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"
        atomic_write(self.path(host), data.encode(), mode=0o600)


# --- looking at what is on disk -----------------------------------------------------------------------------
def file_state(path: Path) -> tuple[str, str | None, int | None]:
    """("missing" | "file" | "link" | "other", sha256 or link target, mode) without following links."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return "missing", None, None
    if stat.S_ISLNK(st.st_mode):
        return "link", os.readlink(path), None
    if stat.S_ISREG(st.st_mode):
        return "file", hashlib.sha256(path.read_bytes()).hexdigest(), stat.S_IMODE(st.st_mode)
    return "other", None, None


def matches(entry: Entry | Item, state: tuple[str, str | None, int | None]) -> bool:
    kind, value, mode = state
    if entry.kind == "link":
        return kind == "link" and value == entry.target
    return kind == "file" and value == entry.sha256 and mode == entry.mode


# --- the install plan ---------------------------------------------------------------------------------------
@dataclass
class Step:
    item: Item
    action: str  # create, update, replace, adopt, unchanged, keep, refuse
    note: str = ""
    backup: str | None = None

    @property
    def writes(self) -> bool:
        return self.action in ("create", "update", "replace")


@dataclass
class InstallPlan:
    ident: Identity
    steps: list[Step]
    dirs: list[tuple[str, int]]  # directories to create: (rel, mode)
    warnings: list[str]
    failures: list[str]
    manifest: Manifest

    @property
    def changes(self) -> bool:
        return bool(self.dirs) or any(s.writes or s.action == "adopt" for s in self.steps)


def plan_install(host: Host, ident: Identity) -> InstallPlan:
    """Compare what install would write with what is there; reads only."""
    manifest = Manifest.load(host) or Manifest()
    steps: list[Step] = []
    failures: list[str] = []
    for item in desired_items(host, ident):
        path = host.root / item.rel
        state = file_state(path)
        entry = manifest.entries.get(item.rel)
        if state[0] == "missing":
            steps.append(Step(item, "create", backup=entry.backup if entry else None))
        elif matches(item, state):
            if entry is None and item.kind != "config":
                # Already exactly ours (a manifest lost with a wiped state dir): listed from now on, no backup,
                # so that uninstall removes it rather than putting a janus-hooks file back.
                steps.append(Step(item, "adopt", "identical, not in the manifest"))
            else:
                steps.append(Step(item, "unchanged", backup=entry.backup if entry else None))
        elif entry is not None and matches(entry, state):
            steps.append(Step(item, "update", backup=entry.backup))
        elif item.kind == "config":
            # The person's settings win, whether install wrote the file once or not.
            steps.append(Step(item, "keep", "changed by you" if entry else "already there"))
        elif state[0] != "file" or item.kind == "link" or entry is not None:
            what = {"link": "a link elsewhere", "other": "not a regular file"}.get(state[0], "changed since install")
            steps.append(Step(item, "refuse", what))
            failures.append(f"{item.rel} is {what}; not replacing it (move it away and run install again)")
        else:
            steps.append(Step(item, "replace", "not installed by janus-hooks", backup=_backup_rel(host, item.rel)))
    dirs = _dirs_to_create(host, [s.item for s in steps if s.writes])
    return InstallPlan(ident, steps, dirs, find_conflicts(host), failures, manifest)


def _backup_rel(host: Host, rel: str) -> str:
    return _rel(host, host.state_dir() / BACKUP_DIR / rel)


def _dirs_to_create(host: Host, items: list[Item]) -> list[tuple[str, int]]:
    wanted: dict[str, int] = {}
    for private in private_dirs(host):
        for parent in reversed(private.relative_to(host.root).parents[:-1]):
            wanted.setdefault(str(parent), 0o755)
        wanted[_rel(host, private)] = 0o700
    for item in items:
        for parent in reversed(Path(item.rel).parents[:-1]):
            wanted.setdefault(str(parent), 0o755)
    return [(rel, mode) for rel, mode in wanted.items() if not os.path.lexists(host.root / rel)]


# --- conflicts ----------------------------------------------------------------------------------------------
_STARTUP_SCRIPT = re.compile(r"vfio-(startup|teardown)", re.IGNORECASE)
# A dispatcher that runs per-VM directories (qemu.d/$GUEST_NAME/...) never runs a file directly in qemu.d.
_PER_VM_DIR = re.compile(r"qemu\.d/+\$\{?(1|GUEST_NAME|OBJECT|guest_name|VM|vm)\b")


def find_conflicts(host: Host) -> list[str]:
    """Other hooks that switch GPUs or that would run janus-hooks a second time; one sentence each."""
    hooks = host.libvirt_hooks_dir()
    notes: list[str] = []
    dispatcher = hooks / "qemu"
    if dispatcher.is_file():
        text = dispatcher.read_text(errors="replace")
        rel = _rel(host, dispatcher)
        if "janus" in text.lower():
            notes.append(f"{rel} calls janus-hooks itself while libvirt runs qemu.d/{HOOK_NAME} too: "
                         "janus-hooks would run twice for every VM; remove the call from the dispatcher")
        elif "qemu.d" in text and not _PER_VM_DIR.search(text):
            notes.append(f"{rel} seems to run the scripts in qemu.d itself; libvirt 6.5+ runs them too, "
                         f"so {HOOK_NAME} may run twice for every VM")
        if _STARTUP_SCRIPT.search(text):
            notes.append(f"{rel} runs vfio-startup/vfio-teardown scripts, which switch the GPU too: "
                         "do not mark the same VM managed by janus-hooks")
    qemu_d = hooks / "qemu.d"
    for vm_dir in sorted(p for p in _listdir(qemu_d) if p.is_dir() and not p.is_symlink()):
        scripts = sorted(p for p in vm_dir.rglob("*") if p.is_file() and os.access(p, os.X_OK))
        if scripts:
            notes.append(f"{_rel(host, scripts[0])}: VM {vm_dir.name!r} has hook scripts of its own "
                         "(run by a dispatcher); if they switch its GPU, do not also mark it managed by janus-hooks")
    for directory in (hooks, *(host.path(d) for d in ("usr/local/bin", "usr/local/sbin", "usr/bin", "bin"))):
        candidates = directory.rglob("*") if directory == hooks else _listdir(directory)
        for path in sorted(candidates):
            if _STARTUP_SCRIPT.search(path.name) and path.is_file():
                notes.append(f"{_rel(host, path)} is a single-GPU passthrough script; if a hook still calls it, "
                             "it fights janus-hooks over the GPU")
    return notes


def _listdir(path: Path) -> list[Path]:
    try:
        return list(path.iterdir())
    except OSError:
        return []


# --- applying -----------------------------------------------------------------------------------------------
def apply_install(host: Host, plan: InstallPlan) -> None:
    """Carry out a plan: directories, backups, files; the manifest is rewritten after each file."""
    manifest = plan.manifest
    manifest.identity = {"interpreter": plan.ident.interpreter, "package_dir": plan.ident.package_dir,
                         "python": plan.ident.python, "root": plan.ident.root}
    for rel, mode in plan.dirs:
        path = host.root / rel
        if mode == 0o700:
            ensure_private_dir(path)
        else:
            path.mkdir(mode=mode)
            os.chmod(path, mode)  # mkdir's mode is filtered by the umask
        manifest.created_dirs.append(rel)
    for private in private_dirs(host):
        ensure_private_dir(private)  # refuses one someone else could write to
    manifest.save(host)
    for step in plan.steps:
        item, path = step.item, host.root / step.item.rel
        if step.action == "replace":
            backup = host.root / step.backup
            backup.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            shutil.copy2(path, backup, follow_symlinks=False)
        if step.writes:
            # Crash window: a file written but not yet listed is found identical, and adopted, next time.
            if item.kind == "link":
                if os.path.lexists(path):
                    path.unlink()
                os.symlink(item.target, path)
                fsync_dir(path.parent)
            else:
                atomic_write(path, item.data, mode=item.mode)
        if step.action in ("keep", "refuse") or (step.action == "unchanged" and item.rel not in manifest.entries):
            continue  # a changed file, or a config someone else wrote: the manifest keeps what it knew
        entry = Entry(item.rel, item.kind, item.sha256, item.mode, item.target, step.backup)
        if manifest.entries.get(item.rel) != entry:
            manifest.entries[item.rel] = entry
            manifest.save(host)


def check_shim(host: Host, runner: Runner) -> str | None:
    """Run the installed shim with a phase it ignores: proves the interpreter and the package path work."""
    result = runner.run([str(hook_path(host)), "janus-hooks-install-check", "install", "check", "-"],
                        SHIM_CHECK_TIMEOUT)
    if result.returncode != 0:
        return f"the installed hook {hook_path(host)} does not run: {result.reason()}"
    return None


# --- uninstall ----------------------------------------------------------------------------------------------
@dataclass
class Removal:
    entry: Entry
    action: str  # remove, restore, gone, keep
    note: str = ""


@dataclass
class UninstallPlan:
    manifest: Manifest
    removals: list[Removal]
    open_journals: list[str]
    failures: list[str]


def plan_uninstall(host: Host) -> UninstallPlan:
    manifest = Manifest.load(host)
    if manifest is None:
        raise InstallError(f"janus-hooks is not installed under {host.root} (no {Manifest.path(host)})")
    removals, failures = [], []
    for entry in reversed(list(manifest.entries.values())):
        state = file_state(host.root / entry.rel)
        if state[0] == "missing":
            removals.append(Removal(entry, "gone", "already removed"))
        elif matches(entry, state):
            removals.append(Removal(entry, "restore" if entry.backup else "remove"))
        elif entry.kind == "config":
            removals.append(Removal(entry, "keep", "changed by you; your settings stay"))
        else:
            removals.append(Removal(entry, "keep", "changed since install"))
            failures.append(f"{entry.rel} was changed since install; left in place (remove it by hand)")
    store = JournalStore(host.state_dir())
    return UninstallPlan(manifest, removals, store.vms(), failures)


def apply_uninstall(host: Host, plan: UninstallPlan, lock_timeout: float) -> list[str]:
    """Remove what the plan says, restore backups, prune the directories install made; returns notes."""
    store = JournalStore(host.state_dir())
    leftovers = {p: os.path.lexists(p) for p in (host.state_dir() / "lock", store.dir)}
    # A state directory install made goes entirely, with what hooks left in it (lock, empty journal dir).
    own_state_dir = _rel(host, host.state_dir()) in plan.manifest.created_dirs
    notes: list[str] = []
    manifest = plan.manifest
    # The transition lock: no VM starts switching devices while its hook is being taken away.
    with store.lock(lock_timeout):
        started = sorted(set(store.vms()) - set(plan.open_journals))
        if started:
            raise InstallError(f"VM {started[0]!r} started switching devices meanwhile; nothing was removed")
        for removal in plan.removals:
            entry, path = removal.entry, host.root / removal.entry.rel
            if removal.action in ("remove", "restore"):
                path.unlink()
                if removal.action == "restore":
                    os.replace(host.root / entry.backup, path)
                fsync_dir(path.parent)
            if removal.action != "keep" or entry.kind == "config":
                del manifest.entries[entry.rel]
        for path, existed in leftovers.items():
            # Left by the hook or by the lock above: janus-hooks' own files, not the host's.
            if not existed or own_state_dir:
                _remove_empty(path)
    _prune(host.state_dir() / BACKUP_DIR)
    if manifest.entries:
        manifest.save(host)
        notes.append(f"{Manifest.path(host)} still lists {len(manifest.entries)} file(s) left in place")
    else:
        Manifest.path(host).unlink(missing_ok=True)
    for rel in reversed(manifest.created_dirs):
        path = host.root / rel
        if not _remove_empty(path) and path.exists():
            notes.append(f"kept {rel}: not empty")
    return notes


def _remove_empty(path: Path) -> bool:
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        else:
            path.rmdir()
    except OSError:
        return False
    return True


def _prune(top: Path) -> None:
    """Remove empty directories below and including ``top`` (what is left of the backups)."""
    if not top.is_dir() or top.is_symlink():
        return
    for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
        _remove_empty(Path(dirpath))


# --- telling the running system -----------------------------------------------------------------------------
def reload_system(host: Host, runner: Runner, kill: Callable[[int, int], None]) -> tuple[list[str], list[str]]:
    """Make libvirt rescan hooks, udev and systemd reload; for the running system only. (done, warnings)."""
    done, warnings = [], []
    for daemon in LIBVIRT_DAEMONS:
        pid = host.daemon_pid(daemon)
        if pid is None:
            continue
        try:
            kill(pid, signal.SIGHUP)
            done.append(f"asked {daemon} (pid {pid}) to rescan its hooks")
        except OSError as err:
            warnings.append(f"could not signal {daemon} (pid {pid}): {err.strerror}; restart it to load the hook")
    commands = []
    if host.program("udevadm") and host.udev_running():
        commands.append(["udevadm", "control", "--reload"])
    if host.program("systemctl") and host.systemd_running():
        commands.append(["systemctl", "daemon-reload"])
    for argv in commands:
        result = runner.run(argv, RELOAD_TIMEOUT)
        if result.returncode == 0:
            done.append(f"ran {' '.join(argv)}")
        else:
            warnings.append(f"{' '.join(argv)} failed: {result.reason()}")
    return done, warnings
