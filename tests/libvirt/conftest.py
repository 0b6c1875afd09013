"""Real libvirtd + QEMU (TCG) with janus-hooks installed for real: the session fixtures of the libvirt suite.

What the session does, in order, and undoes at its end (also after a failure):
1. takes the host lock (``$JANUS_TEST_RUN_DIR/host.lock``): one suite or libvirt bench at a time, since both
   change the real hugepage pool and ``/etc/libvirt/hooks``;
2. starts virtlogd/libvirtd (and mounts hugetlbfs) through ``scripts/libvirt-services`` unless they already
   run, holding a lease on them, and at the end gives the lease back (the daemons stop when no other caller
   holds one); skips the suite only when libvirtd is not installed;
3. puts the machine's own hook and janus-hooks directories aside (renamed in place to
   ``.<name>.janus-test-stash``) and gives libvirt an empty hooks directory with a daemon hook that records
   each SIGHUP rescan, so that tests can wait for libvirt to have seen a change instead of sleeping;
   a stash left by a killed session is put back first;
4. removes leftover ``janus-test-*`` domains, remembers the hugepage pools and fingerprints the files
   janus-hooks installs, and at the end checks that pools and files are back as they were.

VMs are what virt-manager makes minus the disk: ``type='qemu'`` (KVM hangs on these machines), SeaBIOS
idling without a boot device, no graphics, no network, a few dozen MiB of RAM.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVICES = REPO / "scripts" / "libvirt-services"
RUN_DIR = Path(os.environ.get("JANUS_TEST_RUN_DIR", "/run/janus-hooks-test"))
HOOKS_DIR = Path("/etc/libvirt/hooks")
QEMU_D = HOOKS_DIR / "qemu.d"
SHIM = QEMU_D / "janus-hooks"
CONFIG_DIR = Path("/etc/janus-hooks")
JOURNAL_DIR = Path("/var/lib/janus-hooks/journal")
HOOK_LOG = Path("/var/log/janus-hooks/hook.log")
LIBVIRTD_PID = Path("/run/libvirtd.pid")
QEMU_PID_DIR = Path("/run/libvirt/qemu")
HUGEPAGES = Path("/sys/kernel/mm/hugepages")
PROFILE_NS = "https://janus-hooks.org/xmlns/profile/1"
PREFIX = "janus-test-"
EMULATOR = "/usr/bin/qemu-system-x86_64"

# What the suite puts aside and restores: libvirt's hooks and everything janus-hooks keeps on a host.
STASHED = (HOOKS_DIR, CONFIG_DIR, Path("/var/lib/janus-hooks"), Path("/var/log/janus-hooks"))
# Where `janus-hooks install` writes besides those: compared before and after the session.
FINGERPRINTED = (Path("/etc/udev/rules.d"), Path("/etc/systemd/system"))

SERVICE_TIMEOUT = 120  # seconds for scripts/libvirt-services (first start probes QEMU: slow under TCG)
CLI_TIMEOUT = 60.0
RESCAN_TIMEOUT = 30.0
LOCK_TIMEOUT = 600.0
VM_TIMEOUT = 60.0  # a start, a destroy, a crash being noticed


# --- small helpers ---------------------------------------------------------------------------------------------
def wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``condition`` (first check at once, back-off to 50 ms) until truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:g} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def run(argv: list[str], timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
    """An argv (never a shell line) with a bound; stdin closed, output captured for the failure message."""
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,  # noqa: S603
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc


def pool(size_kb: int = 2048) -> dict[str, int]:
    """The global hugepage pool of one size: total, free, reserved, surplus (absent pool: empty dict)."""
    base = HUGEPAGES / f"hugepages-{size_kb}kB"
    if not base.is_dir():
        return {}
    return {key: int((base / f"{key}_hugepages").read_text()) for key in ("nr", "free", "resv", "surplus")}


def pools() -> dict[int, dict[str, int]]:
    sizes = sorted(int(p.name[len("hugepages-"):-2]) for p in HUGEPAGES.iterdir() if p.name.startswith("hugepages-"))
    return {size: pool(size) for size in sizes}


def set_pool(pages: int, size_kb: int = 2048) -> None:
    (HUGEPAGES / f"hugepages-{size_kb}kB" / "nr_hugepages").write_text(f"{pages}\n")
    wait_for(lambda: pool(size_kb)["nr"] == pages, 30, f"the {size_kb} kB pool to hold {pages} pages")


def journal_of(vm: str) -> Path:
    from janus_hooks.layout import journal_file

    return Path(journal_file("/", vm))


def hook_log_lines() -> list[str]:
    try:
        return HOOK_LOG.read_text().splitlines()
    except FileNotFoundError:
        return []


def write_executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def fingerprint(paths: tuple[Path, ...]) -> dict[str, str]:
    """Every file, link and directory below ``paths``: content hash, link target or "dir", with its mode."""
    seen: dict[str, str] = {}
    for top in paths:
        if not os.path.lexists(top):
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            for name in sorted(dirnames + filenames):
                path = Path(dirpath) / name
                st = path.lstat()
                if path.is_symlink():
                    seen[str(path)] = "-> " + os.readlink(path)
                elif path.is_dir():
                    seen[str(path)] = f"dir {st.st_mode:o}"
                else:
                    seen[str(path)] = f"{hashlib.sha256(path.read_bytes()).hexdigest()} {st.st_mode:o}"
    return seen


# --- the host lock ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def host_lock(timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Exclusive use of the real pool and hooks among janus-hooks' suites and benches (flock, bounded)."""
    RUN_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(RUN_DIR / "host.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        wait_for(lambda: _try_lock(fd), timeout, f"the host lock {RUN_DIR / 'host.lock'} (another suite or bench)")
        yield
    finally:
        os.close(fd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


# --- libvirt's hooks directory: stash, daemon probe, rescans ---------------------------------------------------
def stash_of(path: Path) -> Path:
    return path.with_name(f".{path.name}.janus-test-stash")


def absent_marker(path: Path) -> Path:
    # Records that ``path`` did not exist before the suite (so the end removes it rather than restoring).
    return path.with_name(f".{path.name}.janus-test-absent")


def put_back(path: Path) -> None:
    """Undo ``put_aside``: whatever the tests left at ``path`` goes, the machine's own copy comes back."""
    stash, absent = stash_of(path), absent_marker(path)
    if not (os.path.lexists(stash) or os.path.lexists(absent)):
        return
    if os.path.lexists(path):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if os.path.lexists(stash):
        os.rename(stash, path)
    else:
        absent.unlink()


def put_aside(path: Path) -> None:
    if os.path.lexists(path):
        os.rename(path, stash_of(path))
    else:
        absent_marker(path).touch()


DAEMON_PROBE = """#!/bin/sh
# janus-hooks test suite: records libvirt's daemon hook calls (start, reload on SIGHUP, shutdown).
echo "$2 $3 $4" >> {log}
exit 0
"""


class Libvirt:
    """The running libvirtd: its pid, its hook rescans, and a libvirt-python connection as virt-manager opens."""

    def __init__(self, owned: bool) -> None:
        self.owned = owned  # started by scripts/libvirt-services (this session or the test entry script)
        self.daemon_log = RUN_DIR / "daemon-hook.log"
        self._conn = None

    @property
    def conn(self):
        import libvirt

        if self._conn is None or not self._conn.isAlive():
            self._conn = libvirt.open("qemu:///system")
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def pid(self) -> int:
        return int(LIBVIRTD_PID.read_text().strip())

    def reloads(self) -> int:
        try:
            return sum(1 for line in self.daemon_log.read_text().splitlines() if line.startswith("reload"))
        except FileNotFoundError:
            return 0

    def wait_reload_after(self, before: int, what: str) -> None:
        """libvirtd handles SIGHUP in a thread: wait until its daemon hook saw the reload (it rescans first)."""
        wait_for(lambda: self.reloads() > before, RESCAN_TIMEOUT, f"libvirtd to rescan its hooks after {what}")

    def rescan_hooks(self) -> None:
        """SIGHUP libvirtd until its daemon hook shows a reload: libvirtd drops a SIGHUP that comes while the
        previous reload still runs (seen here: a second SIGHUP 17 ms after the first was ignored)."""
        before = self.reloads()
        deadline = time.monotonic() + RESCAN_TIMEOUT
        while True:
            os.kill(self.pid(), signal.SIGHUP)
            try:
                wait_for(lambda: self.reloads() > before, 1.0, "a reload")
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"libvirtd did not rescan its hooks within {RESCAN_TIMEOUT:g} s") from None

    def restart(self) -> None:
        """Restart libvirtd (guests keep running); only a daemon scripts/libvirt-services started."""
        if not self.owned:
            pytest.skip("libvirtd was not started by scripts/libvirt-services: not restarting someone else's daemon")
        self.close()
        run([str(SERVICES), "restart", "--timeout", str(SERVICE_TIMEOUT)], SERVICE_TIMEOUT * 3)


def _services(cmd: str) -> subprocess.CompletedProcess[str]:
    return run([str(SERVICES), cmd, "--timeout", str(SERVICE_TIMEOUT)], SERVICE_TIMEOUT * 3, check=False)


def _owned(daemon: str) -> bool:
    record = RUN_DIR / f"started-{daemon}"
    try:
        pid = int(record.read_text())
        return Path(f"/proc/{pid}/comm").read_text().strip() == daemon
    except (OSError, ValueError):
        return False


# --- VMs -------------------------------------------------------------------------------------------------------
def domain_xml(name: str, memory_mib: int = 64, mode: str | None = None, hugepages: bool = False,
               page_kb: int | None = None, nodeset: str | None = None, description: str | None = None,
               machine: str = "pc", devices: str = "") -> str:
    """A domain as virt-manager writes it (janus metadata when ``mode``), minus disk, network and graphics."""
    meta = f"<metadata><janus:profile xmlns:janus='{PROFILE_NS}' mode='{mode}'/></metadata>" if mode else ""
    backing = ""
    if hugepages:
        page = f"<page size='{page_kb}' unit='KiB'/>" if page_kb else ""
        backing = f"<memoryBacking><hugepages>{page}</hugepages></memoryBacking>"
    numatune = f"<numatune><memory mode='strict' nodeset='{nodeset}'/></numatune>" if nodeset else ""
    desc = f"<description>{escape(description)}</description>" if description else ""
    return (
        f"<domain type='qemu'><name>{escape(name)}</name>{desc}{meta}"
        f"<memory unit='MiB'>{memory_mib}</memory>{backing}{numatune}<vcpu>1</vcpu>"
        f"<os><type arch='x86_64' machine={quoteattr(machine)}>hvm</type></os>"
        "<on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>"
        f"<devices><emulator>{EMULATOR}</emulator>{devices}<serial type='null'/><memballoon model='none'/></devices>"
        "</domain>"
    )


class Vms:
    """Defines, starts and destroys VMs through libvirt-python; undefines every one it defined, even on failure."""

    def __init__(self, lv: Libvirt) -> None:
        self.lv = lv
        self.names: list[str] = []

    def define(self, name: str, **kwargs):
        assert name.startswith(PREFIX), name
        self.names.append(name)
        return self.lv.conn.defineXML(domain_xml(name, **kwargs))

    def lookup(self, name: str):
        return self.lv.conn.lookupByName(name)

    def start(self, dom) -> float:
        start = time.monotonic()
        dom.create()
        return time.monotonic() - start

    def destroy(self, dom) -> None:
        if dom.isActive():
            dom.destroy()

    def qemu_pid(self, name: str) -> int:
        return int((QEMU_PID_DIR / f"{name}.pid").read_text().strip())

    def cleanup(self) -> list[str]:
        problems = []
        for name in self.names:
            problems += remove_domain(self.lv, name)
        self.names.clear()
        return problems


def remove_domain(lv: Libvirt, name: str) -> list[str]:
    import libvirt

    try:
        dom = lv.conn.lookupByName(name)
    except libvirt.libvirtError:
        return []
    problems = []
    try:
        if dom.isActive():
            dom.destroy()
            problems.append(f"{name} was still running")
    except libvirt.libvirtError as err:
        problems.append(f"destroying {name}: {err}")
    try:
        # With its UEFI variable store and TPM state (VMs made by `vm create`): plain undefine refuses those.
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_TPM)
    except libvirt.libvirtError as err:
        problems.append(f"undefining {name}: {err}")
    return problems


# --- janus-hooks itself ------------------------------------------------------------------------------------------
class Janus:
    """``janus-hooks install --yes`` / ``uninstall`` run for real, as a person would, and what they leave."""

    def __init__(self, lv: Libvirt) -> None:
        self.lv = lv
        self.cli = str(Path(sys.executable).with_name("janus-hooks"))

    @property
    def installed(self) -> bool:
        return SHIM.exists()

    def command(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([self.cli, *args], CLI_TIMEOUT, check=check)

    def install(self) -> subprocess.CompletedProcess[str]:
        before = self.lv.reloads()
        proc = self.command("install", "--yes")
        # install signals libvirtd; the daemon hook proves libvirtd rescanned before any VM is started.
        self.lv.wait_reload_after(before, "janus-hooks install")
        assert SHIM.is_file() and os.access(SHIM, os.X_OK), f"install did not write {SHIM}"
        return proc

    def uninstall(self) -> subprocess.CompletedProcess[str]:
        proc = self.command("uninstall")
        # No wait for a rescan: libvirt lists qemu.d on every call once it knows of any qemu hook.
        assert not SHIM.exists(), f"uninstall left {SHIM}"
        return proc

    def ensure_installed(self) -> None:
        if not self.installed:
            self.install()


RECORDER = """#!/bin/sh
# janus-hooks test suite: records each call ({tag}) with the size of the XML libvirt wrote on stdin.
size=$(wc -c)
printf '%s\\t%s\\t%s\\t%s\\t%s\\n' '{tag}' "$1" "$2" "$3" "$size" >> {log}
exit 0
"""


class Calls:
    """Recording hooks: executable scripts that log each call to one file, in the order libvirt runs them."""

    def __init__(self) -> None:
        self.log = RUN_DIR / "calls.log"
        self.paths: list[Path] = []

    def recorder(self, path: Path, tag: str) -> Path:
        self.paths.append(path)
        return write_executable(path, RECORDER.format(tag=tag, log=self.log))

    def clear(self) -> None:
        self.log.unlink(missing_ok=True)

    def entries(self, vm: str | None = None) -> list[tuple[str, str, str, str, int]]:
        try:
            lines = self.log.read_text().splitlines()
        except FileNotFoundError:
            return []
        rows = [tuple(line.split("\t")) for line in lines]
        return [(t, n, o, s, int(size)) for t, n, o, s, size in rows if vm is None or n == vm]

    def phases(self, vm: str, tag: str) -> list[str]:
        return [f"{o} {s}" for t, n, o, s, _ in self.entries(vm) if t == tag]

    def remove(self) -> None:
        for path in self.paths:
            path.unlink(missing_ok=True)
        self.paths.clear()
        self.clear()


# --- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def libvirtd() -> Iterator[Libvirt]:
    """A running libvirtd with an empty hooks directory (plus the daemon probe); everything restored after."""
    if shutil.which("libvirtd") is None and not Path("/usr/sbin/libvirtd").exists():
        pytest.skip("libvirtd is not installed (Debian: scripts/bootstrap installs libvirt-daemon-system)")
    if os.geteuid() != 0:
        pytest.fail("the libvirt suite needs root: it starts libvirtd, installs janus-hooks and writes hugepages")
    with host_lock():
        for path in STASHED:  # a session killed before its end left the machine's files aside
            put_back(path)
        for journal in JOURNAL_DIR.glob("*.jsonl"):
            pytest.fail(f"janus-hooks has an open journal on this machine ({journal}); run `janus-hooks rollback` "
                        "before the libvirt suite")
        # Always through the script: it starts only what does not run, and the lease it gives this process
        # keeps the test entry script's `stop` (or a bench's) from pulling libvirtd away mid-session.
        proc = _services("start")
        if proc.returncode == 3:
            pytest.skip(f"libvirt is not installed: {proc.stderr.strip()}")
        assert proc.returncode == 0, f"scripts/libvirt-services start failed:\n{proc.stdout}{proc.stderr}"
        lv = Libvirt(owned=_owned("libvirtd"))
        files_before = fingerprint(FINGERPRINTED)
        pools_before = pools()
        for path in STASHED:
            put_aside(path)
        problems: list[str] = []
        try:
            HOOKS_DIR.mkdir(mode=0o755)
            write_executable(HOOKS_DIR / "daemon", DAEMON_PROBE.format(log=lv.daemon_log))
            lv.daemon_log.unlink(missing_ok=True)
            lv.rescan_hooks()
            for dom in lv.conn.listAllDomains():
                if dom.name().startswith(PREFIX):
                    problems += remove_domain(lv, dom.name())
            yield lv
        finally:
            problems += _teardown(lv, pools_before, files_before)
        if problems:
            pytest.fail("the libvirt suite did not leave the machine as it found it:\n  " + "\n  ".join(problems))


def _teardown(lv: Libvirt, pools_before, files_before) -> list[str]:
    problems: list[str] = []
    try:
        for dom in lv.conn.listAllDomains():
            if dom.name().startswith(PREFIX):
                problems += remove_domain(lv, dom.name())
    except Exception as err:  # noqa: BLE001 - libvirtd went away: its QEMUs must not outlive the session
        problems.append(f"libvirtd did not answer at the end ({err})")
        problems += kill_orphans()
    if SHIM.exists():
        # A test failed with janus-hooks installed: take it back the way a person would.
        proc = run([str(Path(sys.executable).with_name("janus-hooks")), "uninstall"], CLI_TIMEOUT, check=False)
        if proc.returncode != 0:
            problems.append(f"janus-hooks uninstall at the end failed: {proc.stdout}{proc.stderr}")
    leftover = sorted(JOURNAL_DIR.glob("*.jsonl"))
    if leftover:
        problems.append(f"journals left open: {', '.join(map(str, leftover))}")
    for path in STASHED:
        try:
            put_back(path)
        except OSError as err:
            problems.append(f"could not put {path} back from {stash_of(path)}: {err}")
    with contextlib.suppress(Exception):
        os.kill(lv.pid(), signal.SIGHUP)  # libvirtd rescans the machine's own hooks
    lv.close()
    lv.daemon_log.unlink(missing_ok=True)
    after = pools()
    for size, before in pools_before.items():
        if after.get(size, {}).get("nr") != before.get("nr"):
            problems.append(f"{size} kB hugepage pool: {before.get('nr')} pages before, {after[size].get('nr')} after"
                            " (set back)")
            with contextlib.suppress(Exception):
                set_pool(before["nr"], size)
    files_after = fingerprint(FINGERPRINTED)
    for path in sorted(set(files_before) | set(files_after)):
        if files_before.get(path) != files_after.get(path):
            problems.append(f"{path}: {files_before.get(path, 'absent')} before, "
                            f"{files_after.get(path, 'absent')} after")
    proc = _services("stop")  # gives the lease back; stops what it started once nobody else holds one
    if proc.returncode != 0:
        problems.append(f"scripts/libvirt-services stop failed: {proc.stdout}{proc.stderr}")
    return problems


def kill_orphans() -> list[str]:
    """SIGKILL the QEMUs of the suite's VMs that libvirt no longer looks after; names what it killed."""
    killed = []
    for pidfile in QEMU_PID_DIR.glob(f"{PREFIX}*.pid"):
        name = pidfile.name[:-len(".pid")]
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if not any(arg == f"guest={name}".encode() or arg.startswith(f"guest={name},".encode()) for arg in cmdline):
            continue  # the pid file is stale: that pid is someone else now
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda p=pid: not Path(f"/proc/{p}").exists(), VM_TIMEOUT, f"QEMU {pid} of {name} to die")
        killed.append(f"killed the orphaned QEMU of {name} (pid {pid})")
    return killed


@pytest.fixture(scope="session")
def janus(libvirtd: Libvirt) -> Janus:
    return Janus(libvirtd)


@pytest.fixture
def vms(libvirtd: Libvirt) -> Iterator[Vms]:
    """Per test: every VM it defines is destroyed and undefined afterwards, whatever happened."""
    v = Vms(libvirtd)
    try:
        yield v
    finally:
        problems = v.cleanup()
    assert not problems, "; ".join(problems)


@pytest.fixture
def calls() -> Iterator[Calls]:
    c = Calls()
    c.clear()
    try:
        yield c
    finally:
        c.remove()


@pytest.fixture
def installed(janus: Janus) -> Janus:
    """janus-hooks installed (by `janus-hooks install --yes`), for tests that only need it there."""
    janus.ensure_installed()
    return janus
