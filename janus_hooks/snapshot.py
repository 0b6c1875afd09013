"""One read of everything the planner needs, so that planning is a pure function of it."""

from __future__ import annotations

from dataclasses import dataclass, field

from janus_hooks.gpu import backend_for, nodes_for
from janus_hooks.gpu.amdgpu import vendor_reset_family
from janus_hooks.host import (
    Framebuffer,
    Host,
    HugepagePool,
    Module,
    PciDevice,
    ProcessHold,
    Session,
    VtConsole,
)
from janus_hooks.host.critical import CriticalDevices, critical_devices

DISPLAY_MANAGER_ALIAS = "display-manager.service"
KNOWN_DISPLAY_MANAGERS = (
    "gdm.service", "gdm3.service", "sddm.service", "lightdm.service", "lxdm.service", "xdm.service",
    "ly.service", "greetd.service", "cosmic-greeter.service", "slim.service",
)


@dataclass(frozen=True)
class CpuState:
    """What CPU isolation plans from: cores, SMT threads, cgroups, cpufreq and the other VMs' cores."""

    online: frozenset[int]
    present: frozenset[int]
    siblings: dict[int, frozenset[int]]
    governors: dict[int, str]  # cores with cpufreq: their governor now
    available_governors: dict[int, tuple[str, ...]]
    cgroup2: bool
    root_controllers: frozenset[str]  # the root cgroup's cgroup.subtree_control
    cpuset_groups: tuple[str, ...]  # top-level cgroups that have a cpuset.cpus
    default_irq_affinity: bool  # /proc/irq/default_smp_affinity exists
    workqueue_masks: tuple[str, ...]  # "workqueue", "writeback": the cpumask files that exist
    irqbalance_pid: int | None  # a running irqbalance without systemd
    claims: dict[str, frozenset[int]]  # cores other running VMs keep: {vm: cores}

    @classmethod
    def read(cls, host: Host, claims: dict[str, frozenset[int]] | None = None) -> CpuState:
        online = host.cpus_online()
        governors = {c: g for c in sorted(online) if (g := host.cpu_governor(c)) is not None}
        cgroup2 = host.cgroup2()
        return cls(
            online=online,
            present=host.cpus_present() or online,
            siblings={c: host.cpu_siblings(c) for c in sorted(online)},
            governors=governors,
            available_governors={c: host.cpu_governors(c) for c in governors},
            cgroup2=cgroup2,
            root_controllers=host.cgroup_subtree_controllers() if cgroup2 else frozenset(),
            cpuset_groups=tuple(g for g in host.cgroup_children() if host.cgroup_cpus(g) is not None)
            if cgroup2 else (),
            default_irq_affinity=host.read_value(host.default_irq_affinity_path()) is not None,
            workqueue_masks=tuple(n for n in ("workqueue", "writeback")
                                  if host.read_value(host.workqueue_mask_path(n)) is not None),
            irqbalance_pid=host.daemon_pid("irqbalance"),
            claims=dict(claims or {}),
        )


@dataclass(frozen=True)
class HostSnapshot:
    devices: dict[str, PciDevice]
    groups: dict[int, tuple[str, ...]]
    vtconsoles: tuple[VtConsole, ...]
    framebuffers: tuple[Framebuffer, ...]
    drm_nodes: dict[str, tuple[str, ...]]  # address -> /dev/dri nodes
    nvidia_minors: dict[str, int]
    driver_modules: dict[str, str | None]  # driver -> module providing it
    modules: dict[str, Module]
    module_dirs: frozenset[str]  # every entry of /sys/module: loaded modules and built-ins with parameters
    pci_drivers: frozenset[str]  # every registered PCI driver
    holders: tuple[ProcessHold, ...]
    sessions: tuple[Session, ...]
    systemd: bool
    display_manager: str | None  # the unit display-manager.service points to, or a known DM that exists
    existing_units: frozenset[str]
    hugepage_pools: dict[tuple[int, int | None], HugepagePool]
    default_hugepage_kb: int
    mem_available_kb: int | None
    numa_nodes: tuple[int, ...]
    boot_id: str
    claims: dict[str, str] = field(default_factory=dict)  # address -> VM whose journal holds it
    # (pid, node) of PID 1 / systemd-logind -> per descriptor, the pids holding that very open file (kcmp).
    shared_files: dict[tuple[int, str], tuple[tuple[int, ...], ...]] = field(default_factory=dict)
    cpu: CpuState | None = None  # read only when a VM may be isolated
    sound_nodes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # address -> its cards' /dev/snd nodes
    users: tuple[int, ...] = ()  # uids logind tracks (logged in or lingering)
    # (size kB, node) -> pages other VMs' open journals added whose QEMU has not started: free in the pool,
    # but promised (see JournalStore.pending_hugepages).
    pending_hugepages: dict[tuple[int, int | None], int] = field(default_factory=dict)
    critical: CriticalDevices = field(default_factory=CriticalDevices)  # what the host cannot lose
    # address -> reset_method ("bus"; None: no such attribute) of the GPUs known to need vendor-reset.
    reset_methods: dict[str, str | None] = field(default_factory=dict)

    def function_nodes(self, address: str) -> tuple[str, ...]:
        """Every node through which a process keeps one PCI function busy: a card's, or its sound card's."""
        dev = self.devices.get(address)
        card = self.card_nodes(dev) if dev is not None and dev.is_display else ()
        return card + self.sound_nodes.get(address, ())

    def card_nodes(self, gpu: PciDevice) -> tuple[str, ...]:
        """The device nodes of one card: its /dev/dri nodes and the vendor's per-card ones (/dev/nvidiaN)."""
        return self.drm_nodes.get(gpu.address, ()) + nodes_for(backend_for(gpu.driver),
                                                               self.nvidia_minors.get(gpu.address))

    @classmethod
    def read(cls, host: Host, claims: dict[str, str] | None = None,
             units_of_interest: tuple[str, ...] = (), cpu: CpuState | None = None) -> HostSnapshot:
        devices = {d.address: d for d in host.pci_devices()}
        groups: dict[int, tuple[str, ...]] = {}
        for dev in devices.values():
            if dev.iommu_group is not None and dev.iommu_group not in groups:
                groups[dev.iommu_group] = tuple(host.iommu_group_members(dev.iommu_group))
        drivers = {d.driver for d in devices.values() if d.driver}
        module_names = host.module_dirs()
        modules = {m.name: m for n in module_names if (m := host.module(n)) is not None}
        pools = {}
        for size in host.hugepage_sizes():
            for node in (None, *host.numa_nodes()):
                pool = host.hugepage_pool(size, node)
                if pool is not None:
                    pools[(size, node)] = pool
        systemd = host.systemd_running()
        dm = host.unit_file_target(DISPLAY_MANAGER_ALIAS)
        if dm is None:
            dm = next((u for u in KNOWN_DISPLAY_MANAGERS if host.unit_exists(u)), None)
        holders = host.gpu_holders()
        others = [h for h in holders if not h.session_device_keeper]
        shared = {(h.pid, h.node): host.shared_with(h, others) for h in holders if h.session_device_keeper}
        candidates = set(KNOWN_DISPLAY_MANAGERS) | set(units_of_interest) | {"nvidia-persistenced.service"}
        if cpu is not None:
            from janus_hooks.actions.cpu import IRQBALANCE_UNIT  # CPU isolation's module: loaded when planned

            candidates.add(IRQBALANCE_UNIT)
        return cls(
            devices=devices,
            groups=groups,
            vtconsoles=tuple(host.vtconsoles()),
            framebuffers=tuple(host.boot_framebuffers()),
            drm_nodes={a: tuple(host.drm_nodes_of(a)) for a, d in devices.items() if d.is_display},
            nvidia_minors={
                a: m for a, d in devices.items() if d.driver == "nvidia" and (m := host.nvidia_minor(a)) is not None
            },
            driver_modules={d: host.pci_driver_module(d) for d in drivers},
            modules=modules,
            module_dirs=frozenset(module_names),
            pci_drivers=frozenset(host.pci_drivers()),
            holders=tuple(holders),
            sessions=tuple(host.sessions()),
            systemd=systemd,
            display_manager=dm,
            existing_units=frozenset(u for u in candidates if host.unit_exists(u)),
            hugepage_pools=pools,
            default_hugepage_kb=host.default_hugepage_kb(),
            mem_available_kb=host.mem_available_kb(),
            numa_nodes=tuple(host.numa_nodes()),
            boot_id=host.boot_id(),
            claims=dict(claims or {}),
            shared_files=shared,
            cpu=cpu,
            sound_nodes={a: nodes for a in devices if (nodes := tuple(host.sound_nodes_of(a)))},
            users=tuple(host.logind_users()),
            critical=critical_devices(host),
            reset_methods={a: host.pci_reset_methods(a) for a, d in devices.items()
                           if vendor_reset_family(d.vendor, d.device)},
        )
