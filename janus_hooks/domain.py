"""Domain XML -> DomainSpec: what a VM asks of the host (PCI hostdevs, memory, hugepages, CPU pins, janus
profile). Pure."""

from __future__ import annotations

import re
from typing import NamedTuple
from xml.etree import ElementTree

from janus_hooks.config import MODES
from janus_hooks.cpuset import format_cpulist, parse_cpulist
from janus_hooks.errors import ConfigError
from janus_hooks.schema import quote as _token

PROFILE_NS = "https://janus-hooks.org/xmlns/profile/1"
# The guest shares the host's GPU (a mediated device or an SR-IOV VF janus-hooks makes on prepare); the GPU
# itself stays with the host, so none of the passthrough machinery applies.
SHARED_VRAM = "shared-vram"

_UNIT_KIB = {
    "b": 1 / 1024, "bytes": 1 / 1024, "k": 1, "kib": 1, "kb": 1000 / 1024,
    "m": 1024, "mib": 1024, "mb": 1000 * 1000 / 1024,
    "g": 1024**2, "gib": 1024**2, "gb": 1000**3 / 1024,
    "t": 1024**3, "tib": 1024**3, "tb": 1000**4 / 1024,
}


# The records of this module are NamedTuples, not dataclasses: every hook start defines them, and a
# dataclass compiles its generated methods when its class is created (about five times the cost).
class HostDev(NamedTuple):
    """A PCI <hostdev> of the domain."""

    address: str  # 0000:01:00.0
    managed: bool


class HugepageRequest(NamedTuple):
    """The VM's hugepage backing: page size and how much memory on which host node."""

    page_kb: int | None  # None: the host's default size
    # Pages per host NUMA node; {None: n} means the global pool (the kernel spreads them).
    per_node_kb: dict[int | None, int]


class CpuPins(NamedTuple):
    """Where libvirt will run the VM's threads (``<vcpu cpuset>``, ``<cputune>``): host core numbers."""

    placement: str = "static"  # "auto": numad picks the cores at start, nothing is known before
    vcpus: frozenset[int] = frozenset()  # every core a vCPU may run on; empty: vCPUs float
    emulator: frozenset[int] = frozenset()
    iothreads: frozenset[int] = frozenset()

    @property
    def pinned(self) -> bool:
        return self.placement != "auto" and bool(self.vcpus)

    def describe(self) -> str:
        parts = [f"vCPUs {format_cpulist(self.vcpus)}"]
        if self.emulator:
            parts.append(f"emulator {format_cpulist(self.emulator)}")
        if self.iothreads:
            parts.append(f"iothreads {format_cpulist(self.iothreads)}")
        return ", ".join(parts)


class SharedDevice(NamedTuple):
    """What a shared-vram VM needs made on its GPU: an mdev instance (``uuid`` of ``mdev_type``) or
    ``vfs`` SR-IOV virtual functions."""

    parent: str
    mdev_type: str | None = None
    uuid: str | None = None
    vfs: int = 0


class DomainSpec(NamedTuple):
    """What one domain definition asks of the host."""

    name: str
    uuid: str
    memory_kb: int
    hostdevs: tuple[HostDev, ...]
    hugepages: HugepageRequest | None
    mode: str | None  # from <metadata><janus:profile mode=.../>, None when not marked
    shared: tuple[SharedDevice, ...] = ()  # shared-vram: <janus:mdev/> and <janus:vf/> in the profile
    cpus: CpuPins = CpuPins()
    isolate: bool | None = None  # <janus:profile isolate="yes|no"/>; None: the VM's TOML or janus.toml decides


def to_kib(value: str, unit: str | None) -> int:
    """libvirt's memory units (KiB by default) as KiB."""
    try:
        factor = _UNIT_KIB[(unit or "KiB").lower()]
    except KeyError as err:
        raise ConfigError(f"unknown memory unit {unit!r}") from err
    return int(int(value) * factor)


MAX_NODES = 1024  # the kernel's MAX_NUMNODES at its largest (NODES_SHIFT 10)


def parse_nodeset(text: str) -> list[int]:
    """libvirt nodesets: "0", "0-1", "0,2-3", "^1" excludes (only after a range). Node numbers are bounded
    by what a kernel can have, so a hostile range never builds a huge set."""
    nodes: set[int] = set()
    excluded: set[int] = set()
    for part in (p.strip() for p in text.split(",") if p.strip()):
        target = excluded if part.startswith("^") else nodes
        part = part.lstrip("^")
        try:
            lo, hi = (int(x) for x in part.split("-", 1)) if "-" in part else (int(part), int(part))
        except ValueError:
            raise ConfigError(f"nodeset part {_token(part)} is not a node number or range") from None
        if not 0 <= lo <= hi < MAX_NODES:
            raise ConfigError(f"nodeset part {_token(part)} is not within nodes 0-{MAX_NODES - 1}")
        target.update(range(lo, hi + 1))
    return sorted(nodes - excluded)


_PCI_LIMITS = {"domain": 0xFFFF, "bus": 0xFF, "slot": 0x1F, "function": 0x7}


def _pci_address(addr) -> str:
    def num(key: str) -> int:
        value = addr.get(key, "0")
        try:
            number = int(value, 16) if value.lower().startswith("0x") else int(value)
        except ValueError:
            number = -1
        if not 0 <= number <= _PCI_LIMITS[key]:
            raise ConfigError(f"<hostdev> address {key} {_token(value)} is not a number from 0 to "
                              f"{_PCI_LIMITS[key]:#x}")
        return number

    return f"{num('domain'):04x}:{num('bus'):02x}:{num('slot'):02x}.{num('function'):x}"


# libvirt never writes a DTD; refusing one closes entity expansion and external entities outright.
_DTD = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


def parse_domain(xml: str) -> DomainSpec:
    """Parse a libvirt domain definition (as libvirt hands it to hooks, or from ``virsh dumpxml``).

    Any input gives a DomainSpec or a ConfigError whose message quotes at most short tokens of it.
    """
    if _DTD.search(xml):
        raise ConfigError("domain XML with a DOCTYPE or ENTITY declaration is refused")
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as err:
        # The position only: the parser's own message may quote the document.
        line, column = getattr(err, "position", (0, 0))
        raise ConfigError(f"domain XML cannot be parsed (line {line}, column {column})") from None
    except (ValueError, RecursionError) as err:  # undecodable bytes, nesting deeper than Python's stack
        raise ConfigError(f"domain XML cannot be parsed ({type(err).__name__})") from None
    if root.tag != "domain":
        raise ConfigError(f"expected a <domain> document, got <{_token(str(root.tag))[1:-1]}>")
    try:
        return _parse(root)
    except (ValueError, OverflowError) as err:
        # A number libvirt would have refused (memory, vcpu, a cell id): named by type, not echoed.
        raise ConfigError(f"domain XML holds a value that is not a number ({type(err).__name__})") from None


def _parse(root) -> DomainSpec:
    # Exactly as libvirt keeps it: a name with leading or trailing spaces is still that VM's name.
    name = root.findtext("name") or ""
    if not name.strip():
        raise ConfigError("domain XML has no <name>")

    memory = root.find("memory")
    memory_kb = to_kib(memory.text.strip(), memory.get("unit")) if memory is not None and memory.text else 0

    hostdevs = []
    for dev in root.findall("devices/hostdev"):
        if dev.get("mode", "subsystem") != "subsystem" or dev.get("type") != "pci":
            continue
        addr = dev.find("source/address")
        if addr is None:
            raise ConfigError(f"VM {name!r}: a PCI <hostdev> has no source address")
        hostdevs.append(HostDev(_pci_address(addr), dev.get("managed", "no") == "yes"))

    mode = None
    isolate = None
    profile = root.find(f"metadata/{{{PROFILE_NS}}}profile")
    if profile is not None:
        isolate = _yes_no(name, "isolate", profile.get("isolate"))
        mode = profile.get("mode", "single-gpu")
        if mode not in MODES and mode not in ("none", SHARED_VRAM):
            raise ConfigError(f"VM {name!r}: janus profile mode {mode!r} is not one of {', '.join(MODES)}")
        if mode == "none":
            mode = None

    return DomainSpec(
        name=name,
        uuid=(root.findtext("uuid") or "").strip(),
        memory_kb=memory_kb,
        hostdevs=tuple(hostdevs),
        hugepages=_hugepages(root, memory_kb),
        mode=mode,
        cpus=_cpu_pins(root, name),
        isolate=isolate,
        shared=_shared(profile, name) if mode == SHARED_VRAM else (),
    )


def _shared(profile, name: str) -> tuple[SharedDevice, ...]:
    devices = []
    for element in profile:
        if element.tag == f"{{{PROFILE_NS}}}mdev":
            devices.append(SharedDevice(element.get("parent", ""), element.get("type"), element.get("uuid")))
        elif element.tag == f"{{{PROFILE_NS}}}vf":
            try:
                devices.append(SharedDevice(element.get("parent", ""), vfs=int(element.get("count", "1"))))
            except ValueError as err:
                raise ConfigError(f"VM {name!r}: <janus:vf count=...> is not a number") from err
    return tuple(devices)


def _yes_no(vm: str, attribute: str, value: str | None) -> bool | None:
    if value is None:
        return None
    if value not in ("yes", "no"):
        raise ConfigError(f"VM {vm!r}: janus profile {attribute}={value!r} must be 'yes' or 'no'")
    return value == "yes"


def _cpuset(vm: str, where: str, text: str | None) -> frozenset[int]:
    try:
        return parse_cpulist(text or "")
    except ValueError as err:
        raise ConfigError(f"VM {vm!r}: {where} cpuset {text!r} cannot be read ({err})") from err


def _cpu_pins(root, vm: str) -> CpuPins:
    """Cores from ``<vcpu placement cpuset>`` and ``<cputune>`` vcpupin/emulatorpin/iothreadpin."""
    vcpu = root.find("vcpu")
    placement = vcpu.get("placement", "static") if vcpu is not None else "static"
    try:
        count = int((vcpu.text or "1").strip()) if vcpu is not None else 1
    except ValueError as err:
        raise ConfigError(f"VM {vm!r}: <vcpu> {vcpu.text!r} is not a number") from err
    default = _cpuset(vm, "<vcpu>", vcpu.get("cpuset")) if vcpu is not None else frozenset()
    pins = {int(p.get("vcpu", "-1")): _cpuset(vm, f"vcpupin {p.get('vcpu')}", p.get("cpuset"))
            for p in root.findall("cputune/vcpupin")}
    vcpus: set[int] = set().union(*pins.values()) if pins else set()
    if any(i not in pins for i in range(count)):
        # A vCPU without its own pin runs on <vcpu cpuset> (or anywhere without one).
        vcpus = vcpus | default if default else set()
    emulator = root.find("cputune/emulatorpin")
    iothreads = [_cpuset(vm, f"iothreadpin {p.get('iothread')}", p.get("cpuset"))
                 for p in root.findall("cputune/iothreadpin")]
    return CpuPins(
        placement=placement,
        vcpus=frozenset(vcpus),
        # libvirt runs the emulator on <vcpu cpuset> when it has no pin of its own.
        emulator=_cpuset(vm, "emulatorpin", emulator.get("cpuset")) if emulator is not None else default,
        iothreads=frozenset().union(*iothreads) if iothreads else frozenset(),
    )


def _hugepages(root, memory_kb: int) -> HugepageRequest | None:
    backing = root.find("memoryBacking/hugepages")
    if backing is None:
        return None
    page = backing.find("page")
    page_kb = to_kib(page.get("size", "0"), page.get("unit")) if page is not None else None
    cells = {
        int(c.get("id", "0")): to_kib(c.get("memory", "0"), c.get("unit"))
        for c in root.findall("cpu/numa/cell")
    }
    memnodes = {
        int(m.get("cellid", "0")): parse_nodeset(m.get("nodeset", "0")) for m in root.findall("numatune/memnode")
    }
    numatune = root.find("numatune/memory")
    nodeset = numatune.get("nodeset") if numatune is not None else None
    host_nodes = parse_nodeset(nodeset) if nodeset else None

    per_node: dict[int | None, int] = {}
    if cells and memnodes:
        # Each guest cell is pinned to host node(s): reserve its memory there.
        for cell, kb in cells.items():
            nodes = memnodes.get(cell) or host_nodes
            _spread(per_node, kb, nodes)
    else:
        _spread(per_node, memory_kb, host_nodes)
    return HugepageRequest(page_kb, per_node)


def _spread(per_node: dict[int | None, int], kb: int, nodes: list[int] | None) -> None:
    """Divide ``kb`` evenly over ``nodes`` (the first nodes take the remainder); None: the global pool."""
    if not nodes:
        per_node[None] = per_node.get(None, 0) + kb
        return
    share, rest = divmod(kb, len(nodes))
    for i, node in enumerate(nodes):
        per_node[node] = per_node.get(node, 0) + share + (1 if i < rest else 0)
