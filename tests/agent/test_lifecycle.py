"""Rollback decisions on libvirt lifecycle events (libvirt's test driver) and on QEMU's death (pidfd)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.conftest import domain_xml
from tests.core.helpers import assert_same_tree
from tests.fake import hosts
from tests.fake.world import write


def _switched(fake, vm: str = "test"):
    h = fake(hosts.single_nvidia)
    before = h.snapshot()
    code, err = h.hook(vm, "prepare", "begin", domain_xml(name=vm, hostdevs=hosts.NVIDIA_FUNCTIONS))
    assert code == 0, err
    assert h.journal_vms() == [vm]
    return h, before


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up after {timeout:g} s waiting for {what}"
        time.sleep(0.01)


def test_running_vm_is_left_alone_and_a_stopped_one_rolled_back(fake, run_agent, test_driver, caplog):
    h, before = _switched(fake)
    agent = run_agent(h)
    _wait(lambda: agent.agent.libvirt_up, 10, "the agent to connect to the test driver")
    agent.idle()
    assert h.journal_vms() == ["test"], "a VM libvirt runs was rolled back"
    test_driver.lookupByName("test").destroy()  # a real STOPPED event from libvirt
    _wait(lambda: not h.journal_vms(), 10, "the rollback after the STOPPED event")
    agent.idle()
    assert_same_tree(before, h.snapshot())
    assert agent.agent.rollbacks == ["test"]
    assert "VM test: rolled back (libvirt reported it stopped)" in caplog.text


def test_stopped_vm_found_at_connect_is_rolled_back(fake, run_agent, test_driver):
    h, before = _switched(fake)
    test_driver.lookupByName("test").destroy()  # stopped before the agent ran: found by the resync
    agent = run_agent(h)
    _wait(lambda: not h.journal_vms(), 10, "the rollback found by the resync")
    agent.idle()
    assert_same_tree(before, h.snapshot())


def test_a_hook_holding_the_lock_is_waited_for_not_raced(fake, run_agent, test_driver, caplog):
    h, before = _switched(fake)
    agent = run_agent(h)
    _wait(lambda: agent.agent.libvirt_up, 10, "the connection")
    store = h.janus().store
    with store.lock(5):  # a hook mid-transition
        test_driver.lookupByName("test").destroy()
        _wait(lambda: "a hook holds the host-wide lock; looking again" in caplog.text, 10, "the busy lock")
        assert h.journal_vms() == ["test"]
    _wait(lambda: not h.journal_vms(), 10, "the rollback once the lock is free")
    agent.idle()
    assert_same_tree(before, h.snapshot())


def test_a_newer_journal_written_meanwhile_is_not_rolled_back(fake):
    h, _ = _switched(fake)
    janus = h.janus(restoring=True)
    report = janus.release("test", lock_timeout=0, begun=janus.store.read("test").started - 1)
    assert report.reverted == 0 and h.journal_vms() == ["test"]


def _fake_qemu(h, vm: str) -> subprocess.Popen:
    """A real process whose QEMU-like command line the fake /proc shows (the agent follows it by pidfd)."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],  # noqa: S603
                            stdin=subprocess.PIPE)
    write(h.root / "proc" / str(proc.pid) / "cmdline", f"qemu-system-x86_64\0-name\0guest={vm},debug-threads=on\0")
    return proc


def test_qemu_death_while_libvirt_is_away_rolls_back_at_once(fake, run_agent, caplog):
    h, before = _switched(fake, "vmq")
    qemu = _fake_qemu(h, "vmq")
    # libvirt down: the agent follows QEMU itself; no grace (nobody else will call release end).
    agent = run_agent(h, libvirt=False, release_grace=30)
    _wait(lambda: "vmq" in agent.agent.qemu.watching(), 10, "the agent to follow the QEMU of vmq")
    assert h.journal_vms() == ["vmq"]
    # The fake /proc entry goes first, as a dead QEMU's real cmdline reads empty at once.
    (h.root / "proc" / str(qemu.pid) / "cmdline").unlink()
    qemu.kill()
    qemu.wait(10)
    _wait(lambda: not h.journal_vms(), 10, "the rollback after QEMU died")
    agent.idle()
    assert f"VM vmq: QEMU pid {qemu.pid} exited (journal open)" in caplog.text
    assert "rolled back (its QEMU exited while libvirt is away)" in caplog.text
    before_tree = {k: v for k, v in before.items() if not k.startswith("proc/")}
    after_tree = {k: v for k, v in h.snapshot().items() if not k.startswith("proc/")}
    assert_same_tree(before_tree, after_tree)


def test_a_journal_whose_qemu_still_runs_is_not_rolled_back_without_libvirt(fake, run_agent):
    h, _ = _switched(fake, "vmq")
    qemu = _fake_qemu(h, "vmq")
    try:
        agent = run_agent(h, libvirt=False)
        agent.idle()
        assert h.journal_vms() == ["vmq"]
        assert agent.agent.qemu.watching() == {"vmq": qemu.pid}
    finally:
        qemu.kill()
        qemu.wait(10)


def test_without_libvirt_and_without_qemu_the_journal_is_rolled_back_at_start(fake, run_agent):
    h, _ = _switched(fake, "gone")
    agent = run_agent(h, libvirt=False)
    _wait(lambda: not h.journal_vms(), 10, "the rollback at start")
    agent.idle()
    assert agent.agent.rollbacks == ["gone"]
    assert os.path.isdir(h.root / "var/lib/janus-hooks/journal")


def test_a_real_started_event_clears_the_failed_start_before_it_not_one_after(fake, run_agent, test_driver, caplog):
    from janus_hooks.failures import FailureStore

    h = fake(hosts.single_nvidia)
    failures = FailureStore(h.root / "var/lib/janus-hooks")
    test_driver.lookupByName("test").destroy()
    old = failures.record("test", "janus-hooks: VM 'test': refused", when=time.time() - 60)
    agent = run_agent(h, libvirt=True)
    _wait(lambda: agent.agent.libvirt_up, 10, "the agent to connect to the test driver")
    test_driver.lookupByName("test").create()  # a real STARTED event (no hook runs for the test driver)
    _wait(lambda: failures.read("test") is None, 10, "the failure record to be cleared")
    agent.idle()
    assert f"VM test: started; its failed start of {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(old.time))} " \
           "is cleared" in caplog.text
    # A failure written after a STARTED event arrived (a later attempt) stands, with its own time, even when the
    # agent handles that event late.
    from janus_hooks.agent.events import VmLifecycle

    arrived = time.time()
    newer = failures.record("test", "janus-hooks: VM 'test': refused again", when=arrived + 1)
    agent.post(VmLifecycle("test", "started", True, at=arrived))
    agent.idle()
    assert failures.read("test") == newer
