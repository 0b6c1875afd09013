"""The unattended-setup medium: Autounattend.xml filled through ElementTree, packed into an ISO with pycdlib."""

from __future__ import annotations

import io
from xml.etree import ElementTree

import pycdlib

from janus_hooks.vm.unattend import UNATTEND_NS, autounattend, computer_name, iso_image

NS = {"u": UNATTEND_NS}


def test_the_account_and_computer_name_land_where_setup_reads_them():
    xml = autounattend("gaming-pc_2026.v2", "Ann <&> O'Neil", 'p"a<s>s&w')
    root = ElementTree.fromstring(xml)
    account = root.find(".//u:LocalAccount", NS)
    assert account.findtext("u:Name", namespaces=NS) == "Ann <&> O'Neil"
    assert account.findtext("u:Password/u:Value", namespaces=NS) == 'p"a<s>s&w'
    assert account.findtext("u:Group", namespaces=NS) == "Administrators"
    assert root.findtext(".//u:ComputerName", namespaces=NS) == "gaming-pc-2026"  # 15 characters at most
    assert b"{" not in xml  # no placeholder left


def test_computer_names_are_netbios_names():
    assert computer_name("win11") == "win11"
    assert computer_name("a" * 40) == "a" * 15
    assert computer_name("12345") == "WINDOWS-VM"  # all digits is not a valid computer name
    assert computer_name("...") == "WINDOWS-VM"


def test_the_iso_holds_autounattend_under_its_long_name():
    data = b'<?xml version="1.0"?><unattend/>'
    image = iso_image({"Autounattend.xml": data})
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(image))
    try:
        joliet, plain = io.BytesIO(), io.BytesIO()
        iso.get_file_from_iso_fp(joliet, joliet_path="/Autounattend.xml")
        iso.get_file_from_iso_fp(plain, iso_path="/AUTOUNAT.XML;1")
        assert joliet.getvalue() == plain.getvalue() == data
        assert iso.pvd.volume_identifier.rstrip() == b"UNATTEND"
    finally:
        iso.close()
