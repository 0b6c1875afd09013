"""Domain XML from ``templates/libvirt/``: one base template plus blocks injected by name, as ElementTree.

A block file is ``<block>`` with ``<into path="...">`` children; the children of each ``into`` are appended
to the element at that path of the base (``.`` is ``<domain>``; missing elements on the path are created).
Placeholders are whole attribute values or texts of the form ``{key}``; ``fill`` replaces them through
ElementTree, so a person's value can never become markup. A placeholder left without a value is an error.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from pathlib import Path
from xml.etree import ElementTree

from janus_hooks.domain import PROFILE_NS
from janus_hooks.errors import ConfigError
from janus_hooks.resources import data_dir

VM_NS = "https://janus-hooks.org/xmlns/vm/1"  # what `vm create` made for a VM, so that `vm delete` finds it
_PLACEHOLDER = re.compile(r"\{([a-z_][a-z0-9_]*)\}")
_DTD = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)

ElementTree.register_namespace("janus", PROFILE_NS)
ElementTree.register_namespace("janusvm", VM_NS)


def templates_dir() -> Path:
    return data_dir("templates") / "libvirt"


def _load(path: Path) -> ElementTree.Element:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: {err.strerror}") from err
    if _DTD.search(text):
        raise ConfigError(f"{path}: a DOCTYPE or ENTITY declaration is refused")
    try:
        return ElementTree.fromstring(text)
    except ElementTree.ParseError as err:
        raise ConfigError(f"{path}: {err}") from err


def base(name: str, directory: Path | None = None) -> ElementTree.Element:
    """The base template ``templates/libvirt/<name>.xml`` (a ``<domain>``)."""
    root = _load((directory or templates_dir()) / f"{name}.xml")
    if root.tag != "domain":
        raise ConfigError(f"template {name}.xml is not a <domain>")
    return root


def block(name: str, directory: Path | None = None) -> ElementTree.Element:
    path = (directory or templates_dir()) / "blocks" / f"{name}.xml"
    root = _load(path)
    if root.tag != "block" or not all(child.tag == "into" and child.get("path") for child in root):
        raise ConfigError(f"{path}: expected <block> holding <into path=...> elements")
    return root


def _element_at(domain: ElementTree.Element, path: str) -> ElementTree.Element:
    element = domain
    for part in (p for p in path.split("/") if p not in ("", ".")):
        found = element.find(part)
        if found is None:
            found = ElementTree.SubElement(element, part)
        element = found
    return element


def inject(domain: ElementTree.Element, name: str, values: Mapping[str, object] | None = None,
           directory: Path | None = None) -> None:
    """Append block ``name`` (its placeholders filled from ``values``) to ``domain``."""
    for into in block(name, directory):
        target = _element_at(domain, into.get("path", "."))
        for child in into:
            part = copy.deepcopy(child)
            part.tail = None
            fill(part, values or {}, f"block {name}")
            target.append(part)


def fill(element: ElementTree.Element, values: Mapping[str, object], where: str) -> None:
    """Replace every ``{key}`` attribute value or text below ``element`` by ``str(values[key])``."""
    for node in element.iter():
        for attr, value in node.attrib.items():
            node.set(attr, _value(value, values, where))
        if node.text and node.text.strip():
            node.text = _value(node.text.strip(), values, where)


def _value(text: str, values: Mapping[str, object], where: str) -> str:
    match = _PLACEHOLDER.fullmatch(text)
    if not match:
        if _PLACEHOLDER.search(text):
            raise ConfigError(f"{where}: a placeholder must be a whole value, found {text!r}")
        return text
    key = match.group(1)
    if key not in values:
        raise ConfigError(f"{where}: no value for placeholder {{{key}}}")
    return str(values[key])


def unfilled(domain: ElementTree.Element) -> list[str]:
    """Placeholders still in the document (a base template filled last): each one is a bug."""
    found = []
    for node in domain.iter():
        for value in [*node.attrib.values(), node.text or ""]:
            found += _PLACEHOLDER.findall(value.strip()) if _PLACEHOLDER.fullmatch(value.strip()) else []
    return found


def serialize(domain: ElementTree.Element) -> str:
    domain = copy.deepcopy(domain)
    for node in domain.iter():
        node.tail = None
        if len(node):
            node.text = None
    ElementTree.indent(domain, space="  ")
    return ElementTree.tostring(domain, encoding="unicode") + "\n"
