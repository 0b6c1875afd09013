"""Hostile domain XML and hook inputs: bounded work, one bounded line that quotes input only as short
validated tokens, nothing changed on the host."""

from __future__ import annotations

import io

import pytest

from janus_hooks import hook
from tests.conftest import domain_xml
from tests.fake import desktops
from tests.hostile import tally

CARD = desktops.NVIDIA_CARD


def _run(c, vm: str, data: bytes) -> tuple[int, str]:
    err = io.StringIO()
    code = hook.main([vm, "prepare", "begin", "-"], root=str(c.root), stdin=io.TextIOWrapper(io.BytesIO(data)),
                     stderr=err, open_janus=c.fake.janus)
    return code, err.getvalue()


@pytest.mark.parametrize("case, expected", [
    ("huge nodeset", "janus-hooks: VM 'win11': nodeset part '0-1000000000000' is not within nodes 0-1023"),
    ("invalid byte in 20 MB", "janus-hooks: VM 'win11': domain XML cannot be parsed ("),
    ("hostdev address out of range", "janus-hooks: VM 'win11': <hostdev> address bus '0x1ff' is not a number "
                                     "from 0 to 0xff"),
    ("memory not a number", "janus-hooks: VM 'win11': domain XML holds a value that is not a number (ValueError)"),
])
def test_hostile_domain_xml_gives_one_bounded_line(make_cli, case, expected):
    c = make_cli(desktops.nvidia_desktop)
    before = c.fake.snapshot()
    if case == "huge nodeset":
        data = domain_xml(hostdevs=CARD, hugepages=True, nodeset="0-1000000000000").encode()
    elif case == "invalid byte in 20 MB":
        xml = domain_xml(hostdevs=CARD)
        data = xml.replace("</devices>", "<!--" + "x" * (20 << 20) + "\xff-->" + "</devices>").encode("latin-1")
    elif case == "hostdev address out of range":
        data = domain_xml(hostdevs=CARD).replace("bus='0x01'", "bus='0x1ff'", 1).encode()
    else:
        data = domain_xml(hostdevs=CARD).replace(f"<memory unit='KiB'>{4096 * 1024}", "<memory unit='KiB'>4e9").encode()
    code, err = _run(c, "win11", data)
    assert code == 1 and err.startswith(expected) and err.count("\n") == 1 and len(err) <= hook.MAX_LINE + 1, err[:600]
    tally.check_host(before, c.fake.snapshot())
    tally.record("inputs tried")


@pytest.mark.parametrize("vm", [" spaced ", "ünïcödé ☃", "a" * 200, "é" * 300, "%/." * 100])
def test_any_libvirt_name_starts_and_stops(make_cli, vm):
    """Leading and trailing spaces and non-ASCII names (stdin read as bytes under LC_ALL=C) work both ways."""
    c = make_cli(desktops.nvidia_desktop)
    before = c.fake.snapshot()
    escaped = vm.replace("&", "&amp;")
    data = domain_xml(hostdevs=CARD).replace("<name>win11</name>", f"<name>{escaped}</name>").encode()
    assert _run(c, vm, data) == (0, "")
    assert c.fake.journal_vms() == [vm]
    err = io.StringIO()
    code = hook.main([vm, "release", "end", "-"], root=str(c.root), stdin=io.TextIOWrapper(io.BytesIO(data)),
                     stderr=err, open_janus=c.fake.janus)
    assert (code, err.getvalue()) == (0, "")
    tally.check_host(before, c.fake.snapshot())
    tally.record("inputs tried")


def test_a_name_too_long_for_a_file_name_is_shortened_with_a_hash():
    from janus_hooks.layout import is_hashed, vm_filename

    long_a, long_b = "x" * 300 + "a", "x" * 300 + "b"
    assert is_hashed(vm_filename(long_a)) and vm_filename(long_a) != vm_filename(long_b)
    assert all(len((vm_filename(v) + ".jsonl").encode()) <= 255 for v in (long_a, "é" * 300, "%" * 300))


def test_a_symlinked_hook_log_is_not_followed(make_cli, tmp_path):
    """Root's log lines never land where a symbolic link in the log directory points; the start goes on."""
    c = make_cli(desktops.nvidia_desktop)
    outside = tmp_path / "outside.txt"
    outside.write_text("untouched\n")
    log_dir = c.root / "var/log/janus-hooks"
    (log_dir / "hook.log").symlink_to(outside)
    xml = domain_xml(hostdevs=CARD)
    assert c.fake.hook("win11", "prepare", "begin", xml) == (0, "")
    assert c.fake.hook("win11", "release", "end", xml) == (0, "")
    assert outside.read_text() == "untouched\n"
    assert (log_dir / "hook.log").is_symlink()
    tally.record("inputs tried")
