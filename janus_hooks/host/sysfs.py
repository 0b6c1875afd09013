"""``Host(root)``: reads the kernel's and the system's state below one root directory.

No other module spells a kernel path. Reads are tolerant (a device can vanish between a listdir and a read);
writes are not done here but through ``Host.kernel``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

from janus_hooks import layout
from janus_hooks.cpuset import parse_cpulist
from janus_hooks.host.kernel import Kernel, RealKernel
from janus_hooks.host.model import (
    Framebuffer,
    HugepagePool,
    Module,
    PciDevice,
    ProcessHold,
    Session,
    VtConsole,
)
from janus_hooks.host.paths import resolve_beneath
from janus_hooks.host.storage import BackingDevice, StorageMap
from janus_hooks.schema import pattern

# Device nodes through which a process keeps a GPU busy, or its audio function (snd_hda_intel's unbind waits
# until every file of the card is closed).
GPU_NODE_PREFIXES = ("/dev/dri/", "/dev/nvidia", "/dev/kfd", "/dev/snd/")
# What a journal may record as a device node: a path under /dev with no "." or ".." component.
DEV_NODE = pattern(r"/dev/(?!.*(^|/)\.\.?(/|$))[A-Za-z0-9_][A-Za-z0-9_.:/+-]*", "a device node under /dev", 128)
# A sound card's nodes, as its sysfs directory names them (sound/card0/controlC0 -> /dev/snd/controlC0).
SOUND_NODE_PREFIXES = ("controlC", "pcmC", "hwC", "midiC")


def dev_node(name: str) -> str:
    """A device node as processes see it (``nvidiactl`` -> ``/dev/nvidiactl``): what /proc/<pid>/fd shows,
    whatever root janus-hooks reads the host from."""
    return f"/dev/{name}"
BOOT_FRAMEBUFFER_PREFIXES = ("efi-framebuffer.", "simple-framebuffer.", "vesa-framebuffer.")
_O_PATH = 0o10000000


def _read(path: Path, default: str = "") -> str:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return default


def _link_name(path: Path) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def _int(text: str, default: int = 0) -> int:
    try:
        return int(text)
    except ValueError:
        return default


class Host:
    """The host as seen below ``root``; ``kernel`` is where every change goes."""

    def __init__(self, root: str | os.PathLike[str] = "/", kernel: Kernel | None = None,
                 listdir: Callable[[Path], list[str]] = os.listdir) -> None:
        self.root = Path(root)
        self.kernel: Kernel = kernel or RealKernel()
        self._listdir = listdir
        # What could not be read for lack of permission (not root): the answer built from it is incomplete.
        self.denied: list[Path] = []

    def list_dir(self, path: Path) -> list[str]:
        """The names in a directory; a PermissionError is remembered in ``denied`` before it is raised."""
        try:
            return self._listdir(path)
        except PermissionError:
            self.denied.append(path)
            raise

    def unreadable(self) -> str | None:
        """What ``denied`` holds, in a few words (None: everything was readable)."""
        if not self.denied:
            return None
        proc = self.path("proc")
        fd_dirs = {p for p in self.denied if p.name == "fd" and p.parent.parent == proc}
        others = sorted({str(p) for p in self.denied if p not in fd_dirs})
        parts = [f"the open files of {len(fd_dirs)} process(es)"] if fd_dirs else []
        parts += others[:3] + ([f"{len(others) - 3} more"] if len(others) > 3 else [])
        return ", ".join(parts)

    def path(self, *parts: str) -> Path:
        """A path below the root; ``parts`` are relative (``"sys", "bus", "pci"``)."""
        return self.root.joinpath(*parts)

    # --- PCI -------------------------------------------------------------------------------------------
    def pci_dir(self, address: str) -> Path:
        return self.path("sys/bus/pci/devices", address)

    def pci_driver_dir(self, driver: str) -> Path:
        return self.path("sys/bus/pci/drivers", driver)

    def pci_probe_path(self) -> Path:
        return self.path("sys/bus/pci/drivers_probe")

    def pci_addresses(self) -> list[str]:
        try:
            return sorted(os.listdir(self.path("sys/bus/pci/devices")))
        except OSError:
            return []

    def pci_device(self, address: str) -> PciDevice | None:
        base = self.pci_dir(address)
        if not base.exists():
            return None
        group = _link_name(base / "iommu_group")
        override = _read(base / "driver_override")
        return PciDevice(
            address=address,
            vendor=_read(base / "vendor"),
            device=_read(base / "device"),
            pci_class=_read(base / "class"),
            subsystem_vendor=_read(base / "subsystem_vendor"),
            subsystem_device=_read(base / "subsystem_device"),
            driver=_link_name(base / "driver"),
            driver_override=None if override in ("", "(null)") else override,
            iommu_group=int(group) if group and group.isdigit() else None,
            boot_vga=_read(base / "boot_vga") == "1",
            reset_method=_read(base / "reset_method"),
            numa_node=_int(_read(base / "numa_node", "-1"), -1),
        )

    def pci_devices(self) -> list[PciDevice]:
        return [d for a in self.pci_addresses() if (d := self.pci_device(a)) is not None]

    # --- shared GPUs: mediated devices and SR-IOV virtual functions -------------------------------------
    def mdev_dir(self, uuid: str) -> Path:
        return self.path("sys/bus/mdev/devices", uuid)

    def mdev_type_dir(self, parent: str, mdev_type: str) -> Path:
        return self.pci_dir(parent) / "mdev_supported_types" / mdev_type

    def sriov_numvfs_path(self, parent: str) -> Path:
        return self.pci_dir(parent) / "sriov_numvfs"

    def sriov_count(self, parent: str, name: str = "sriov_numvfs") -> int | None:
        """``sriov_numvfs`` (enabled) or ``sriov_totalvfs`` (possible) of a PF; None when it has no SR-IOV."""
        text = _read(self.pci_dir(parent) / name)
        return int(text) if text.isdigit() else None

    def pci_driver(self, address: str) -> str | None:
        return _link_name(self.pci_dir(address) / "driver")

    def pci_driver_override(self, address: str) -> str | None:
        value = _read(self.pci_dir(address) / "driver_override")
        return None if value in ("", "(null)") else value

    def pci_reset_method_path(self, address: str) -> Path:
        return self.pci_dir(address) / "reset_method"

    def pci_reset_methods(self, address: str) -> str | None:
        """The function's enabled reset methods in the order the kernel tries them ("flr bus"); "" when a
        person disabled them all; None without the attribute (kernels < 5.15, or a device with no reset)."""
        try:
            return " ".join(self.pci_reset_method_path(address).read_text().split())
        except (OSError, UnicodeDecodeError):
            return None

    def pci_drivers(self) -> list[str]:
        try:
            return sorted(os.listdir(self.path("sys/bus/pci/drivers")))
        except OSError:
            return []

    def pci_driver_loaded(self, driver: str) -> bool:
        return self.pci_driver_dir(driver).is_dir()

    def pci_devices_of_module(self, module: str) -> dict[str, str]:
        """PCI devices bound right now to a driver that ``module`` provides: {address: driver}.

        Walks the (few) drivers rather than every device: a driver's directory links its devices.
        """
        bound = {}
        for driver in self.pci_drivers():
            if self.pci_driver_module(driver) != module:
                continue
            try:
                entries = os.listdir(self.pci_driver_dir(driver))
            except OSError:
                continue
            bound.update({e: driver for e in entries if e.count(":") == 2 and "." in e})
        return bound

    def pci_driver_module(self, driver: str) -> str | None:
        """The module that provides a PCI driver (bochs-drm -> bochs), or None when built in."""
        return _link_name(self.pci_driver_dir(driver) / "module")

    def iommu_enabled(self) -> bool:
        try:
            return any(os.scandir(self.path("sys/kernel/iommu_groups")))
        except OSError:
            return False

    def iommu_group_members(self, group: int) -> list[str]:
        try:
            return sorted(os.listdir(self.path("sys/kernel/iommu_groups", str(group), "devices")))
        except OSError:
            return []

    # --- consoles and framebuffers ------------------------------------------------------------------------
    def vtconsole_dir(self, name: str) -> Path:
        return self.path("sys/class/vtconsole", name)

    def vtconsoles(self) -> list[VtConsole]:
        try:
            names = sorted(os.listdir(self.path("sys/class/vtconsole")))
        except OSError:
            return []
        return [c for n in names if (c := self.vtconsole(n)) is not None]

    def vtconsole(self, name: str) -> VtConsole | None:
        base = self.vtconsole_dir(name)
        if not base.exists():
            return None
        return VtConsole(name, _read(base / "name"), _read(base / "bind") == "1")

    def platform_driver_dir(self, driver: str) -> Path:
        return self.path("sys/bus/platform/drivers", driver)

    def boot_framebuffers(self) -> list[Framebuffer]:
        base = self.path("sys/bus/platform/devices")
        try:
            names = sorted(os.listdir(base))
        except OSError:
            return []
        return [
            Framebuffer(n, _link_name(base / n / "driver"))
            for n in names
            if n.startswith(BOOT_FRAMEBUFFER_PREFIXES)
        ]

    def platform_device_exists(self, device: str) -> bool:
        return os.path.lexists(self.path("sys/bus/platform/devices", device))

    def framebuffer_driver(self, device: str) -> str | None:
        return _link_name(self.path("sys/bus/platform/devices", device, "driver"))

    def fb_names(self) -> list[str]:
        """Lines of /proc/fb: which framebuffer drivers are registered right now."""
        text = _read(self.path("proc/fb"))
        return [line.split(None, 1)[1] for line in text.splitlines() if " " in line]

    # --- DRM ------------------------------------------------------------------------------------------
    def drm_nodes_of(self, address: str) -> list[str]:
        """Device nodes (/dev/dri/card0, /dev/dri/renderD128) that belong to one PCI device."""
        nodes = []
        try:
            names = sorted(os.listdir(self.path("sys/class/drm")))
        except OSError:
            return []
        for name in names:
            if not (name.startswith("card") or name.startswith("renderD")) or "-" in name:
                continue
            if _link_name(self.path("sys/class/drm", name, "device")) == address:
                nodes.append(f"/dev/dri/{name}")
        return nodes

    def sound_nodes_of(self, address: str) -> list[str]:
        """The /dev/snd nodes of the sound cards a PCI function registered (its ``sound/cardN/`` entries)."""
        base = self.pci_dir(address) / "sound"
        nodes = []
        try:
            cards = sorted(n for n in os.listdir(base) if n.startswith("card"))
        except OSError:
            return []
        for card in cards:
            try:
                names = sorted(os.listdir(base / card))
            except OSError:
                continue
            nodes += [f"/dev/snd/{n}" for n in names if n.startswith(SOUND_NODE_PREFIXES)]
        return nodes

    def function_nodes(self, address: str) -> list[str]:
        """Every node through which a process keeps one PCI function busy: its DRM nodes, NVIDIA's per-card
        node, its sound cards' nodes."""
        nodes = self.drm_nodes_of(address) + self.sound_nodes_of(address)
        minor = self.nvidia_minor(address)
        if minor is not None and minor >= 0:
            nodes.append(dev_node(f"nvidia{minor}"))
        return nodes

    def holders_of(self, nodes: list[str]) -> list[ProcessHold]:
        """The processes holding one of ``nodes`` right now."""
        if not nodes:
            return []
        return [h for h in self.gpu_holders() if h.node in nodes]

    def nvidia_minor(self, address: str) -> int | None:
        text = _read(self.path("proc/driver/nvidia/gpus", address, "information"))
        for line in text.splitlines():
            if line.startswith("Device Minor:"):
                return _int(line.split(":", 1)[1].strip(), -1)
        return None

    # --- modules --------------------------------------------------------------------------------------
    def module(self, name: str) -> Module | None:
        base = self.path("sys/module", name)
        # Built-in "modules" have a directory but no refcnt: they cannot be unloaded.
        if not (base / "refcnt").exists():
            return None
        try:
            holders = tuple(sorted(os.listdir(base / "holders")))
        except OSError:
            holders = ()
        return Module(name, _int(_read(base / "refcnt")), holders)

    def module_dirs(self) -> list[str]:
        """Every entry of /sys/module: loaded modules and built-ins with parameters."""
        try:
            return sorted(os.listdir(self.path("sys/module")))
        except OSError:
            return []

    def module_loaded(self, name: str) -> bool:
        return self.path("sys/module", name.replace("-", "_"), "refcnt").exists()

    # --- processes, units, sessions -------------------------------------------------------------------
    def _pids(self) -> Iterator[int]:
        try:
            entries = os.listdir(self.path("proc"))
        except OSError:
            return
        for entry in entries:
            if entry.isdigit():
                yield int(entry)

    def process_command(self, pid: int) -> str:
        return _read(self.path("proc", str(pid), "comm"), "?")

    def process_cgroup(self, pid: int) -> str:
        for line in _read(self.path("proc", str(pid), "cgroup")).splitlines():
            # cgroup v2 line is "0::/path"; v1 hosts also list name=systemd with the same path.
            if line.startswith("0::") or ":name=systemd:" in line:
                return line.split(":", 2)[2]
        return ""

    def process_uid(self, pid: int) -> int | None:
        for line in _read(self.path("proc", str(pid), "status")).splitlines():
            if line.startswith("Uid:"):
                return _int(line.split()[1], -1)
        return None

    def gpu_holders(self) -> list[ProcessHold]:
        """Every process with a GPU node open (O_PATH descriptors do not count: they hold nothing)."""
        holds = []
        own = os.getpid() if self.root == Path("/") else -1
        for pid in self._pids():
            if pid == own:
                continue
            fd_dir = self.path("proc", str(pid), "fd")
            try:
                fds = self.list_dir(fd_dir)
            except OSError:  # gone meanwhile, or another user's (remembered: the answer is incomplete)
                continue
            found: dict[str, list[int]] = {}
            for fd in fds:
                try:
                    target = os.readlink(fd_dir / fd)
                except OSError:
                    continue
                if not target.startswith(GPU_NODE_PREFIXES) or self._fd_is_opath(pid, fd):
                    continue
                found.setdefault(target, []).append(int(fd))
            if not found:
                continue
            cgroup = self.process_cgroup(pid)
            command, uid = self.process_command(pid), self.process_uid(pid)
            for target, numbers in found.items():
                holds.append(ProcessHold(pid=pid, command=command, node=target, unit=_unit_of(cgroup),
                                         session=_session_of(cgroup), uid=uid, cgroup=cgroup,
                                         fds=tuple(sorted(numbers))))
        return sorted(holds, key=lambda h: (h.pid, h.node))

    def shared_with(self, keeper: ProcessHold, others: list[ProcessHold]) -> tuple[tuple[int, ...], ...]:
        """For each of ``keeper``'s descriptors of its node, the pids among ``others`` holding that very open
        file (logind's and PID 1's copies of a session's device): compared by the kernel, not guessed."""
        peers = [o for o in others if o.pid != keeper.pid and o.node == keeper.node]
        return tuple(
            tuple(o.pid for o in peers if any(self.kernel.same_open_file(keeper.pid, fd, o.pid, b) for b in o.fds))
            for fd in keeper.fds
        )

    def _fd_is_opath(self, pid: int, fd: str) -> bool:
        for line in _read(self.path("proc", str(pid), "fdinfo", fd)).splitlines():
            if line.startswith("flags:"):
                return bool(int(line.split()[1], 8) & _O_PATH)
        return False

    def systemd_running(self) -> bool:
        # sd_booted(): systemd creates this directory when it is PID 1.
        return self.path("run/systemd/system").is_dir()

    def unit_file_target(self, unit: str) -> str | None:
        """Where an alias like display-manager.service points (gdm3.service), from /etc/systemd/system."""
        return _link_name(self.systemd_unit_dir() / unit)

    def unit_exists(self, unit: str) -> bool:
        return any(
            self.path(d, unit).exists()
            for d in ("etc/systemd/system", "run/systemd/system", "lib/systemd/system", "usr/lib/systemd/system")
        )

    def logind_users(self) -> list[int]:
        """Users logind tracks (a login, or lingering): each may run a systemd user manager."""
        try:
            names = os.listdir(self.path("run/systemd/users"))
        except OSError:
            return []
        return sorted(int(n) for n in names if n.isdigit())

    def user_manager_listening(self, uid: int) -> bool:
        """A systemd user manager may answer for ``uid``: logind tracks the user and the manager's private
        socket is in the user's runtime directory. False: no ``systemctl --user`` call can help (each one
        costs a PAM session through logind, seconds on a slow machine). True still allows a manager on its
        way out."""
        return (self.path("run/systemd/users", str(uid)).is_file()
                and self.path("run/user", str(uid), "systemd/private").exists())

    def sessions(self) -> list[Session]:
        base = self.sessions_dir()
        try:
            names = sorted(n for n in os.listdir(base) if "." not in n)
        except OSError:
            return []
        sessions = []
        for name in names:
            fields = dict(
                line.split("=", 1) for line in _read(base / name).splitlines() if "=" in line
            )
            sessions.append(
                Session(name, _int(fields.get("UID", "-1"), -1), fields.get("TYPE", ""), fields.get("ACTIVE") == "1",
                        fields.get("SEAT", ""))
            )
        return sessions

    # --- hugepages -------------------------------------------------------------------------------------
    def hugepage_dir(self, size_kb: int, node: int | None) -> Path:
        leaf = f"hugepages-{size_kb}kB"
        if node is None:
            return self.path("sys/kernel/mm/hugepages", leaf)
        return self.path("sys/devices/system/node", f"node{node}", "hugepages", leaf)

    def hugepage_pool(self, size_kb: int, node: int | None = None) -> HugepagePool | None:
        base = self.hugepage_dir(size_kb, node)
        if not base.is_dir():
            return None
        return HugepagePool(size_kb, node, _int(_read(base / "nr_hugepages")), _int(_read(base / "free_hugepages")),
                            _int(_read(self.hugepage_dir(size_kb, None) / "resv_hugepages")))

    def hugepage_total(self, size_kb: int, node: int | None = None) -> int | None:
        """nr_hugepages of one pool, with a single read (the hugepage step reads it back after each write)."""
        text = _read(self.hugepage_dir(size_kb, node) / "nr_hugepages")
        return int(text) if text.isdigit() else None

    def hugepage_sizes(self) -> list[int]:
        try:
            names = os.listdir(self.path("sys/kernel/mm/hugepages"))
        except OSError:
            return []
        return sorted(int(n[len("hugepages-") : -2]) for n in names if n.startswith("hugepages-"))

    def numa_nodes(self) -> list[int]:
        try:
            names = os.listdir(self.path("sys/devices/system/node"))
        except OSError:
            return []
        return sorted(int(n[4:]) for n in names if n.startswith("node") and n[4:].isdigit())

    def _meminfo_kb(self, key: str) -> int | None:
        for line in _read(self.path("proc/meminfo")).splitlines():
            if line.startswith(f"{key}:"):
                return _int(line.split()[1], 0)
        return None

    def default_hugepage_kb(self) -> int:
        return self._meminfo_kb("Hugepagesize") or 2048

    def mem_available_kb(self) -> int | None:
        """What the kernel could give without swapping (MemAvailable), None when it does not say."""
        return self._meminfo_kb("MemAvailable")

    def mem_total_kb(self) -> int | None:
        """The RAM the kernel manages (MemTotal), None when it does not say."""
        return self._meminfo_kb("MemTotal")

    def compact_memory_path(self) -> Path:
        return self.path("proc/sys/vm/compact_memory")

    def hugetlbfs_mounted(self) -> bool:
        return any(
            len(parts) > 2 and parts[2] == "hugetlbfs"
            for parts in (line.split() for line in _read(self.path("proc/mounts")).splitlines())
        )

    # --- storage ---------------------------------------------------------------------------------------
    def storage_backing(self) -> list[BackingDevice]:
        """Every mounted filesystem and swap area, followed through dm/md/LUKS/partitions to disks and PCI
        controllers (see ``janus_hooks.host.storage``)."""
        return StorageMap(self).backing()

    def storage_controllers(self) -> dict[str, list[str]]:
        """PCI address -> what the host keeps on disks behind it ("filesystem /", "swap /dev/sda3")."""
        uses: dict[str, list[str]] = {}
        for device in self.storage_backing():
            for address in device.controllers:
                uses.setdefault(address, []).append(device.use)
        return uses

    # --- CPUs, cgroups, IRQs, workqueues ------------------------------------------------------------------
    def _cpulist(self, path: Path) -> frozenset[int]:
        try:
            return parse_cpulist(_read(path))
        except ValueError:
            return frozenset()

    def cpus_online(self) -> frozenset[int]:
        return self._cpulist(self.path("sys/devices/system/cpu/online"))

    def cpus_present(self) -> frozenset[int]:
        return self._cpulist(self.path("sys/devices/system/cpu/present"))

    def cpu_siblings(self, cpu: int) -> frozenset[int]:
        """The SMT threads sharing ``cpu``'s core (``cpu`` included); empty when the kernel does not say."""
        return self._cpulist(self.path("sys/devices/system/cpu", f"cpu{cpu}", "topology/thread_siblings_list"))

    def cpu_governor_path(self, cpu: int) -> Path:
        return self.path("sys/devices/system/cpu", f"cpu{cpu}", "cpufreq/scaling_governor")

    def cpu_governor(self, cpu: int) -> str | None:
        """The cpufreq governor of ``cpu``; None without cpufreq (VMs, some containers)."""
        return _read(self.cpu_governor_path(cpu)) or None

    def cpu_governors(self, cpu: int) -> tuple[str, ...]:
        return tuple(_read(self.path("sys/devices/system/cpu", f"cpu{cpu}",
                                     "cpufreq/scaling_available_governors")).split())

    def cgroup2(self) -> bool:
        """A cgroup v2 (unified) hierarchy at /sys/fs/cgroup: only its root has cgroup.controllers."""
        return self.path("sys/fs/cgroup/cgroup.controllers").is_file()

    def cgroup_dir(self, group: str = "") -> Path:
        return self.path("sys/fs/cgroup", group) if group else self.path("sys/fs/cgroup")

    def cgroup_subtree_controllers(self, group: str = "") -> frozenset[str]:
        return frozenset(_read(self.cgroup_dir(group) / "cgroup.subtree_control").split())

    def cgroup_children(self, group: str = "") -> list[str]:
        """The child groups of ``group`` (top-level groups for the root)."""
        base = self.cgroup_dir(group)
        try:
            return sorted(e.name for e in os.scandir(base) if e.is_dir(follow_symlinks=False))
        except OSError:
            return []

    def cgroup_cpus_path(self, group: str) -> Path:
        return self.cgroup_dir(group) / "cpuset.cpus"

    def cgroup_cpus(self, group: str) -> str | None:
        """``cpuset.cpus`` of a group as written ("" = the parent's); None when the group has no cpuset."""
        return self.read_value(self.cgroup_cpus_path(group))

    def irqs(self) -> list[int]:
        try:
            names = os.listdir(self.path("proc/irq"))
        except OSError:
            return []
        return sorted(int(n) for n in names if n.isdigit())

    def irq_affinity_path(self, irq: int) -> Path:
        return self.path("proc/irq", str(irq), "smp_affinity_list")

    def irq_affinity(self, irq: int) -> str | None:
        """``smp_affinity_list`` of one IRQ; None when the IRQ is gone."""
        return self.read_value(self.irq_affinity_path(irq))

    def default_irq_affinity_path(self) -> Path:
        return self.path("proc/irq/default_smp_affinity")

    def workqueue_mask_path(self, name: str) -> Path:
        """``workqueue``: the unbound workqueues' cpumask; ``writeback``: the flusher threads' cpumask."""
        if name == "writeback":
            return self.path("sys/bus/workqueue/devices/writeback/cpumask")
        return self.path("sys/devices/virtual/workqueue/cpumask")

    def read_value(self, path: Path) -> str | None:
        """One kernel value (a mask file) stripped; None when it cannot be read."""
        try:
            return path.read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None

    # --- boot and command line -----------------------------------------------------------------------------
    def boot_id(self) -> str:
        return _read(self.path("proc/sys/kernel/random/boot_id"), "unknown")

    def cmdline(self) -> str:
        return _read(self.path("proc/cmdline"))

    def cpu_flags(self) -> set[str]:
        for line in _read(self.path("proc/cpuinfo")).splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
        return set()

    # --- janus-hooks' own files ---------------------------------------------------------------------------
    # Root writes and trusts what is below these: each is resolved beneath the root (resolve_beneath), so a
    # link on the way that someone else owns, or that leads out of the root, is refused, not followed.
    def config_dir(self) -> Path:
        return resolve_beneath(self.root, layout.CONFIG_DIR)

    def state_dir(self) -> Path:
        return resolve_beneath(self.root, layout.STATE_DIR)

    def log_dir(self) -> Path:
        return resolve_beneath(self.root, layout.LOG_DIR)

    def libvirt_hooks_dir(self) -> Path:
        return resolve_beneath(self.root, "etc/libvirt/hooks")

    # --- what `janus-hooks install`, `check` and `status` look at ----------------------------------------
    def sessions_dir(self) -> Path:
        """logind's session state files: they change when a session starts, ends or becomes active."""
        return self.path("run/systemd/sessions")

    def udev_rules_dir(self) -> Path:
        return resolve_beneath(self.root, "etc/udev/rules.d")

    def systemd_unit_dir(self) -> Path:
        return resolve_beneath(self.root, "etc/systemd/system")

    def udev_running(self) -> bool:
        # udevd's control socket: `udevadm control` fails without it (containers, chroots).
        return self.path("run/udev/control").exists()

    def pid_file(self, daemon: str) -> Path:
        return self.path("run", f"{daemon}.pid")

    def daemon_pid(self, daemon: str) -> int | None:
        """The pid in run/<daemon>.pid if that process still runs under that name (pid files go stale)."""
        pid = _int(_read(self.pid_file(daemon)), 0)
        if pid <= 0:
            return None
        # comm is cut to 15 characters by the kernel.
        return pid if self.process_command(pid) == daemon[:15] else None

    def program(self, name: str) -> Path | None:
        """An executable installed below the root (usr/sbin/libvirtd), or None."""
        for directory in ("usr/local/sbin", "usr/local/bin", "usr/sbin", "usr/bin", "sbin", "bin"):
            candidate = self.path(directory, name)
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
        return None

    def kernel_release(self) -> str:
        return _read(self.path("proc/sys/kernel/osrelease"))

    def module_available(self, name: str) -> bool:
        """Loaded, built in, or on disk for the running kernel (modules.dep / modules.builtin)."""
        name = name.replace("-", "_")
        if self.path("sys/module", name).is_dir():
            return True
        base = self.path("lib/modules", self.kernel_release())
        for index in ("modules.builtin", "modules.dep"):
            for line in _read(base / index).splitlines():
                leaf = line.split(":", 1)[0].rsplit("/", 1)[-1]
                if leaf.split(".ko", 1)[0].replace("-", "_") == name:
                    return True
        return False

    def kvm_device(self) -> bool:
        return self.path("dev/kvm").exists()

    def vm_process(self, vm: str) -> int | None:
        """The pid of a QEMU started by libvirt for ``vm`` (``-name guest=<vm>,...``), or None."""
        for pid in self._pids():
            try:
                args = self.path("proc", str(pid), "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            for flag, value in zip(args, args[1:], strict=False):
                if flag == b"-name" and _qemu_guest_name(value.decode(errors="replace")) == vm:
                    return pid
        return None

    def vcpu_cpus(self, pid: int) -> frozenset[int] | None:
        """The cores the vCPU threads of QEMU ``pid`` may run on, as the kernel enforces it now (libvirt's pins
        and its cgroup's cpuset together): the union of the ``Cpus_allowed_list`` of the threads QEMU names
        "CPU <n>/KVM" ("/TCG" without KVM). None when ``pid`` has no such thread (gone, not QEMU)."""
        tasks = self.path("proc", str(pid), "task")
        try:
            tids = os.listdir(tasks)
        except OSError:
            return None
        cores: set[int] = set()
        found = False
        for tid in tids:
            comm = _read(tasks / tid / "comm")
            if not (comm.startswith("CPU ") and "/" in comm):
                continue
            for line in _read(tasks / tid / "status").splitlines():
                if line.startswith("Cpus_allowed_list:"):
                    try:
                        cores |= parse_cpulist(line.split(":", 1)[1])
                        found = True
                    except ValueError:
                        pass
        return frozenset(cores) if found else None


def _unit_of(cgroup: str) -> str | None:
    """The system unit a cgroup path belongs to (/system.slice/gdm.service -> gdm.service)."""
    parts = [p for p in cgroup.split("/") if p]
    if parts[:1] == ["system.slice"] and len(parts) > 1 and parts[1].endswith(".service"):
        return parts[1]
    return None


def _session_of(cgroup: str) -> str | None:
    """The logind session of a cgroup path (.../session-3.scope -> "3")."""
    for part in cgroup.split("/"):
        if part.startswith("session-") and part.endswith(".scope"):
            return part[len("session-") : -len(".scope")]
    return None


def _qemu_guest_name(value: str) -> str:
    """The guest name in QEMU's ``-name`` value: ``guest=a,,b,debug-threads=on`` -> ``a,b``."""
    if value.startswith("guest="):
        value = value[len("guest="):]
    name, i = [], 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1 : i + 2] != ",":
                break
            i += 1
        name.append(value[i])
        i += 1
    return "".join(name)
