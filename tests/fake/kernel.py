"""FakeKernel: the ``Kernel`` seam played on a tree, with the kernel's rules and injectable faults.

Rules it enforces (the ones janus-hooks depends on, as seen on a real 6.1 kernel):
- ``drivers/<d>/unbind`` moves the device's ``driver`` link away; ENODEV when not bound to ``d``;
- unbinding a function whose sound card's nodes a process holds blocks (as snd_hda_intel does): the write
  raises KernelTimeout with a writer process that finishes the unbind once the last holder is gone;
- ``drivers_probe`` binds an unbound device to its ``driver_override`` if that driver is registered,
  otherwise (override empty) to its native driver if loaded; nothing bound is not an error;
- ``modprobe -r`` fails while the module has holders or a process holds one of its devices' nodes;
  loading a module registers its drivers and probes the devices they match;
- ``vtconN/bind``: 0 hands the consoles to the other vtconsole, 1 is ignored (as 6.1 does for fbcon);
- platform ``bind``/``unbind`` move the binding;
- a native driver binding the boot GPU removes the boot framebuffer's platform device when the host was
  built with ``handover`` (kernels >= 6.0);
- ``nr_hugepages`` grants only what the node's memory allows; compaction frees fragmented pages;
- ``reset_method`` takes methods the device has (``device_specific`` only while vendor-reset, which knows
  the device, is loaded), "default" or nothing (every method disabled); EINVAL otherwise;
- ``scaling_governor`` takes only an available governor (EINVAL);
- ``smp_affinity_list`` and ``cpuset.cpus`` take a cpulist of online cores (EINVAL otherwise; an empty
  ``cpuset.cpus`` means the parent's, refused with ENOSPC once set while processes are in the group) and read
  back normalised; IRQs listed as refusing answer EIO;
- ``default_smp_affinity`` and workqueue ``cpumask`` take a hex mask with an online core in it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from janus_hooks.cpuset import format_cpulist, format_cpumask, parse_cpulist, parse_cpumask
from janus_hooks.errors import KernelError, KernelTimeout
from tests.fake.world import (
    STATE,
    block_write,
    held_sound_nodes,
    link,
    load_world,
    open_file_id,
    rmtree,
    unlink,
    write,
)

Fault = Callable[[int, str, str], bool]  # (operation number, operation, target) -> fail?


class FakeKernel:
    def __init__(self, root: Path, fail_at: int | None = None, fault: Fault | None = None) -> None:
        self.root = Path(root)
        self.ops = 0
        self.timeouts: tuple[float, float, float] | None = None
        self.log: list[tuple[str, str, str]] = []
        self._fail_at = fail_at
        self._fault = fault

    # --- the Kernel seam -------------------------------------------------------------------------
    def write(self, path: Path, value: str) -> None:
        rel = os.path.relpath(path, self.root)
        self._count("write", rel)
        self.log.append(("write", rel, value))
        handler = self._dispatch(rel)
        if handler is None:
            if not Path(path).exists():
                raise KernelError(f"cannot open {path}: No such file or directory")
            Path(path).write_text(value.strip() + "\n")
            return
        handler(rel, value.strip())

    def load_module(self, name: str) -> None:
        self._count("load", name)
        self.log.append(("load", name, ""))
        self._load(name.replace("-", "_"))

    def unload_module(self, name: str) -> None:
        self._count("unload", name)
        self.log.append(("unload", name, ""))
        name = name.replace("-", "_")
        if not (self.root / "sys/module" / name / "refcnt").exists():
            raise KernelError(f"unloading module {name} failed: modprobe: FATAL: Module {name} is not loaded")
        holders = os.listdir(self.root / "sys/module" / name / "holders")
        if holders:
            raise KernelError(f"unloading module {name} failed: modprobe: FATAL: Module {name} is in use")
        busy = self._processes_using_module(name)
        if busy:
            raise KernelError(f"unloading module {name} failed: modprobe: FATAL: Module {name} is in use")
        self._unload(name)

    def use_timeouts(self, driver: float, hugepages: float, module: float) -> None:
        # A write that would block raises KernelTimeout at once here: the deadlines only matter for the record.
        self.timeouts = (driver, hugepages, module)

    def same_open_file(self, pid_a: int, fd_a: int, pid_b: int, fd_b: int) -> bool:
        """kcmp(KCMP_FILE) played: the fake's processes record which open file each descriptor is."""
        a = open_file_id(self.root, pid_a, fd_a)
        return a is not None and a == open_file_id(self.root, pid_b, fd_b)

    # --- bookkeeping --------------------------------------------------------------------------------
    def _count(self, op: str, target: str) -> None:
        self.ops += 1
        if self._fail_at == self.ops or (self._fault and self._fault(self.ops, op, target)):
            raise KernelError(f"injected fault at operation {self.ops}: {op} {target}")

    def _world(self) -> dict[str, Any]:
        return load_world(self.root)

    def _dispatch(self, rel: str):
        parts = rel.split("/")
        if rel == "sys/bus/pci/drivers_probe":
            return self._probe
        if rel.startswith("sys/bus/pci/drivers/") and parts[-1] in ("unbind", "bind"):
            return self._pci_bind
        if rel.startswith("sys/bus/pci/devices/") and parts[-1] == "driver_override":
            return self._override
        if rel.startswith("sys/class/vtconsole/") and parts[-1] == "bind":
            return self._vtcon
        if rel.startswith("sys/bus/platform/drivers/") and parts[-1] in ("unbind", "bind"):
            return self._platform_bind
        if parts[-1] == "nr_hugepages":
            return self._hugepages
        if rel == "proc/sys/vm/compact_memory":
            return self._compact
        if parts[-1] == "scaling_governor":
            return self._governor
        if rel.startswith("proc/irq/") and parts[-1] == "smp_affinity_list":
            return self._irq_affinity
        if rel.startswith("sys/fs/cgroup/") and parts[-1] == "cpuset.cpus":
            return self._cpuset
        if rel == "proc/irq/default_smp_affinity" or parts[-1] == "cpumask":
            return self._cpumask
        if parts[-1] == "create" and "mdev_supported_types" in parts:
            return self._mdev_create
        if rel.startswith("sys/bus/mdev/devices/") and parts[-1] == "remove":
            return self._mdev_remove
        if parts[-1] == "sriov_numvfs":
            return self._sriov_numvfs
        if rel.startswith("sys/bus/pci/devices/") and parts[-1] == "reset_method":
            return self._reset_method
        return None

    # --- shared GPUs ------------------------------------------------------------------------------------
    def _mdev_create(self, rel: str, value: str) -> None:
        """mdev's create: one instance per write, named by the UUID written, while the type has room."""
        type_dir = self.root / os.path.dirname(rel)
        available = int((type_dir / "available_instances").read_text())
        device = self.root / "sys/bus/mdev/devices" / value
        if device.exists():
            raise self._errno(rel, value, errno.EEXIST)
        if available < 1:
            raise self._errno(rel, value, errno.ENOSPC)
        device.mkdir(parents=True)
        (device / "remove").write_text("")
        (device / "mdev_type").write_text(os.path.dirname(rel) + "\n")  # where its instance goes back to
        (type_dir / "available_instances").write_text(f"{available - 1}\n")

    def _mdev_remove(self, rel: str, value: str) -> None:
        device = self.root / os.path.dirname(rel)
        type_dir = self.root / (device / "mdev_type").read_text().strip()
        rmtree(device)
        available = int((type_dir / "available_instances").read_text())
        (type_dir / "available_instances").write_text(f"{available + 1}\n")

    def _sriov_numvfs(self, rel: str, value: str) -> None:
        """The kernel changes the number of VFs only from or to zero, and at most to sriov_totalvfs."""
        path = self.root / rel
        current, wanted = int(path.read_text()), int(value)
        total = int((path.parent / "sriov_totalvfs").read_text())
        if wanted and current:
            raise self._errno(rel, value, errno.EBUSY)
        if wanted > total:
            raise self._errno(rel, value, errno.ERANGE)
        path.write_text(f"{wanted}\n")

    def _reset_method(self, rel: str, value: str) -> None:
        """As reset_method_store does (5.15+): every name must be a method whose probe succeeds on the device."""
        device = self._world()["devices"][rel.split("/")[-2]]
        if value == "default":
            write(self.root / rel, " ".join(device["resets"]) + "\n")
            return
        names = value.split()
        vendor_reset = device.get("vendor_reset") and (self._module_dir("vendor_reset") / "refcnt").exists()
        for name in names:
            if name not in device["resets"] and not (name == "device_specific" and vendor_reset):
                raise self._errno(rel, value, errno.EINVAL)
        write(self.root / rel, " ".join(names) + "\n")

    def _errno(self, rel: str, value: str, code: int) -> KernelError:
        return KernelError(f"writing {value!r} to {self.root / rel} failed: {os.strerror(code)}", code)

    # --- PCI ------------------------------------------------------------------------------------------
    def _dev(self, address: str) -> Path:
        return self.root / "sys/bus/pci/devices" / address

    def _driver_of(self, address: str) -> str | None:
        try:
            return os.path.basename(os.readlink(self._dev(address) / "driver"))
        except OSError:
            return None

    def _bind(self, address: str, driver: str) -> None:
        link(self._dev(address) / "driver", f"../../../../bus/pci/drivers/{driver}")
        link(self.root / "sys/bus/pci/drivers" / driver / address, f"../../../../devices/{address}")
        world = self._world()
        boot_vga = (self._dev(address) / "boot_vga").exists() and (self._dev(address) / "boot_vga").read_text() == "1\n"
        if world.get("fb_handover") and boot_vga and driver == world["devices"][address].get("native"):
            # Aperture handover (kernels >= 6.0): the native driver removes the boot framebuffer's device.
            platform = self.root / "sys/bus/platform/devices"
            for name in os.listdir(platform) if platform.is_dir() else []:
                if name.startswith(("efi-framebuffer.", "simple-framebuffer.", "vesa-framebuffer.")):
                    rmtree(platform / name)

    def _unbind_dev(self, address: str) -> None:
        driver = self._driver_of(address)
        if driver:
            unlink(self._dev(address) / "driver")
            unlink(self.root / "sys/bus/pci/drivers" / driver / address)

    def _override(self, rel: str, value: str) -> None:
        write(self.root / rel, (value or "(null)") + "\n")

    def _pci_bind(self, rel: str, value: str) -> None:
        driver, op = rel.split("/")[-2:]
        if not self._dev(value).exists():
            raise self._errno(rel, value, errno.ENODEV)
        if op == "unbind":
            if self._driver_of(value) != driver:
                raise self._errno(rel, value, errno.ENODEV)
            # Only the sound driver's remove() waits for the card's files (vfio-pci has no sound card).
            native = self._world()["devices"][value].get("native")
            held = held_sound_nodes(self.root, value) if driver == native else []
            if held:
                # snd_hda_intel's remove() sleeps in snd_card_free until the card's last file is closed; the
                # real kernel seam gives up at its deadline, the writer finishes when the holder lets go.
                pid = block_write(self.root, "unbind", value)
                raise KernelTimeout(f"writing {value!r} to {self.root / rel} did not finish within the deadline "
                                    f"(the kernel waits for {held[0]}; the write completes when it is let go: "
                                    f"pid {pid})", pid)
            self._unbind_dev(value)
        else:
            if self._driver_of(value) is not None:
                raise self._errno(rel, value, errno.EBUSY)
            self._bind(value, driver)

    def _probe_one(self, address: str) -> None:
        if self._driver_of(address) is not None:
            return
        override = (self._dev(address) / "driver_override").read_text().strip()
        native = self._world()["devices"][address].get("native")
        driver = override if override != "(null)" else native
        if driver and (self.root / "sys/bus/pci/drivers" / driver).is_dir():
            self._bind(address, driver)

    def _probe(self, rel: str, value: str) -> None:
        if not self._dev(value).exists():
            raise self._errno(rel, value, errno.ENODEV)
        self._probe_one(value)

    # --- modules --------------------------------------------------------------------------------------
    def _module_dir(self, name: str) -> Path:
        return self.root / "sys/module" / name

    def _load(self, name: str) -> None:
        world = self._world()
        spec = world["modules"].get(name)
        if spec is None:
            raise KernelError(f"loading module {name} failed: modprobe: FATAL: Module {name} not found")
        if (self._module_dir(name) / "refcnt").exists():
            return
        for dep in spec.get("deps", []):
            self._load(dep)
            link(self._module_dir(dep) / "holders" / name, f"../../{name}")
        write(self._module_dir(name) / "refcnt", "0\n")
        (self._module_dir(name) / "holders").mkdir(exist_ok=True)
        for driver in spec.get("drivers", []):
            ddir = self.root / "sys/bus/pci/drivers" / driver
            ddir.mkdir(parents=True, exist_ok=True)
            write(ddir / "bind", "")
            write(ddir / "unbind", "")
            link(ddir / "module", f"../../../../module/{name}")
        for address in sorted(world["devices"]):
            self._probe_one(address)
        # modprobe's softdep "post:" modules (vfio-pci -> vfio_iommu_type1 on Debian's 6.1).
        for soft in spec.get("softdeps", []):
            self._load(soft)

    def _unload(self, name: str) -> None:
        world = self._world()
        spec = world["modules"][name]
        for driver in spec.get("drivers", []):
            ddir = self.root / "sys/bus/pci/drivers" / driver
            for address in sorted(world["devices"]):
                if self._driver_of(address) == driver:
                    self._unbind_dev(address)
            rmtree(ddir)
        for dep in spec.get("deps", []):
            unlink(self._module_dir(dep) / "holders" / name)
        rmtree(self._module_dir(name))
        # Like modprobe -r: dependencies left without users go too.
        for dep in spec.get("deps", []):
            holders = self._module_dir(dep) / "holders"
            if holders.is_dir() and not os.listdir(holders) and not self._processes_using_module(dep):
                self._unload(dep)

    def _processes_using_module(self, name: str) -> list[int]:
        world = self._world()
        drivers = set(world["modules"][name].get("drivers", []))
        owned_nodes = {
            node for node, owner in world.get("nodes", {}).items()
            if owner == name or (owner in world["devices"] and self._driver_of(owner) in drivers)
        }
        busy = []
        proc = self.root / "proc"
        for pid in sorted(p for p in os.listdir(proc) if p.isdigit()) if proc.is_dir() else []:
            fd_dir = proc / pid / "fd"
            for fd in os.listdir(fd_dir) if fd_dir.is_dir() else []:
                if os.readlink(fd_dir / fd) in owned_nodes:
                    busy.append(int(pid))
        return busy

    # --- consoles -------------------------------------------------------------------------------------
    def _vtcon(self, rel: str, value: str) -> None:
        # As the 6.1 kernel did in the lab: unbinding one console binds the other (fbcon <-> dummy);
        # writing 1 is accepted but changes nothing once the other console took over.
        if value not in ("0", "1"):
            raise self._errno(rel, value, errno.EINVAL)
        if value == "1":
            return
        base = self.root / "sys/class/vtconsole"
        for con in sorted(os.listdir(base)):
            write(base / con / "bind", "0\n" if con == rel.split("/")[-2] else "1\n")

    def _platform_bind(self, rel: str, value: str) -> None:
        driver, op = rel.split("/")[-2:]
        dev = self.root / "sys/bus/platform/devices" / value
        if not dev.exists():
            raise self._errno(rel, value, errno.ENODEV)
        current = os.path.basename(os.readlink(dev / "driver")) if (dev / "driver").is_symlink() else None
        if op == "unbind":
            if current != driver:
                raise self._errno(rel, value, errno.ENODEV)
            unlink(dev / "driver")
        else:
            if current is not None:
                raise self._errno(rel, value, errno.EBUSY)
            link(dev / "driver", f"../../drivers/{driver}")

    # --- memory ---------------------------------------------------------------------------------------
    def _hugepages(self, rel: str, value: str) -> None:
        try:
            asked = int(value)
        except ValueError as err:
            raise self._errno(rel, value, errno.EINVAL) from err
        parts = rel.split("/")
        size = int(parts[-2][len("hugepages-"):-2])
        world = self._world()
        nodes = sorted(int(n) for n in world["memory"][str(size)])
        if parts[0:4] == ["sys", "devices", "system", "node"]:
            self._set_node(size, int(parts[4][4:]), asked)
        else:
            # The global knob spreads pages over nodes round-robin, each as far as its memory allows.
            current = {n: self._node_total(size, n) for n in nodes}
            target = dict(current)
            want = asked
            if want < sum(current.values()):
                for n in reversed(nodes):
                    drop = min(target[n], sum(target.values()) - want)
                    target[n] -= drop
            else:
                capacity = {n: self._capacity(size, n) for n in nodes}
                while sum(target.values()) < want:
                    grew = False
                    for n in nodes:
                        if sum(target.values()) < want and target[n] < capacity[n]:
                            target[n] += 1
                            grew = True
                    if not grew:
                        break
            for n in nodes:
                self._set_node(size, n, target[n])
        self._sync_global(size, nodes)

    def _capacity(self, size: int, node: int) -> int:
        mem = self._world()["memory"][str(size)][str(node)]
        compacted = (self.root / STATE / "compacted").exists()
        return mem["pages"] + (mem.get("fragmented", 0) if compacted else 0)

    def _node_dir(self, size: int, node: int) -> Path:
        return self.root / f"sys/devices/system/node/node{node}/hugepages/hugepages-{size}kB"

    def _node_total(self, size: int, node: int) -> int:
        return int((self._node_dir(size, node) / "nr_hugepages").read_text())

    def _set_node(self, size: int, node: int, asked: int) -> None:
        granted = max(0, min(asked, self._capacity(size, node)))
        write(self._node_dir(size, node) / "nr_hugepages", f"{granted}\n")
        write(self._node_dir(size, node) / "free_hugepages", f"{granted}\n")

    def _sync_global(self, size: int, nodes: list[int]) -> None:
        total = sum(self._node_total(size, n) for n in nodes)
        base = self.root / f"sys/kernel/mm/hugepages/hugepages-{size}kB"
        write(base / "nr_hugepages", f"{total}\n")
        write(base / "free_hugepages", f"{total}\n")

    def _compact(self, rel: str, value: str) -> None:
        write(self.root / STATE / "compacted", "1\n")

    # --- CPUs -----------------------------------------------------------------------------------------
    def _online(self) -> frozenset[int]:
        return parse_cpulist((self.root / "sys/devices/system/cpu/online").read_text())

    def _cpus(self, rel: str, value: str, parse) -> frozenset[int]:
        if not (self.root / rel).exists():
            raise self._errno(rel, value, errno.ENOENT)
        try:
            cpus = parse(value)
        except ValueError as err:
            raise self._errno(rel, value, errno.EINVAL) from err
        if not cpus <= self._online() or not cpus:
            raise self._errno(rel, value, errno.EINVAL)
        return cpus

    def _governor(self, rel: str, value: str) -> None:
        available = (self.root / rel).with_name("scaling_available_governors").read_text().split()
        if value not in available:
            raise self._errno(rel, value, errno.EINVAL)
        write(self.root / rel, value + "\n")

    def _irq_affinity(self, rel: str, value: str) -> None:
        cpus = self._cpus(rel, value, parse_cpulist)
        if int(rel.split("/")[2]) in self._world().get("irqs_refusing", []):
            raise self._errno(rel, value, errno.EIO)
        write(self.root / rel, format_cpulist(cpus) + "\n")

    def _cpuset(self, rel: str, value: str) -> None:
        cpus = self._cpus(rel, value, parse_cpulist) if value else frozenset()
        if not cpus and (self.root / rel).read_text().strip() and self._populated(rel.split("/")[-2]):
            # As 6.1 does: a group with processes in it keeps a non-empty cpuset.
            raise self._errno(rel, value, errno.ENOSPC)
        write(self.root / rel, format_cpulist(cpus) + "\n")

    def _populated(self, group: str) -> bool:
        proc = self.root / "proc"
        for cgroup in proc.glob("*/cgroup"):
            path = cgroup.read_text().strip().split("::", 1)[-1]
            if path == f"/{group}" or path.startswith(f"/{group}/"):
                return True
        return False

    def _cpumask(self, rel: str, value: str) -> None:
        cpus = self._cpus(rel, value, parse_cpumask)
        write(self.root / rel, format_cpumask(cpus, (self.root / rel).read_text().strip()) + "\n")
