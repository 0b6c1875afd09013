"""The write-ahead journal: torn records, corruption, unsafe files, reboots, the host-wide lock."""

from __future__ import annotations

import os
import shutil
import threading

import pytest

from janus_hooks.errors import JournalError, UnsafeStateError
from janus_hooks.journal import JournalStore, parse_journal
from tests.conftest import domain_xml
from tests.core.helpers import assert_same_tree
from tests.fake import hosts

XML = domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS, hugepages=True)


def _journal(h):
    return h.root / "var/lib/janus-hooks/journal/win11.jsonl"


def test_records_are_written_before_each_change(fake):
    h = fake(hosts.single_nvidia)
    seen = []

    def observer(event, step):
        if event == "intent":
            # The change is not made yet, but its intent is already on disk with the old state.
            last = _journal(h).read_text().splitlines()[-1]
            seen.append(last)

    from janus_hooks.domain import parse_domain

    h.janus(observer=observer).prepare(parse_domain(XML))
    assert len(seen) == 16
    assert all('"type":"intent"' in line and '"old":' in line for line in seen)
    state = parse_journal(_journal(h))
    assert state.complete and all(s.done for s in state.steps)
    assert oct(_journal(h).stat().st_mode & 0o777) == "0o600"


def test_torn_last_line_is_ignored(fake):
    h = fake(hosts.single_nvidia)
    before = h.snapshot()
    assert h.hook("win11", "prepare", "begin", XML)[0] == 0
    with _journal(h).open("a") as fh:
        fh.write('{"type":"reverted","st')  # a crash in the middle of an append
    assert h.hook("win11", "release", "end", XML) == (0, "")
    assert_same_tree(before, h.snapshot())


def test_corrupt_line_in_the_middle_is_an_error(fake):
    h = fake(hosts.single_nvidia)
    assert h.hook("win11", "prepare", "begin", XML)[0] == 0
    lines = _journal(h).read_text().splitlines()
    lines[3] = lines[3][:10]
    _journal(h).write_text("\n".join(lines) + "\n")
    code, err = h.hook("win11", "release", "end", XML)
    assert code == 1 and "win11.jsonl line 4 is not a JSON record" in err


def test_journal_writable_by_others_is_refused(fake):
    h = fake(hosts.single_nvidia)
    assert h.hook("win11", "prepare", "begin", XML)[0] == 0
    os.chmod(_journal(h), 0o666)
    code, err = h.hook("win11", "release", "end", XML)
    assert code == 1 and "writable by group or others" in err and "win11.jsonl" in err


def test_state_dir_readable_by_others_is_refused(fake):
    h = fake(hosts.single_nvidia)
    os.chmod(h.root / "var/lib/janus-hooks", 0o755)
    code, err = h.hook("win11", "prepare", "begin", XML)
    assert code == 1
    assert err.endswith("var/lib/janus-hooks has mode 755, others can read or change it; expected 700")


def test_config_writable_by_others_is_refused(fake):
    h = fake(hosts.single_nvidia)
    os.chmod(h.root / "etc/janus-hooks/janus.toml", 0o666)
    code, err = h.hook("win11", "prepare", "begin", XML)
    assert code == 1 and "janus.toml is writable by group or others" in err


def test_after_reboot_kernel_changes_are_known_to_be_gone(fake):
    h = fake(hosts.single_nvidia)
    before = h.snapshot()
    assert h.hook("win11", "prepare", "begin", XML)[0] == 0
    # The machine rebooted: a new boot id, and the kernel state is fresh (as the tree was before).
    from tests.fake.world import snapshot_tree

    journal = _journal(h).read_bytes()
    config = (h.root / "etc/janus-hooks/janus.toml").read_bytes()
    shutil.rmtree(h.root)
    hosts.single_nvidia(h.root)
    (h.root / "etc/janus-hooks").mkdir()
    (h.root / "etc/janus-hooks/janus.toml").write_bytes(config)
    (h.root / "var/lib/janus-hooks/journal").mkdir(mode=0o700)
    _journal(h).write_bytes(journal)
    os.chmod(_journal(h), 0o600)
    (h.root / "proc/sys/kernel/random/boot_id").write_text("a-new-boot\n")
    ops = h.kernel.ops
    assert h.hook("win11", "release", "end", XML) == (0, "")
    assert h.kernel.ops == ops  # nothing was written: driver_override & co. died with the old boot
    assert h.services.calls.count(("start", "gdm3.service")) == 0
    after = snapshot_tree(h.root)
    after.pop("proc/sys/kernel/random/boot_id")
    before.pop("proc/sys/kernel/random/boot_id")
    assert_same_tree(before, after)
    assert h.journal_vms() == []


def test_lock_serialises_transitions(tmp_path):
    store = JournalStore(tmp_path / "state")
    entered = threading.Event()
    release = threading.Event()

    def holder():
        with store.lock(5):
            entered.set()
            release.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    assert entered.wait(5)
    with pytest.raises(JournalError, match="holds .*lock for more than 0.2 s"):
        with store.lock(0.2):
            pass
    release.set()
    t.join()
    with store.lock(1):
        pass


def test_state_dir_that_others_can_write_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o777)
    os.chmod(target, 0o777)
    store = JournalStore(target)
    with pytest.raises(UnsafeStateError, match="mode 777"):
        store.prepare()


def test_state_dir_must_not_be_a_symlink(tmp_path):
    """Even to a private directory of ours: journals would move wherever the link points."""
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (tmp_path / "state").symlink_to(target)
    store = JournalStore(tmp_path / "state")
    with pytest.raises(UnsafeStateError, match=r"state is a symbolic link; refusing to keep state where it points"):
        store.prepare()
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("vm", ["win11", "a b 'c' \"d\"", "100%/x", "%2F", ".", "..", "a.b"])
def test_vm_file_names_round_trip(vm):
    from janus_hooks.layout import vm_filename, vm_from_filename

    name = vm_filename(vm)
    assert "/" not in name and name not in (".", "..")
    assert vm_from_filename(name) == vm
