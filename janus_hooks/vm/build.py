"""``VmPlan`` + where libvirt puts the files -> the domain XML, assembled from templates/libvirt/ blocks."""

from __future__ import annotations

from dataclasses import dataclass
from xml.etree import ElementTree

from janus_hooks.domain import PROFILE_NS
from janus_hooks.vm import template
from janus_hooks.vm.request import VmPlan

BASE = "windows"
# libvirt's vendor_id takes at most 12 characters; any value that is not the KVM one hides the hypervisor.
STEALTH_VENDOR_ID = "0123456789ab"
CONSOLE_LOG_DIR = "/var/log/libvirt/qemu"


@dataclass(frozen=True)
class Volume:
    """A libvirt storage volume this run creates (and ``vm delete`` removes)."""

    pool: str
    name: str
    path: str
    role: str  # "disk" or "unattend"


@dataclass(frozen=True)
class Placement:
    """Where the guest's files are: decided with libvirt (pool paths), not by the plan."""

    disk_path: str | None  # the system disk: a new volume's path, an existing image or a block device
    unattend_iso: str | None = None
    volumes: tuple[Volume, ...] = ()


def build_domain(plan: VmPlan, placement: Placement) -> str:
    """The domain XML of ``plan``; every value set through ElementTree."""
    req = plan.request
    domain = template.base(BASE)

    def add(block: str, **values: object) -> None:
        template.inject(domain, block, values)

    if req.windows and req.virt_type == "kvm":
        add("windows-guest")  # QEMU emulates no Hyper-V enlightenments under TCG: it refuses to start
    if plan.secure_boot:
        add("secure-boot")
    if plan.tpm:
        add("tpm")
    if plan.managed and req.stealth:
        add("stealth", vendor_id=STEALTH_VENDOR_ID)
    add("installation-iso", path=req.iso)
    if req.virtio_iso:
        add("virtio-iso", path=req.virtio_iso)
    if placement.unattend_iso:
        add("unattend-iso", path=placement.unattend_iso)
    if placement.disk_path:
        if req.storage == "block":
            add("storage-block", path=placement.disk_path)
        else:
            add("storage-file", path=placement.disk_path, format=plan.disk_format)
    if req.network == "user":
        add("network-user")
    else:
        add("network", network=req.network)
    _display(plan, add)
    if req.hugepages:
        add("hugepages")
    for vcpu, cpu in enumerate(req.cpu_pin):
        add("cpu-pin", vcpu=vcpu, cpu=cpu)
    if plan.managed:
        add("janus-profile", mode=req.mode)
    elif plan.shared and plan.shared.kind in ("mdev", "vf"):
        # janus-hooks makes the mdev instance or the VF when the VM starts: the profile says which.
        add("janus-profile", mode=req.mode)
        profile = domain.find(f"metadata/{{{PROFILE_NS}}}profile")
        shared = plan.shared
        if shared.kind == "mdev":
            ElementTree.SubElement(profile, f"{{{PROFILE_NS}}}mdev", {"parent": shared.parent or "",
                                                                      "type": shared.mdev_type or "",
                                                                      "uuid": shared.mdev_uuid or ""})
        else:
            ElementTree.SubElement(profile, f"{{{PROFILE_NS}}}vf", {"parent": shared.parent or "", "count": "1"})
    add("janus-created", video=req.mode, gpu=",".join(plan.gpu_functions) or
        (plan.shared.parent if plan.shared and plan.shared.parent else "none"))
    record = domain.find(f"metadata/{{{template.VM_NS}}}created")
    for volume in placement.volumes:
        ElementTree.SubElement(record, f"{{{template.VM_NS}}}volume",
                               {"pool": volume.pool, "name": volume.name, "path": volume.path, "role": volume.role})
    template.fill(domain, {
        "virt_type": req.virt_type,
        "name": req.name,
        "title": f"{req.name} ({req.os}, {req.mode}, made by janus-hooks vm create)",
        "memory_kib": plan.memory // 1024,
        "vcpus": plan.vcpus,
        # TCG has no host CPU to pass through; "maximum" is every feature QEMU can emulate.
        "cpu_mode": "host-passthrough" if req.virt_type == "kvm" else "maximum",
        # Windows keeps the RTC in local time; everything else in UTC.
        "clock": "localtime" if req.windows else "utc",
        "console_log": f"{CONSOLE_LOG_DIR}/{req.name}-console.log",
    }, f"template {BASE}.xml")
    left = template.unfilled(domain)
    if left:
        raise AssertionError(f"placeholders without a value: {left}")
    return template.serialize(domain)


def _display(plan: VmPlan, add) -> None:
    req = plan.request
    if plan.managed:
        add("display-gpu")
        for address in plan.gpu_functions:
            dom, bus, rest = address.split(":")
            slot, function = rest.split(".")
            add("gpu-hostdev", domain=f"0x{dom}", bus=f"0x{bus}", slot=f"0x{slot}", function=f"0x{function}")
    elif req.mode == "shared-vram" and plan.shared is not None:
        if plan.shared.kind == "mdev":
            add("display-mdev", uuid=plan.shared.mdev_uuid)
        elif plan.shared.kind == "vf":
            dom, bus, rest = (plan.shared.vf_address or "").split(":")
            slot, function = rest.split(".")
            add("vf-hostdev", domain=f"0x{dom}", bus=f"0x{bus}", slot=f"0x{slot}", function=f"0x{function}")
        else:
            add("display-virgl")
    else:
        add("display-virtio")
