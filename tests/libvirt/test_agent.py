"""The agent against the real libvirtd: libvirtd SIGKILLed, then QEMU killed (nobody can run `release end`);
libvirtd killed and restarted while one managed VM runs and another dies meanwhile."""

from __future__ import annotations

import time

import libvirt
import pytest

from tests.libvirt.agent_process import AgentProcess, kill9
from tests.libvirt.conftest import PREFIX, RUN_DIR, VM_TIMEOUT, _services, journal_of, pool, run, wait_for

pytestmark = pytest.mark.libvirt

PAGES = 64
ROLLBACK_BOUND = 30.0  # seconds from QEMU's death to the pages being free, with libvirtd gone


@pytest.fixture
def agent(installed):
    proc = AgentProcess(RUN_DIR, "--udev-source", "off", "--release-grace", "3").start()
    try:
        wait_for(lambda: proc.logged("libvirt at qemu:///system: connected"), VM_TIMEOUT, "the agent to connect")
        yield proc
    finally:
        code = proc.stop()
        text = "\n".join(proc.lines())
        assert code == 0, f"the agent exited {code} on SIGTERM:\n{text}"


@pytest.fixture
def libvirtd_back(libvirtd):
    """Kill libvirtd with SIGKILL inside the test; it is started again afterwards, whatever happened."""
    if not libvirtd.owned:
        pytest.skip("libvirtd was not started by scripts/libvirt-services: not killing someone else's daemon")
    yield libvirtd
    libvirtd.close()
    _start_again()


def _start_again() -> None:
    proc = _services("start")
    daemons = run(["ps", "-eo", "pid,stat,etime,comm"], 30, check=False).stdout.splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr + "\n".join(d for d in daemons if "virt" in d)


def _start_managed(vms, name: str):
    dom = vms.define(name, memory_mib=PAGES * 2, mode="single-gpu", hugepages=True)
    vms.start(dom)
    assert journal_of(name).exists()
    return dom


def test_libvirtd_killed_then_qemu_killed_the_agent_frees_the_pages(agent, libvirtd_back, vms):
    name = PREFIX + "agent-orphan"
    before = pool()
    _start_managed(vms, name)
    qemu = vms.qemu_pid(name)
    assert pool()["nr"] == before["nr"] + max(0, PAGES - before["free"])
    mark = len(agent.lines())
    kill9(libvirtd_back.pid())
    wait_for(lambda: agent.logged("connection lost (EOF)", mark), VM_TIMEOUT, "the agent to see libvirtd go")
    died = time.monotonic()
    kill9(qemu)
    wait_for(lambda: not journal_of(name).exists() and pool()["nr"] == before["nr"], ROLLBACK_BOUND,
             f"the agent to roll {name} back with libvirtd gone")
    took = time.monotonic() - died
    # The agent logs the rollback once it returned: a moment after the journal is gone.
    wait_for(lambda: agent.logged(f"VM {name}: rolled back (its QEMU exited while libvirt is away)", mark),
             VM_TIMEOUT, f"the agent to log {name}'s rollback")
    print(f"QEMU death to pages free, libvirtd gone: {took:.3f} s")


def test_libvirtd_killed_and_restarted_keeps_the_running_vm_and_rolls_back_the_dead_one(agent, libvirtd_back, vms):
    alive, dead = PREFIX + "agent-alive", PREFIX + "agent-dead"
    before = pool()
    _start_managed(vms, alive)
    _start_managed(vms, dead)
    alive_qemu, dead_qemu = vms.qemu_pid(alive), vms.qemu_pid(dead)
    mark = len(agent.lines())
    kill9(libvirtd_back.pid())
    wait_for(lambda: agent.logged("connection lost (EOF)", mark), VM_TIMEOUT, "the agent to see libvirtd go")
    kill9(dead_qemu)
    wait_for(lambda: not journal_of(dead).exists(), ROLLBACK_BOUND, f"the agent to roll {dead} back")
    holding = pool()
    assert holding["nr"] == before["nr"] + max(0, PAGES - before["free"]), "more or less than one VM's pages freed"
    libvirtd_back.close()
    _start_again()
    wait_for(lambda: agent.logged("libvirt at qemu:///system: connected", mark), VM_TIMEOUT,
             "the agent to reconnect")
    dom = vms.lookup(alive)
    wait_for(lambda: vms.lookup(dead).state()[0] == libvirt.VIR_DOMAIN_SHUTOFF, VM_TIMEOUT,
             f"libvirt to see {dead} is gone")
    wait_for(lambda: agent.logged(f"VM {alive}: runs (journal open); left alone", mark), VM_TIMEOUT,
             "the agent's resync after reconnecting")
    assert dom.isActive() and vms.qemu_pid(alive) == alive_qemu
    assert journal_of(alive).exists() and pool()["nr"] == holding["nr"], "the running VM was rolled back"
    assert not agent.logged(f"VM {alive}: rolled back", mark)
    vms.destroy(dom)
    wait_for(lambda: not journal_of(alive).exists(), VM_TIMEOUT, f"release end of {alive}")
    assert pool()["nr"] == before["nr"]
