"""``vm create --apply`` and ``vm delete`` through libvirt: storage pool, volumes, the unattend ISO, the
definition. Each creation registers its undo first; a failure part-way undoes, newest first, what this run
created and nothing else."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from xml.etree import ElementTree

from janus_hooks.domain import PROFILE_NS, parse_domain
from janus_hooks.vm.build import Placement, Volume
from janus_hooks.vm.request import VmPlan
from janus_hooks.vm.template import VM_NS
from janus_hooks.vm.values import VmError

log = logging.getLogger(__name__)

DEFAULT_POOL = "default"
DEFAULT_POOL_PATH = "/var/lib/libvirt/images"  # libvirt's own images directory, where virt-manager puts disks
# libvirt's flags: undefine also removes the UEFI variable store and the swtpm state of the VM.
UNDEFINE_NVRAM, UNDEFINE_TPM = 4, 32
ISO_MODE = "0600"  # the unattend ISO holds a password in clear text
_CHUNK = 256 * 1024


@dataclass
class Target:
    """What libvirt already has that this VM needs: checked before anything is created (dry run too)."""

    pool_path: str | None = None  # where the pool keeps its volumes; None: no pool needed
    create_pool: bool = False  # the "default" pool does not exist yet: this run creates it


def _libvirt_error() -> type[Exception]:
    import libvirt

    return libvirt.libvirtError


def needs_pool(plan: VmPlan) -> bool:
    req = plan.request
    return (req.storage == "file" and not req.disk) or bool(req.unattend_user)


def inspect(conn: Any, plan: VmPlan) -> Target:
    """Refuse what libvirt would refuse later (an existing VM name, a missing pool or volume clash); read
    the pool's directory. Changes nothing."""
    req = plan.request
    error = _libvirt_error()
    try:
        conn.lookupByName(req.name)
    except error:
        pass
    else:
        raise VmError(f"a VM named {req.name!r} already exists at {conn.getURI()}; choose another name")
    if req.network != "user":
        try:
            conn.networkLookupByName(req.network)
        except error as err:  # libvirt would define the VM and only refuse to start it
            raise VmError(f"libvirt has no network {req.network!r} (virsh net-list --all); --network user gives "
                          "the guest QEMU's user-mode network") from err
    if not needs_pool(plan):
        return Target()
    try:
        pool = conn.storagePoolLookupByName(req.pool)
    except error as err:
        if req.pool != DEFAULT_POOL:
            raise VmError(f"libvirt has no storage pool {req.pool!r} (virsh pool-list --all)") from err
        return Target(DEFAULT_POOL_PATH, create_pool=True)
    if not pool.isActive():
        raise VmError(f"storage pool {req.pool!r} is not active: 'virsh pool-start {req.pool}' first")
    path = ElementTree.fromstring(pool.XMLDesc(0)).findtext("target/path")
    if not path:
        raise VmError(f"storage pool {req.pool!r} has no directory (type "
                      f"{ElementTree.fromstring(pool.XMLDesc(0)).get('type')}); use a directory pool")
    for name in volume_names(plan):
        try:
            pool.storageVolLookupByName(name)
        except error:
            continue
        raise VmError(f"storage pool {req.pool!r} already has a volume {name!r}; remove it or choose another "
                      "VM name")
    return Target(path)


def volume_names(plan: VmPlan) -> list[str]:
    req = plan.request
    names = []
    if req.storage == "file" and not req.disk:
        names.append(f"{req.name}.qcow2")
    if req.unattend_user:
        names.append(f"{req.name}-unattend.iso")
    return names


def placement(plan: VmPlan, target: Target) -> Placement:
    req = plan.request
    volumes = []
    if req.storage == "file" and not req.disk:
        volumes.append(Volume(req.pool, f"{req.name}.qcow2", f"{target.pool_path}/{req.name}.qcow2", "disk"))
    if req.unattend_user:
        volumes.append(Volume(req.pool, f"{req.name}-unattend.iso", f"{target.pool_path}/{req.name}-unattend.iso",
                              "unattend"))
    disk = next((v.path for v in volumes if v.role == "disk"), req.disk)
    iso = next((v.path for v in volumes if v.role == "unattend"), None)
    return Placement(disk, iso, tuple(volumes))


def _volume_xml(name: str, capacity: int, fmt: str, mode: str | None = None) -> str:
    volume = ElementTree.Element("volume")
    ElementTree.SubElement(volume, "name").text = name
    ElementTree.SubElement(volume, "capacity", {"unit": "bytes"}).text = str(capacity)
    target = ElementTree.SubElement(volume, "target")
    ElementTree.SubElement(target, "format", {"type": fmt})
    if mode:
        ElementTree.SubElement(ElementTree.SubElement(target, "permissions"), "mode").text = mode
    return ElementTree.tostring(volume, encoding="unicode")


def _pool_xml(name: str, path: str) -> str:
    pool = ElementTree.Element("pool", {"type": "dir"})
    ElementTree.SubElement(pool, "name").text = name
    ElementTree.SubElement(ElementTree.SubElement(pool, "target"), "path").text = path
    return ElementTree.tostring(pool, encoding="unicode")


@dataclass
class Undo:
    """What this run created, each with the call that removes it; ``run`` undoes newest first."""

    steps: list[tuple[str, Callable[[], None]]] = field(default_factory=list)

    def add(self, what: str, undo: Callable[[], None]) -> None:
        self.steps.append((what, undo))

    def run(self) -> list[str]:
        """Undo everything; returns what could not be removed (each naming the object and why)."""
        failed = []
        for what, undo in reversed(self.steps):
            try:
                undo()
            except Exception as err:  # noqa: BLE001 - go on removing the rest, report each
                failed.append(f"{what}: {err}")
        self.steps.clear()
        return failed


def create(conn: Any, plan: VmPlan, target: Target, place: Placement, xml: str,
           unattend_iso: bytes | None) -> list[str]:
    """Create the pool, volumes and unattend ISO the plan needs, then define the VM. Returns what was made.

    On any failure everything made by this call is removed again and VmError names the failure (and
    whatever could not be removed)."""
    undo = Undo()
    made: list[str] = []
    try:
        pool = None
        if needs_pool(plan):
            if target.create_pool:
                pool = conn.storagePoolDefineXML(_pool_xml(DEFAULT_POOL, DEFAULT_POOL_PATH), 0)
                undo.add(f"storage pool {DEFAULT_POOL}", pool.undefine)
                pool.build(0)
                pool.create(0)
                undo.add(f"storage pool {DEFAULT_POOL} (stop)", pool.destroy)
                pool.setAutostart(1)
                made.append(f"storage pool {DEFAULT_POOL} at {DEFAULT_POOL_PATH}")
            else:
                pool = conn.storagePoolLookupByName(plan.request.pool)
        for volume in place.volumes:
            if volume.role == "disk":
                vol = pool.createXML(_volume_xml(volume.name, plan.request.disk_size, "qcow2"), 0)
                undo.add(f"volume {volume.path}", lambda v=vol: v.delete(0))
            else:
                data = unattend_iso or b""
                vol = pool.createXML(_volume_xml(volume.name, len(data), "raw", ISO_MODE), 0)
                undo.add(f"volume {volume.path}", lambda v=vol: v.delete(0))
                _upload(conn, vol, data)
            made.append(f"volume {volume.path}")
        dom = conn.defineXML(xml)
        undo.add(f"VM {plan.request.name}", lambda: undefine(dom))
        made.append(f"VM {plan.request.name}")
    except Exception as err:
        left = undo.run()
        removed = "; could not remove: " + "; ".join(left) if left else "; removed what this run created"
        raise VmError(f"creating VM {plan.request.name!r} failed: {_message(err)}"
                      f"{removed if made or left else ''}") from err
    return made


def undefine(dom: Any) -> None:
    """Undefine with the UEFI variables and the TPM state; a libvirt without the TPM flag (before 8.9) or
    a driver without NVRAM gets the flags it knows."""
    import libvirt

    for flags in (UNDEFINE_NVRAM | UNDEFINE_TPM, UNDEFINE_NVRAM, 0):
        try:
            dom.undefineFlags(flags)
            return
        except libvirt.libvirtError as err:
            if flags == 0 or err.get_error_code() not in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT):
                raise


def _upload(conn: Any, vol: Any, data: bytes) -> None:
    stream = conn.newStream(0)
    vol.upload(stream, 0, len(data), 0)
    try:
        view = memoryview(data)
        while view:
            sent = stream.send(bytes(view[:_CHUNK]))
            if sent < 0:
                raise VmError(f"upload to {vol.path()} failed")
            view = view[sent:]
        stream.finish()
    except BaseException:
        stream.abort()
        raise


def _message(err: BaseException) -> str:
    text = err.get_error_message() if hasattr(err, "get_error_message") else str(err)
    return (text or str(err)).strip().splitlines()[0] if (text or str(err)).strip() else type(err).__name__


# --- vm list / vm delete ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MadeVm:
    """A VM as ``vm list``/``vm delete`` see it: its janus-hooks mode and what ``vm create`` made for it."""

    name: str
    active: bool
    mode: str | None  # janus-hooks profile mode; None: not managed
    video: str | None  # the video profile ``vm create`` was given; None: not made by it
    gpu: tuple[str, ...]
    volumes: tuple[Volume, ...]


def describe(dom: Any) -> MadeVm:
    xml = dom.XMLDesc(2)  # VIR_DOMAIN_XML_INACTIVE: the definition
    spec = parse_domain(xml)
    root = ElementTree.fromstring(xml)
    record = root.find(f"metadata/{{{VM_NS}}}created")
    volumes = tuple(Volume(v.get("pool", ""), v.get("name", ""), v.get("path", ""), v.get("role", ""))
                    for v in (record.findall(f"{{{VM_NS}}}volume") if record is not None else []))
    # A shared-vram guest's GPU is the host's, which it shares (an mdev has no PCI address of its own).
    made_for = (record.get("gpu", "") if record is not None else "").split(",")
    gpu = tuple(h.address for h in spec.hostdevs) or tuple(d.parent for d in spec.shared) or tuple(
        a for a in made_for if a and a != "none")
    return MadeVm(spec.name, bool(dom.isActive()), spec.mode, record.get("video") if record is not None else None,
                  gpu, volumes)


def managed_vms(conn: Any) -> list[MadeVm]:
    """Every VM janus-hooks manages (profile metadata) or ``vm create`` made, sorted by name."""
    found = []
    for dom in conn.listAllDomains(0):
        xml = dom.XMLDesc(2)
        if PROFILE_NS in xml or VM_NS in xml:
            found.append(describe(dom))
    return sorted(found, key=lambda v: v.name)


def delete_steps(conn: Any, name: str, storage: bool) -> tuple[MadeVm, list[str]]:
    """What ``vm delete`` would do, refusing a VM ``vm create`` did not make or that runs."""
    error = _libvirt_error()
    try:
        dom = conn.lookupByName(name)
    except error as err:
        raise VmError(f"no VM named {name!r} at {conn.getURI()}") from err
    vm = describe(dom)
    if vm.video is None:
        raise VmError(f"VM {name!r} was not made by 'janus-hooks vm create'; remove it with virt-manager or "
                      "virsh undefine")
    if vm.active:
        raise VmError(f"VM {name!r} is running; shut it down first")
    steps = [f"undefine VM {name} (with its UEFI variables and TPM state)"]
    for volume in vm.volumes:
        if volume.role == "unattend" or storage:
            steps.append(f"delete volume {volume.path}")
    return vm, steps


def delete(conn: Any, name: str, storage: bool) -> list[str]:
    vm, steps = delete_steps(conn, name, storage)
    error = _libvirt_error()
    undefine(conn.lookupByName(name))
    problems = []
    for volume in vm.volumes:
        if volume.role != "unattend" and not storage:
            continue
        try:
            conn.storageVolLookupByPath(volume.path).delete(0)
        except error as err:
            problems.append(f"volume {volume.path}: {_message(err)}")
    if problems:
        raise VmError(f"VM {name!r} undefined, but " + "; ".join(problems))
    return steps
