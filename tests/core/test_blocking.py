"""Kernel writes that can block: a real child with a deadline, and the switch around a write that never ends."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import pytest

from janus_hooks.errors import KernelError, KernelTimeout
from janus_hooks.host.blocking import WRITER_NAME, write_with_deadline
from tests.conftest import domain_xml
from tests.core.helpers import assert_same_tree
from tests.fake import hosts
from tests.fake.kernel import FakeKernel
from tests.fake.world import kill_process, spawn_process

XML = domain_xml(hostdevs=hosts.DESKTOP_FUNCTIONS)
PLAYER = {"pid": 4300, "comm": "pw-play", "fds": ["/dev/snd/pcmC0D0p"], "cgroup": "/system.slice/alarm.service"}


def _gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            return
        time.sleep(0.01)
    raise AssertionError(f"writer {pid} did not finish")


def test_real_write_past_its_deadline_leaves_a_bare_child_that_finishes_later(tmp_path):
    fifo = tmp_path / "unbind"
    os.mkfifo(fifo)
    # The host-wide lock, held as the engine holds it while it writes.
    lock = os.open(tmp_path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    start = time.monotonic()
    # Opening a FIFO for writing blocks until a reader comes: a store() that waits, as a held device's does.
    with pytest.raises(KernelTimeout) as caught:
        write_with_deadline(fifo, "0000:00:02.1", 0.3)
    assert 0.3 <= time.monotonic() - start < 3
    pid = caught.value.pid
    assert f"writing '0000:00:02.1' to {fifo} did not finish within 0.3 s" in str(caught.value)
    try:
        # The child holds nothing of ours: its stdin pipe (closed on our side), /dev/null, its error file;
        # no lock, no journal, no libvirt pipe.
        fds = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert set(fds) <= {0, 1, 2}
        assert fds[1] == "/dev/null" and fds[2].startswith("/memfd:janus-hooks-write")
        assert open(f"/proc/{pid}/comm").read().strip() == WRITER_NAME
        other = os.open(tmp_path / "lock", os.O_RDWR)
        fcntl.flock(lock, fcntl.LOCK_UN)
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else holds it
        os.close(other)
        # The holder lets go: the write completes.
        reader = os.open(fifo, os.O_RDONLY)
        assert os.read(reader, 100) == b"0000:00:02.1"
        _gone(pid)
        os.close(reader)
    finally:
        os.close(lock)


def test_real_write_reports_the_kernel_answer(tmp_path):
    target = tmp_path / "drivers_probe"
    target.write_text("")
    write_with_deadline(target, "0000:01:00.0", 5)
    assert target.read_text() == "0000:01:00.0"
    with pytest.raises(KernelError) as caught:
        write_with_deadline(tmp_path / "missing" / "unbind", "x", 5)
    assert str(caught.value) == f"cannot open {tmp_path / 'missing' / 'unbind'}: No such file or directory"
    assert caught.value.errno == 2
    # Never created, as a sysfs file cannot be.
    with pytest.raises(KernelError):
        write_with_deadline(tmp_path / "bind", "x", 5)
    assert not (tmp_path / "bind").exists()
    # What the kernel answers to the write itself (here a full device) comes back with its errno.
    with pytest.raises(KernelError) as caught:
        write_with_deadline(Path("/dev/full"), "1", 5)
    assert str(caught.value) == "writing '1' to /dev/full failed: No space left on device"
    assert caught.value.errno == 28


def test_audio_unbind_that_blocks_keeps_the_step_pending_until_the_holder_lets_go(fake):
    def player_right_before_unbind(n, op, target):
        # A player opens the PCM after the last check, as the unbind is written.
        if target.endswith("snd_hda_intel/unbind") and not (fake_host.root / "proc/4300").exists():
            spawn_process(fake_host.root, PLAYER)
        return False

    fake_host = h = fake(hosts.systemd_desktop)
    before = h.snapshot()
    h.kernel = FakeKernel(h.root, fault=player_right_before_unbind)
    code, err = h.hook("win11", "prepare", "begin", XML)
    assert code == 1 and "\n" not in err
    assert err.startswith("janus-hooks: VM 'win11': bind 0000:00:02.1 to vfio-pci: writing '0000:00:02.1' to ")
    # The temporary root's long path can push the middle out of libvirt's line: the hook's log has it whole.
    assert "did not finish within the deadline" in (h.root / "var/log/janus-hooks/hook.log").read_text()
    assert err.endswith("the journal keeps this step: once that write finished, the VM's release or "
                        "'janus-hooks rollback win11' puts the host back")
    assert h.journal_vms() == ["win11"]
    state = h.janus().store.read("win11")
    assert state.steps[-1].pending == {"pid": 9100, "command": "dd"}
    # libvirt's release end right after: the write still sleeps, nothing older can come back yet.
    h.kernel = FakeKernel(h.root)
    code, err = h.hook("win11", "release", "end", XML)
    assert code == 1
    assert "undo bind 0000:00:02.1 to vfio-pci: its kernel write is still pending (pid 9100" in err
    assert h.journal_vms() == ["win11"]
    # The player goes; the unbind completes; the next release puts everything back.
    kill_process(h.root, 4300)
    assert not (h.root / "proc/9100").exists()
    assert h.hook("win11", "release", "end", XML) == (0, "")
    assert h.journal_vms() == []
    assert_same_tree(before, h.snapshot())


def test_holder_that_appears_before_the_unbind_is_never_unbound_under(fake):
    def player_after_the_wait(n, op, target):
        if (op, target) == ("load", "vfio_iommu_type1"):
            spawn_process(fake_host.root, PLAYER)
        return False

    fake_host = h = fake(hosts.systemd_desktop)
    before = h.snapshot()
    h.kernel = FakeKernel(h.root, fault=player_after_the_wait)
    code, err = h.hook("win11", "prepare", "begin", XML)
    assert (code, err) == (1, "janus-hooks: VM 'win11': bind 0000:00:02.1 to vfio-pci: 0000:00:02.1 is held by "
                              "pid 4300 (pw-play) via /dev/snd/pcmC0D0p: not unbinding it while it is")
    assert not any(op == "write" and target.endswith("snd_hda_intel/unbind") for op, target, _ in h.kernel.log)
    assert h.journal_vms() == []
    kill_process(h.root, 4300)
    assert_same_tree(before, h.snapshot())
