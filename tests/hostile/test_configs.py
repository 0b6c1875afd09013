"""Hostile and careless janus.toml: a start refuses naming the file and the key; a release and a rollback
fall back to the defaults so the desktop always comes back; the CLI never prints a traceback."""

from __future__ import annotations

import pytest

from tests.conftest import domain_xml
from tests.fake import desktops
from tests.hostile import tally

XML = domain_xml(hostdevs=desktops.NVIDIA_CARD)

BAD = {
    "table as string": (b'display = "x"\n', "display must be a table ([display]), not str"),
    "table as number": (b"timeouts = 5\n", "timeouts must be a table ([timeouts]), not int"),
    "latin-1 byte": (b'log_level = "d\xe9bug"\n', "not UTF-8 text (byte 14)"),
    "nan timeout": (b"[timeouts]\nunit_stop = nan\n",
                    "timeouts.unit_stop: nan is not a finite number from 0.01 to 3600"),
    "inf timeout": (b"[timeouts]\nlock = inf\n", "timeouts.lock: inf is not a finite number from 0.01 to 3600"),
    "zero timeout": (b"[timeouts]\ndriver = 0\n", "timeouts.driver: 0 is not a finite number from 0.01 to 3600"),
    "string timeout": (b'[timeouts]\ndriver = "5"\n', "timeouts.driver: '5' is not a number"),
    "relative start command": (b'[display]\nstop_command = ["/usr/bin/sv", "down", "x"]\n'
                               b'start_command = ["sv", "up", "x"]\n',
                               "display.start_command: program 'sv' is not an absolute path"),
    "one command alone": (b'[display]\nstop_command = ["/usr/bin/sv", "down", "x"]\n',
                          "display.stop_command and display.start_command go together: set both"),
    "typo in a key": (b'[display]\nstop_unit = ["x.service"]\n',
                      "unknown key 'display.stop_unit'; did you mean display.stop_units?"),
    "typo in a table": (b"[timeout]\nlock = 5\n", "unknown key 'timeout'; did you mean timeouts?"),
    "string for a bool": (b'[display]\nend_sessions = "no"\n', "display.end_sessions: 'no' is not true or false"),
    "option as unit": (b'[display]\nstop_units = ["--root=/x"]\n',
                       "display.stop_units: '--root=/x' is not a systemd unit name"),
    "option as manager": (b'[display]\nmanager = "-H"\n', "display.manager: '-H' is not a systemd unit name"),
    "unknown log level": (b'log_level = "loud"\n', "log_level: 'loud' is not one of debug, info, warning, error"),
    "toml syntax": (b"[display\n", "Expected ']' at the end of a table declaration (at line 1, column 9)"),
}


CONFIG = "etc/janus-hooks/janus.toml"


@pytest.mark.parametrize("case", sorted(BAD))
def test_broken_config_refuses_a_start_naming_file_and_key(make_cli, case):
    content, reason = BAD[case]
    c = make_cli(desktops.nvidia_desktop)
    path = c.root / CONFIG
    before = c.fake.snapshot()
    path.write_bytes(content)
    code, err = c.fake.hook("win11", "prepare", "begin", XML)
    assert (code, err) == (1, f"janus-hooks: VM 'win11': {path}: {reason}")
    tally.check_host(before, c.fake.snapshot(), ignore=(CONFIG,))
    assert not list((c.root / "var/lib/janus-hooks").glob("journal/*.jsonl"))
    tally.record("inputs tried")


@pytest.mark.parametrize("case", ["table as string", "latin-1 byte", "nan timeout", "typo in a table"])
def test_broken_config_never_keeps_the_desktop_from_coming_back(make_cli, case):
    """release and rollback fall back to the defaults; plan and check say what is wrong, no traceback."""
    content, reason = BAD[case]
    c = make_cli(desktops.nvidia_desktop)
    path = c.root / CONFIG
    before = c.fake.snapshot()
    good = path.read_bytes()
    assert c.fake.hook("win11", "prepare", "begin", XML) == (0, "")
    path.write_bytes(content)
    assert c.fake.hook("win11", "release", "end", XML) == (0, "")
    tally.check_host(before, c.fake.snapshot(), ignore=(CONFIG,))
    path.write_bytes(good)
    assert c.fake.hook("win11", "prepare", "begin", XML) == (0, "")
    path.write_bytes(content)
    rollback = c("rollback", "win11")
    assert rollback.exit_code == 0 and "the journal is closed" in rollback.output
    tally.check_host(before, c.fake.snapshot(), ignore=(CONFIG,))
    xml_file = c.root.parent / "win11.xml"
    xml_file.write_text(XML)
    plan = c("plan", "win11", "--xml", str(xml_file))
    assert plan.exit_code == 1 and plan.output == f"janus-hooks: {path}: {reason}\n"
    check = c("check")
    assert "Traceback" not in check.output and f"{path}: {reason}" in check.output


def test_unknown_profile_key_and_bad_mode_refuse_the_start(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    profile = c.root / "etc/janus-hooks/vms/win11.toml"
    profile.parent.mkdir(parents=True, exist_ok=True)
    xml = domain_xml(hostdevs=desktops.NVIDIA_CARD, mode=None)
    cases = ((b'mode = "single-gpu"\nstop_unit = []\n', "unknown key 'stop_unit'; did you mean stop_units?"),
             (b'mode = "both"\n', "mode: 'both' is not one of single-gpu, passthrough"))
    for content, reason in cases:
        profile.write_bytes(content)
        assert c.fake.hook("win11", "prepare", "begin", xml) == (1, f"janus-hooks: VM 'win11': {profile}: {reason}")
        tally.record("inputs tried")
