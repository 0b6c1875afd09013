"""Unattended Windows setup: ``templates/Autounattend.xml`` filled through ElementTree, packed into a small
ISO with pycdlib (Windows setup looks for ``Autounattend.xml`` at the root of every removable medium).

The ISO holds the account's password in clear text, as Autounattend.xml requires for a local account:
``apply`` stores it with mode 0600 and ``vm delete`` removes it.
"""

from __future__ import annotations

import io
import re
from xml.etree import ElementTree

from janus_hooks.resources import data_file
from janus_hooks.vm.template import fill

UNATTEND_NS = "urn:schemas-microsoft-com:unattend"
WCM_NS = "http://schemas.microsoft.com/WMIConfig/2002/State"
ElementTree.register_namespace("", UNATTEND_NS)
ElementTree.register_namespace("wcm", WCM_NS)


def computer_name(vm: str) -> str:
    """A NetBIOS computer name from the VM name: at most 15 letters, digits or hyphens."""
    name = re.sub(r"[^A-Za-z0-9-]", "-", vm)[:15].strip("-")
    return name if name and not name.isdigit() else "WINDOWS-VM"


def autounattend(vm: str, user: str, password: str) -> bytes:
    """Autounattend.xml for ``vm`` with one local administrator ``user``."""
    root = ElementTree.fromstring(data_file("templates", "Autounattend.xml").read_bytes())
    fill(root, {"computer_name": computer_name(vm), "user": user, "password": password}, "Autounattend.xml")
    return b'<?xml version="1.0" encoding="utf-8"?>\n' + ElementTree.tostring(root, encoding="utf-8",
                                                                              xml_declaration=False)


def iso_image(files: dict[str, bytes], label: str = "UNATTEND") -> bytes:
    """An ISO 9660 image with Joliet names (Windows reads the long, mixed-case names from Joliet)."""
    import pycdlib  # only `vm create` needs it

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, vol_ident=label)
    try:
        for name, data in files.items():
            short = re.sub(r"[^A-Z0-9_.]", "_", name.upper())
            stem, _, ext = short.rpartition(".")
            iso.add_fp(io.BytesIO(data), len(data), f"/{stem[:8]}.{ext[:3]};1", joliet_path=f"/{name}")
        out = io.BytesIO()
        iso.write_fp(out)
        return out.getvalue()
    finally:
        iso.close()
