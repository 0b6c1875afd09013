"""Forged, torn and broken journals: replayed as root, so every record is checked before anything runs, and
one bad journal blocks only its own VM."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from janus_hooks.journal import JournalStore, parse_journal
from janus_hooks.schema import quote
from tests.conftest import domain_xml
from tests.core.helpers import diff
from tests.fake import desktops, hosts
from tests.fake.world import snapshot_tree
from tests.hostile import tally

BOOT = "6b1e2c1a-0000-4000-8000-00000000b007"
XML = domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS)


def _begin(vm: str = "win11", **extra) -> dict:
    return {"type": "begin", "vm": vm, "boot_id": BOOT, "devices": [hosts.NVIDIA_GPU], "time": 1.0, "pid": 42,
            **extra}


def _intent(action: dict, old: dict | None = None, step: int = 0) -> dict:
    return {"type": "intent", "step": step, "action": action, "old": old or {}, "time": 2.0}


def _forge(root: Path, vm: str, lines: list) -> Path:
    path = root / "var/lib/janus-hooks/journal" / f"{vm}.jsonl"
    path.parent.mkdir(mode=0o700, exist_ok=True)
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


def _outside(tmp_path: Path) -> Path:
    """A directory outside the host root, shaped like a PCI device, that a forged record would write to."""
    target = tmp_path / "outside/dev0"
    target.mkdir(parents=True)
    (target / "driver_override").write_text("(null)\n")
    return target


FORGED = {
    "shell in display-commands": (
        _intent({"kind": "display-commands", "stop": ["sh", "-c", "true"], "start": ["sh", "-c", "id > /x"]}),
        "line 2: display-commands: stop: program 'sh' is not an absolute path"),
    "absolute address in bind-vfio": (
        _intent({"kind": "bind-vfio", "address": "{outside}", "host_driver": "nvidia"},
                {"driver": "nvidia", "override": "vfio-pci"}),
        "line 2: bind-vfio: address: {outside!r} is not a PCI address (0000:01:00.0)"),
    "option as unit name": (
        _intent({"kind": "stop-unit", "unit": "--root=/tmp/x.service"}, {"active": True}),
        "line 2: stop-unit: unit: '--root=/tmp/x.service' is not a systemd unit name"),
    "option as module name": (
        _intent({"kind": "unload-module", "module": "-r"}, {"loaded": True, "bound": {}}),
        "line 2: unload-module: module: '-r' is not a kernel module name"),
    "path in a driver name of the captured state": (
        _intent({"kind": "unload-module", "module": "nvidia"},
                {"loaded": True, "bound": {hosts.NVIDIA_GPU: "../../../../etc"}}),
        "line 2: unload-module state: bound: '../../../../etc' is not a driver name"),
    "vtconsole path": (
        _intent({"kind": "unbind-vtconsole", "name": "../../../etc"}, {"bound": True}),
        "line 2: unbind-vtconsole: name: '../../../etc' is not a vtconsole name (vtcon0)"),
    "option-like reset method": (
        _intent({"kind": "reset-method", "address": hosts.NVIDIA_GPU, "method": "device_specific\nbus"},
                {"methods": "bus"}),
        "line 2: reset-method: method: 'device_specific\\nbus' is not a reset method"),
    "path in a captured reset method": (
        _intent({"kind": "reset-method", "address": hosts.NVIDIA_GPU, "method": "device_specific"},
                {"methods": "../../../../etc/passwd"}),
        "line 2: reset-method state: methods: '../../../../etc/passwd' is not a list of reset methods"),
    "unknown kind": (_intent({"kind": "run-anything", "argv": ["/bin/sh"]}),
                     "line 2: unknown action kind 'run-anything'"),
    "unknown field": (_intent({"kind": "stop-unit", "unit": "gdm.service", "also": 1}, {"active": True}),
                      "line 2: stop-unit: unknown field 'also'"),
    "missing field": (_intent({"kind": "bind-vfio"}), "line 2: bind-vfio: missing field 'address'"),
    "bool as number": (
        _intent({"kind": "allocate-hugepages", "size_kb": True, "node": None, "pages": 1}, {"total": 0}),
        "line 2: allocate-hugepages: size_kb: True is not a whole number from 4 to 16777216"),
    "nan": ('{"type": "intent", "step": 0, "action": {"kind": "stop-unit", "unit": "gdm.service"}, '
            '"old": {"active": true}, "time": NaN}', "line 2 is not a JSON record"),
    "unknown record type": ({"type": "exec", "argv": ["/bin/sh"]}, "line 2: unknown record type 'exec'"),
    "done without intent": ({"type": "done", "step": 7, "ms": 1.0}, "line 2: done for step 7, which has no intent"),
}


@pytest.mark.parametrize("case", sorted(FORGED))
def test_forged_record_is_refused_with_file_and_line_before_anything_runs(fake, tmp_path, case):
    h = fake(hosts.single_nvidia)
    outside = _outside(tmp_path)
    record, expected = FORGED[case]
    if isinstance(record, dict):
        record = json.loads(json.dumps(record).replace("{outside}", str(outside)))
    path = _forge(h.root, "win11", [_begin(), record])
    before, outside_before = h.snapshot(), snapshot_tree(outside.parent)
    code, err = h.hook("win11", "release", "end", XML)
    assert code == 1
    assert err == f"janus-hooks: VM 'win11': journal {path} {expected.replace('{outside!r}', quote(str(outside)))}"
    assert "\n" not in err and len(err) <= 300 + len(str(path))
    assert h.kernel.ops == 0 and h.runner.calls == [] and h.services.calls == []
    tally.check_host(before, h.snapshot())
    tally.check_host(outside_before, snapshot_tree(outside.parent), "the tree outside the root")
    tally.record("inputs tried")


@pytest.mark.parametrize("content, expected", [
    ("", "has no begin record"),
    ("null\n", "line 1: the first record is not a begin record"),
    ('{"type": "begin"}\n', "line 1: missing field 'boot_id'"),
    ('{"type":"begin","vm":"other","boot_id":"unknown","devices":[],"time":1,"pid":1}\n',
     "line 1: it names VM 'other', not the VM of its file name"),
    ("\xff\xfe garbage\n", "line 1 is not a JSON record"),
])
def test_unreadable_journal_blocks_only_its_own_vm(make_cli, content, expected):
    """vm-b's journal is broken: win11 still starts and stops, devices/status/journal still answer, and
    rollback --discard clears vm-b after showing what it held."""
    c = make_cli(desktops.nvidia_desktop)
    path = c.root / "var/lib/janus-hooks/journal/vm-b.jsonl"
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.write_bytes(content.encode("latin-1"))
    os.chmod(path, 0o600)
    win11 = domain_xml(hostdevs=desktops.NVIDIA_CARD)
    assert c.fake.hook("win11", "prepare", "begin", win11) == (0, "")
    assert c("devices").exit_code == 0
    status = c("status")
    assert status.exit_code == 0 and f"journal unreadable ('janus-hooks rollback vm-b --discard'): journal {path}" \
        in status.output
    shown = c("journal")
    assert shown.exit_code == 1 and "VM 'win11': started" in shown.output
    assert (f"janus-hooks: journal {path} {expected}; 'janus-hooks rollback vm-b --discard' shows it and moves "
            "it aside") in shown.output
    assert c.fake.hook("win11", "release", "end", win11) == (0, "")
    code, err = c.fake.hook("vm-b", "release", "end", domain_xml("vm-b", hostdevs=()))
    assert code == 1 and err.startswith(f"janus-hooks: VM 'vm-b': journal {path}") and expected in err
    rollback = c("rollback", "vm-b")
    assert rollback.exit_code == 1 and "'janus-hooks rollback vm-b --discard' shows it and moves it aside" in \
        rollback.output
    discard = c("rollback", "vm-b", "--discard")
    assert discard.exit_code == 0, discard.output
    assert f"VM 'vm-b': journal {path} held" in discard.output and "nothing was reverted" in discard.output
    assert not path.exists() and c.fake.journal_vms() == []
    [kept] = (c.root / "var/lib/janus-hooks/discarded").iterdir()
    assert kept.read_bytes() == content.encode("latin-1")
    tally.record("inputs tried")


def test_torn_tail_is_cut_before_the_next_append(fake):
    """A crash mid-append, then a release whose reverted records follow it: the file stays readable."""
    h = fake(hosts.single_nvidia)
    before = h.snapshot()
    assert h.hook("win11", "prepare", "begin", XML)[0] == 0
    journal = h.root / "var/lib/janus-hooks/journal/win11.jsonl"
    intact = journal.read_bytes()
    with journal.open("ab") as fh:
        fh.write(b'{"type":"reverted","st')
    # The wait step changes nothing, so marking it reverted here leaves the host as the journal says.
    wait = next(s.index for s in parse_journal(journal, "win11").steps if s.action.kind == "wait-released")
    store = JournalStore(journal.parent.parent)
    with store.append_writer("win11") as writer:
        writer.reverted(wait)
    assert journal.read_bytes() == intact + b'{"step":%d,"type":"reverted"}\n' % wait
    assert parse_journal(journal, "win11").steps[wait].reverted
    assert h.hook("win11", "release", "end", XML) == (0, "")
    assert diff(before, h.snapshot()) == []
    tally.record("faults injected")


def test_every_action_kind_declares_a_closed_schema_for_its_fields():
    """A new action kind must say what its journal records may hold (else the journal refuses it)."""
    import dataclasses

    from janus_hooks.actions import action_kinds

    for kind, cls in action_kinds().items():
        assert set(cls.schema) == {f.name for f in dataclasses.fields(cls)}, kind
    with pytest.raises(TypeError, match="must declare schema and old_schema"):
        from janus_hooks.actions import Action

        type("Undeclared", (Action,), {"kind": "undeclared"})
