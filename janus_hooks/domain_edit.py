"""``janus-hooks profile``: mark a VM managed in its domain XML or in a TOML profile. Pure text in, text out.

The XML edit is made on an ElementTree and shown as a unified diff of both documents put through the same
serializer, so the diff holds only what changed (libvirt re-formats the definition on define anyway).
"""

from __future__ import annotations

import difflib
import re
import tomllib
from xml.etree import ElementTree

import tomli_w

from janus_hooks.domain import PROFILE_NS, parse_domain
from janus_hooks.errors import ConfigError

PROFILE_TAG = f"{{{PROFILE_NS}}}profile"
PROFILE_PREFIX = "janus"
_XMLNS = re.compile(r"""xmlns:([A-Za-z_][\w.-]*)\s*=\s*["']([^"']*)["']""")


def _register_prefixes(xml: str) -> None:
    # ElementTree names unknown namespaces ns0, ns1...; keeping the document's own prefixes (libosinfo:,
    # qemu:, janus:) keeps both the diff and the stored definition readable. ElementTree keeps this
    # registry process-wide; a prefix maps to the same URI in every libvirt document.
    for prefix, uri in [(PROFILE_PREFIX, PROFILE_NS), *_XMLNS.findall(xml)]:
        if not re.fullmatch(r"ns\d+", prefix):
            ElementTree.register_namespace(prefix, uri)


def _parse(xml: str) -> ElementTree.Element:
    parse_domain(xml)  # the same refusals as the hook: DOCTYPE/ENTITY, not a <domain>, no name
    _register_prefixes(xml)
    return ElementTree.fromstring(xml)


def _serialize(root: ElementTree.Element) -> str:
    root = ElementTree.fromstring(ElementTree.tostring(root))  # a copy: indent() changes whitespace
    for element in root.iter():
        element.tail = (element.tail or "").strip() or None
        if len(element):
            element.text = (element.text or "").strip() or None
    ElementTree.indent(root, space="  ")
    return ElementTree.tostring(root, encoding="unicode") + "\n"


def _address_of(address: str) -> dict[str, str]:
    domain, bus, rest = address.split(":")
    slot, function = rest.split(".")
    return {"domain": f"0x{domain}", "bus": f"0x{bus}", "slot": f"0x{slot}", "function": f"0x{function}"}


def _child(parent: ElementTree.Element, tag: str, after: tuple[str, ...] = ()) -> ElementTree.Element:
    """``parent``'s ``tag`` child, created after the last of ``after`` (libvirt's usual order) if missing."""
    found = parent.find(tag)
    if found is not None:
        return found
    element = ElementTree.Element(tag)
    index = max((i + 1 for i, c in enumerate(parent) if c.tag in after), default=len(parent))
    parent.insert(index, element)
    return element


def edit_domain(xml: str, mode: str, gpu_functions: list[str], hugepages: bool | None,
                isolate: bool | None = None) -> str:
    """The domain XML with the janus profile set to ``mode`` ("none" removes it), a managed PCI hostdev for
    each of ``gpu_functions`` that is not there yet, hugepage backing added (True) or removed (False), and
    CPU isolation asked for (True: ``isolate="yes"``) or declined (False: ``"no"``); None keeps what is there."""
    root = _parse(xml)
    existing = {d.address for d in parse_domain(xml).hostdevs}
    metadata = root.find("metadata")
    kept: dict[str, str] = {}
    if metadata is not None:
        for old in metadata.findall(PROFILE_TAG):
            kept = {k: v for k, v in old.attrib.items() if k != "mode"}
            metadata.remove(old)
    if isolate is not None:
        kept["isolate"] = "yes" if isolate else "no"
    if mode != "none":
        metadata = _child(root, "metadata", after=("name", "uuid", "genid", "title", "description"))
        ElementTree.SubElement(metadata, PROFILE_TAG, {"mode": mode, **kept})
    elif metadata is not None and not len(metadata):
        root.remove(metadata)
    if gpu_functions:
        devices = _child(root, "devices")
        for address in gpu_functions:
            if address in existing:
                continue
            hostdev = ElementTree.SubElement(devices, "hostdev",
                                             {"mode": "subsystem", "type": "pci", "managed": "yes"})
            ElementTree.SubElement(ElementTree.SubElement(hostdev, "source"), "address", _address_of(address))
    if hugepages is True:
        backing = _child(root, "memoryBacking", after=("memory", "currentMemory", "maxMemory", "memtune"))
        _child(backing, "hugepages")
    elif hugepages is False:
        backing = root.find("memoryBacking")
        if backing is not None:
            for old in backing.findall("hugepages"):
                backing.remove(old)
            if not len(backing):
                root.remove(backing)
    return _serialize(root)


_ROOT_XMLNS = re.compile(r"""\s+xmlns:[\w.-]+=(?:"[^"]*"|'[^']*')""")


def xml_diff(before: str, after: str, name: str) -> str:
    """A unified diff of two domain definitions, both normalised by the same serializer."""
    def lines(xml: str) -> list[str]:
        text = _serialize(_parse(xml)).splitlines(keepends=True)
        # ElementTree declares every namespace on the root element: noise for a person reading the diff.
        return [_ROOT_XMLNS.sub("", text[0]), *text[1:]] if text else text

    return "".join(difflib.unified_diff(lines(before), lines(after), f"{name}.xml (now)", f"{name}.xml (new)"))


def edit_profile_toml(current: str | None, mode: str, isolate: bool | None = None,
                      reset_risk: str | None = None) -> str | None:
    """A VM's TOML profile with ``mode`` (and ``isolate``, ``reset_risk`` when given); None (remove the file)
    for mode "none". Other keys are kept."""
    if mode == "none":
        return None
    try:
        data = tomllib.loads(current) if current else {}
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"the existing profile cannot be read: {err}") from err
    data["mode"] = mode
    if isolate is not None:
        data["isolate"] = isolate
    if reset_risk is not None:
        data["reset_risk"] = reset_risk
    return tomli_w.dumps(data)


def text_diff(before: str | None, after: str | None, path: str) -> str:
    old = (before or "").splitlines(keepends=True)
    new = (after or "").splitlines(keepends=True)
    return "".join(difflib.unified_diff(old, new, f"{path} ({'now' if before is not None else 'absent'})",
                                        f"{path} ({'new' if after is not None else 'removed'})"))
