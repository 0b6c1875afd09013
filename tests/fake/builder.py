"""Builders for realistic fake hosts: the tree a real kernel would show, plus the world that animates it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fake.world import (
    LOGIND_PID,
    UNIT_STATE,
    link,
    manager_socket,
    open_fd,
    save_world,
    session_device_file,
    session_file,
    spawn_process,
    write,
)

BOOT_ID = "6b1e2c1a-0000-4000-8000-00000000b007"

FB_KINDS = {
    # kind: (platform device, driver name, /proc/fb name)
    "efifb": ("efi-framebuffer.0", "efi-framebuffer", "EFI VGA"),
    "simplefb": ("simple-framebuffer.0", "simple-framebuffer", "simple"),
    "simpledrm": ("simple-framebuffer.0", "simple-framebuffer", "simpledrmdrmfb"),
    "vesafb": ("vesa-framebuffer.0", "vesa-framebuffer", "VESA VGA"),
}


@dataclass
class HostBuilder:
    root: Path
    world: dict[str, Any] = field(default_factory=lambda: {
        "devices": {}, "modules": {}, "nodes": {}, "units": {}, "memory": {}, "commands": {},
        "session_processes": {},
    })
    systemd: bool = True

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        for d in ("sys/bus/pci/devices", "sys/bus/pci/drivers", "sys/kernel/iommu_groups", "sys/module",
                  "sys/class/vtconsole", "sys/class/drm", "sys/bus/platform/devices", "proc", "etc"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        # What `janus-hooks install` leaves: private state and log directories.
        for d in ("var/lib/janus-hooks", "var/log/janus-hooks"):
            (self.root / d).mkdir(parents=True, mode=0o700, exist_ok=True)
        write(self.root / "sys/bus/pci/drivers_probe", "")
        write(self.root / "proc/sys/kernel/random/boot_id", BOOT_ID + "\n")
        write(self.root / "proc/cmdline", "BOOT_IMAGE=/vmlinuz root=/dev/sda1 intel_iommu=on iommu=pt\n")
        write(self.root / "proc/meminfo",
              "MemTotal:       32768000 kB\nMemAvailable:   30000000 kB\nHugepagesize:       2048 kB\n")
        write(self.root / "proc/sys/vm/compact_memory", "")
        write(self.root / "proc/cpuinfo", "processor\t: 0\nflags\t\t: fpu vme vmx sse sse2\n")

    # --- PCI and modules -----------------------------------------------------------------------------
    def module(self, name: str, drivers: tuple[str, ...] = (), deps: tuple[str, ...] = (), loaded: bool = True,
               softdeps: tuple[str, ...] = ()) -> HostBuilder:
        self.world["modules"][name] = {"drivers": list(drivers), "deps": list(deps), "softdeps": list(softdeps)}
        if loaded:
            for dep in deps:
                link(self.root / "sys/module" / dep / "holders" / name, f"../../{name}")
            write(self.root / "sys/module" / name / "refcnt", "0\n")
            (self.root / "sys/module" / name / "holders").mkdir(parents=True, exist_ok=True)
            for driver in drivers:
                ddir = self.root / "sys/bus/pci/drivers" / driver
                write(ddir / "bind", "")
                write(ddir / "unbind", "")
                link(ddir / "module", f"../../../../module/{name}")
        return self

    def vfio_modules(self) -> HostBuilder:
        """vfio-pci and its IOMMU backend on disk, not loaded (as on a desktop that never ran a VM)."""
        self.module("vfio", loaded=False)
        self.module("vfio_pci_core", deps=("vfio",), loaded=False)
        # Loading vfio-pci also loads vfio_iommu_type1, as it did on the lab's 6.1 kernel.
        self.module("vfio_pci", drivers=("vfio-pci",), deps=("vfio_pci_core",), loaded=False,
                    softdeps=("vfio_iommu_type1",))
        self.module("vfio_iommu_type1", deps=("vfio",), loaded=False)
        return self

    def pci(self, address: str, vendor: str, device: str, pci_class: str, driver: str | None, group: int,
            boot_vga: bool | None = None, reset: str = "flr bus", numa: int = -1) -> HostBuilder:
        base = self.root / "sys/bus/pci/devices" / address
        for name, value in (("vendor", vendor), ("device", device), ("class", pci_class),
                            ("subsystem_vendor", vendor), ("subsystem_device", "0x0001"),
                            ("driver_override", "(null)"), ("reset_method", reset), ("numa_node", str(numa))):
            write(base / name, value + "\n")
        if boot_vga is not None:
            write(base / "boot_vga", "1\n" if boot_vga else "0\n")
        link(base / "iommu_group", f"../../../../kernel/iommu_groups/{group}")
        link(self.root / "sys/kernel/iommu_groups" / str(group) / "devices" / address,
             f"../../../../bus/pci/devices/{address}")
        self.world["devices"][address] = {"native": driver, "resets": reset.split()}
        if driver:
            link(base / "driver", f"../../../../bus/pci/drivers/{driver}")
            link(self.root / "sys/bus/pci/drivers" / driver / address, f"../../../../devices/{address}")
        return self

    def vendor_reset(self, address: str, loaded: bool = True) -> HostBuilder:
        """vendor-reset knows ``address`` (its device-specific reset works while the module is loaded), and
        the module is loaded or only installed."""
        self.world["devices"][address]["vendor_reset"] = True
        if loaded:
            self.module("vendor_reset")
        return self

    def drm(self, card: int, address: str) -> HostBuilder:
        for name in (f"card{card}", f"renderD{128 + card}"):
            link(self.root / "sys/class/drm" / name / "device", f"../../../bus/pci/devices/{address}")
            self.world["nodes"][f"/dev/dri/{name}"] = address
        return self

    def sound(self, card: int, address: str, pcms: tuple[str, ...] = ("D0p",)) -> HostBuilder:
        """A sound card registered by a PCI function (its ``sound/cardN/`` entries and /dev/snd nodes)."""
        for name in (f"controlC{card}", f"hwC{card}D0", *(f"pcmC{card}{p}" for p in pcms)):
            (self.root / "sys/bus/pci/devices" / address / "sound" / f"card{card}" / name).mkdir(parents=True,
                                                                                               exist_ok=True)
            self.world["nodes"][f"/dev/snd/{name}"] = address
        return self

    def nvidia_minor(self, address: str, minor: int) -> HostBuilder:
        write(self.root / "proc/driver/nvidia/gpus" / address / "information",
              f"Model: \t\t NVIDIA GeForce RTX 3060 Ti\nDevice Minor: \t {minor}\nBus Location: \t {address}\n")
        return self

    def node(self, node: str, owner: str) -> HostBuilder:
        """A device node owned by a module (``/dev/nvidiactl`` -> nvidia) or a PCI device."""
        self.world["nodes"][node] = owner
        return self

    # --- consoles ---------------------------------------------------------------------------------------
    def fbcon(self, bound: bool = True) -> HostBuilder:
        # As on the real 6.1 kernel: fbcon is vtcon0, the dummy console takes over when it is unbound.
        write(self.root / "sys/class/vtconsole/vtcon0/name", "(M) frame buffer device\n")
        write(self.root / "sys/class/vtconsole/vtcon0/bind", "1\n" if bound else "0\n")
        write(self.root / "sys/class/vtconsole/vtcon1/name", "(M) dummy device\n")
        write(self.root / "sys/class/vtconsole/vtcon1/bind", "0\n" if bound else "1\n")
        return self

    def framebuffer(self, kind: str, handover: bool = False) -> HostBuilder:
        """``handover``: as kernels >= 6.0 do, the native driver binding the boot GPU removes the device."""
        device, driver, fbname = FB_KINDS[kind]
        if handover:
            self.world["fb_handover"] = True
        ddir = self.root / "sys/bus/platform/drivers" / driver
        write(ddir / "bind", "")
        write(ddir / "unbind", "")
        link(self.root / "sys/bus/platform/devices" / device / "driver", f"../../drivers/{driver}")
        write(self.root / "proc/fb", f"0 {fbname}\n")
        return self

    # --- processes, units, sessions --------------------------------------------------------------------
    def unit(self, unit: str, processes: list[dict[str, Any]] = (), active: bool = True,
             stuck: bool = False) -> HostBuilder:
        procs = [{**p, "cgroup": p.get("cgroup", f"/system.slice/{unit}")} for p in processes]
        self.world["units"][unit] = {"processes": procs, "stuck": stuck}
        write(self.root / "lib/systemd/system" / unit, f"[Service]\nExecStart=/usr/sbin/{unit}\n")
        write(self.root / UNIT_STATE / unit, "active\n" if active else "inactive\n")
        if active:
            for proc in procs:
                spawn_process(self.root, proc)
        return self

    def display_manager(self, unit: str) -> HostBuilder:
        link(self.root / "etc/systemd/system/display-manager.service", f"/lib/systemd/system/{unit}")
        return self

    def process(self, pid: int, comm: str, fds: list[str], cgroup: str = "/", uid: int = 0,
                opath: bool = False) -> HostBuilder:
        spawn_process(self.root, {"pid": pid, "comm": comm, "fds": fds, "cgroup": cgroup, "uid": uid,
                                  "opath": opath})
        return self

    def session(self, sid: str, uid: int, kind: str, processes: list[dict[str, Any]] = (),
                devices: tuple[str, ...] = (), unit: str | None = None) -> HostBuilder:
        """A logind session. ``devices``: nodes its processes took through logind (TakeDevice): logind and
        PID 1's fd store keep the same open file while the session lives. ``unit``: the display manager
        whose stop ends the session and whose start (autologin) brings it back."""
        write(self.root / "run/systemd/sessions" / sid, session_file(sid, uid, kind))
        procs = []
        for p in processes:
            fds = [{"node": f, "file": session_device_file(sid, f)} if f in devices else f for f in p.get("fds", [])]
            procs.append({**p, "fds": fds, "uid": uid,
                          "cgroup": p.get("cgroup", f"/user.slice/user-{uid}.slice/session-{sid}.scope")})
        self.world["session_processes"][sid] = procs
        self.world.setdefault("sessions", {})[sid] = {"uid": uid, "kind": kind, "devices": list(devices),
                                                      "unit": unit}
        for proc in procs:
            spawn_process(self.root, proc)
        if devices:
            self.logind()
            for node in devices:
                for pid in (1, LOGIND_PID):
                    open_fd(self.root, pid, node, session_device_file(sid, node))
        return self

    def user_manager(self, uid: int, units: dict[str, list[dict[str, Any]]], linger: bool = False) -> HostBuilder:
        """``user@UID.service`` with its units (name -> processes, in ``user@UID.service/<slice>/<unit>``).
        Without ``linger`` it stops when the user's last session ends and starts with the next one."""
        manager = f"user@{uid}.service"
        base = f"/user.slice/user-{uid}.slice/{manager}"
        self.unit(manager, [{"pid": 7000 + uid % 1000, "comm": "systemd", "fds": [], "cgroup": f"{base}/init.scope"}])
        write(self.root / "run/systemd/users" / str(uid), f"NAME=user{uid}\nSTATE=active\n")
        write(self.root / manager_socket(uid), "")
        self.world.setdefault("user_units", {})[str(uid)] = {}
        for unit, procs in units.items():
            slice_ = "app.slice" if unit.startswith("app-") else "session.slice"
            self.world["user_units"][str(uid)][unit] = [
                {**p, "uid": uid, "cgroup": f"{base}/{slice_}/{unit}"} for p in procs]
            write(self.root / UNIT_STATE / f"user-{uid}" / unit, "active\n")
            for proc in self.world["user_units"][str(uid)][unit]:
                spawn_process(self.root, proc)
        self.world.setdefault("linger", {})[str(uid)] = linger
        return self

    def logind(self) -> HostBuilder:
        """PID 1 (systemd, with logind's fd store) and systemd-logind, holding nothing yet."""
        if not (self.root / "proc/1").is_dir():
            spawn_process(self.root, {"pid": 1, "comm": "systemd", "fds": [], "cgroup": "/init.scope"})
            spawn_process(self.root, {"pid": LOGIND_PID, "comm": "systemd-logind", "fds": [],
                                      "cgroup": "/system.slice/systemd-logind.service"})
        return self

    def command(self, argv: str, kill: list[dict[str, Any]] = (), spawn: list[dict[str, Any]] = (),
                status: int = 0) -> HostBuilder:
        self.world["commands"][argv] = {"kill": list(kill), "spawn": list(spawn), "status": status}
        return self

    # --- memory ---------------------------------------------------------------------------------------
    def hugepages(self, nodes: dict[int, int], size_kb: int = 2048, fragmented: dict[int, int] | None = None,
                  total: dict[int, int] | None = None) -> HostBuilder:
        """Node -> pages the node can give; ``fragmented`` pages only after compaction."""
        fragmented = fragmented or {}
        total = total or {}
        self.world["memory"][str(size_kb)] = {
            str(n): {"pages": p, "fragmented": fragmented.get(n, 0)} for n, p in nodes.items()
        }
        for n in nodes:
            base = self.root / f"sys/devices/system/node/node{n}/hugepages/hugepages-{size_kb}kB"
            write(base / "nr_hugepages", f"{total.get(n, 0)}\n")
            write(base / "free_hugepages", f"{total.get(n, 0)}\n")
        glob = self.root / f"sys/kernel/mm/hugepages/hugepages-{size_kb}kB"
        write(glob / "nr_hugepages", f"{sum(total.values())}\n")
        write(glob / "free_hugepages", f"{sum(total.values())}\n")
        return self

    # --- storage ---------------------------------------------------------------------------------------
    def disk(self, name: str, controller: str | None, partitions: int = 0, major: int = 8,
             minor: int = 0) -> HostBuilder:
        """A whole disk under a PCI controller (None: a virtual disk such as zram), with numbered partitions
        (``sda1``; ``nvme0n1p1`` for names ending in a digit), registered as the kernel does in
        sys/devices, sys/class/block and sys/dev/block."""
        parent = f"devices/pci0000:00/{controller}/host0/target0:0:0/0:0:0:0" if controller else "devices/virtual"
        disk_dir = f"{parent}/block/{name}"
        self._block(name, disk_dir, major, minor)
        sep = "p" if name[-1].isdigit() else ""
        for n in range(1, partitions + 1):
            part = f"{name}{sep}{n}"
            self._block(part, f"{disk_dir}/{part}", major, minor + n)
            write(self.root / "sys" / disk_dir / part / "partition", f"{n}\n")
        return self

    def stacked(self, name: str, slaves: tuple[str, ...], minor: int, dm_name: str | None = None) -> HostBuilder:
        """A device-mapper (``dm-N``, with ``dm_name`` as /dev/mapper shows it) or md device over ``slaves``."""
        major = 253 if name.startswith("dm-") else 9
        self._block(name, f"devices/virtual/block/{name}", major, minor)
        base = self.root / "sys/devices/virtual/block" / name
        (base / "slaves").mkdir(parents=True, exist_ok=True)
        for slave in slaves:
            link(base / "slaves" / slave, f"../../../../../class/block/{slave}")
            # The kernel links both ways: the slave names what is stacked on it.
            link(self.root / "sys/class/block" / slave / "holders" / name, f"../../../virtual/block/{name}")
        if dm_name:
            write(base / "dm/name", dm_name + "\n")
        return self

    def _block(self, name: str, sys_dir: str, major: int, minor: int) -> None:
        write(self.root / "sys" / sys_dir / "dev", f"{major}:{minor}\n")
        link(self.root / "sys/class/block" / name, f"../../{sys_dir}")
        link(self.root / "sys/dev/block" / f"{major}:{minor}", f"../../{sys_dir}")

    def mount(self, point: str, source: str, fstype: str = "ext4", devnum: str | None = None) -> HostBuilder:
        """One line of /proc/1/mountinfo; ``devnum`` defaults to the source's sysfs dev (0:N for btrfs)."""
        if devnum is None:
            dev_file = self.root / "sys/class/block" / source.rsplit("/", 1)[-1] / "dev"
            devnum = dev_file.read_text().strip() if dev_file.exists() else "0:40"
        mounts = self.root / "proc/1/mountinfo"
        lines = mounts.read_text() if mounts.exists() else ""
        n = lines.count("\n") + 20
        escaped = point.replace(" ", "\\040")
        write(mounts, lines + f"{n} 1 {devnum} / {escaped} rw,relatime shared:1 - {fstype} {source} rw\n")
        return self

    def swap(self, path: str, kind: str = "partition") -> HostBuilder:
        swaps = self.root / "proc/swaps"
        lines = swaps.read_text() if swaps.exists() else "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
        write(swaps, lines + f"{path}\t\t\t\t{kind}\t\t8388604\t\t0\t\t-2\n")
        return self

    # --- CPUs, cgroups, IRQs ------------------------------------------------------------------------------
    def cpus(self, count: int = 8, smt: bool = True, offline: tuple[int, ...] = (), governor: str | None = "powersave",
             cgroup2: bool = True, irqs: dict[int, str] | None = None, refusing: tuple[int, ...] = (0, 2, 124),
             workqueues: bool = True) -> HostBuilder:
        """``count`` cores (with ``smt``, cores i and i+count/2 are one physical core's two threads), cpufreq
        with ``governor`` (None: no cpufreq, as in a VM), a cgroup v2 tree as systemd or an init without it
        leaves it, IRQs (``refusing``: the kernel answers EIO when they are moved, like the timer and managed
        queue IRQs) and the workqueue cpumasks."""
        base = self.root / "sys/devices/system/cpu"
        everything = f"0-{count - 1}"
        online = sorted(set(range(count)) - set(offline))
        write(base / "present", everything + "\n")
        write(base / "possible", everything + "\n")
        write(base / "online", ",".join(map(str, online)) + "\n")
        half = count // 2
        for cpu in range(count):
            siblings = sorted({cpu, (cpu + half) % count}) if smt else [cpu]
            write(base / f"cpu{cpu}/topology/thread_siblings_list", ",".join(map(str, siblings)) + "\n")
            if governor and cpu in online:
                write(base / f"cpu{cpu}/cpufreq/scaling_governor", governor + "\n")
                write(base / f"cpu{cpu}/cpufreq/scaling_available_governors", "performance powersave\n")
        mask = f"{(1 << count) - 1:x}"
        if cgroup2:
            cg = self.root / "sys/fs/cgroup"
            write(cg / "cgroup.controllers", "cpuset cpu io memory hugetlb pids rdma misc\n")
            if self.systemd:
                # systemd enables cpuset for the top-level groups only once a unit sets AllowedCPUs.
                write(cg / "cgroup.subtree_control", "cpu io memory pids\n")
                groups = ("init.scope", "system.slice", "user.slice", "machine.slice")
                for g in groups:
                    write(cg / g / "cgroup.controllers", "cpu io memory pids\n")
            else:
                write(cg / "cgroup.subtree_control", "cpuset cpu io memory pids\n")
                for g in ("openrc.sshd", "openrc.xdm", "machine"):
                    write(cg / g / "cgroup.controllers", "cpuset cpu io memory pids\n")
                    write(cg / g / "cpuset.cpus", "\n")
        irqs = irqs if irqs is not None else {
            0: everything, 1: everything, 2: everything, 8: everything, 9: everything, 16: "0-1",
            120: everything, 121: "2", 122: "3", 123: "6-7", 124: "2",
        }
        for irq, affinity in irqs.items():
            write(self.root / f"proc/irq/{irq}/smp_affinity_list", affinity + "\n")
        write(self.root / "proc/irq/default_smp_affinity", mask + "\n")
        self.world["irqs_refusing"] = list(refusing)
        if workqueues:
            write(self.root / "sys/devices/virtual/workqueue/cpumask", mask + "\n")
            write(self.root / "sys/bus/workqueue/devices/writeback/cpumask", mask + "\n")
        return self

    def build(self) -> Path:
        if self.systemd:
            (self.root / "run/systemd/system").mkdir(parents=True, exist_ok=True)
        save_world(self.root, self.world)
        return self.root
