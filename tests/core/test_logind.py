"""A systemd desktop: logind and PID 1's fd store hold the session's card as the same open file (kcmp)."""

from __future__ import annotations

import os

from janus_hooks.domain import parse_domain
from janus_hooks.host.kernel import kcmp_file
from tests.conftest import domain_xml
from tests.core.helpers import assert_same_tree
from tests.fake import hosts
from tests.fake.builder import HostBuilder
from tests.fake.world import LOGIND_PID, open_fd

XML = domain_xml(hostdevs=hosts.DESKTOP_FUNCTIONS)


def test_logind_and_pid1_copies_go_with_the_session_the_plan_ends(fake):
    h = fake(hosts.systemd_desktop)
    holders = {(x.pid, x.command) for x in h.janus().host.gpu_holders()}
    assert holders == {(1, "systemd"), (LOGIND_PID, "systemd-logind"), (1150, "weston"), (1210, "pipewire"),
                       (1211, "wireplumber")}
    plan = h.janus().plan(parse_domain(XML))
    assert plan.refusal is None
    assert [a.describe() for a in plan.actions][:4] == [
        "stop greetd.service", "end graphical session 1 of uid 1000", "stop user unit wireplumber.service of uid 1000",
        "wait until no process holds /dev/dri/card0, /dev/dri/renderD128, /dev/snd/controlC0, /dev/snd/hwC0D0, "
        "/dev/snd/pcmC0D0p"]
    before = h.snapshot()
    assert h.hook("win11", "prepare", "begin", XML) == (0, "")
    assert h.driver(hosts.DESKTOP_GPU) == "vfio-pci"
    # The session ended with greetd: weston, logind's and PID 1's descriptors are gone.
    assert h.janus().host.gpu_holders() == []
    assert h.hook("win11", "release", "end", XML) == (0, "")
    assert_same_tree(before, h.snapshot())


def test_logind_copy_of_a_file_no_ended_session_holds_still_refuses(fake):
    def build(root):
        hosts.systemd_desktop(root)
        # PID 1 also keeps a card0 descriptor of its own (another service's fd store), not weston's file.
        open_fd(root, 1, "/dev/dri/card0", "fdstore-of-some-service")
        return root

    h = fake(build)
    before = h.snapshot()
    code, err = h.hook("win11", "prepare", "begin", XML)
    assert (code, err) == (1, "janus-hooks: VM 'win11': GPU 0000:00:02.0 is held by pid 1 (systemd) via "
                              "/dev/dri/card0, which janus-hooks may not stop; close it or list its unit in "
                              "display.stop_units")
    assert_same_tree(before, h.snapshot())


def test_session_holder_outside_the_plan_is_named_not_pid1(fake):
    def build(root):
        hosts.systemd_desktop(root)
        # A text-console session (not graphical: never ended) whose process took card0 through logind.
        HostBuilder(root).session("5", 1001, "tty", devices=("/dev/dri/card0",),
                                  processes=[{"pid": 5000, "comm": "kmscube", "fds": ["/dev/dri/card0"]}]).build()
        return root

    h = fake(build)
    before = h.snapshot()
    code, err = h.hook("win11", "prepare", "begin", XML)
    assert code == 1
    assert err.startswith("janus-hooks: VM 'win11': GPU 0000:00:02.0 is held by pid 5000 (kmscube) via /dev/dri/card0")
    assert_same_tree(before, h.snapshot())


def test_real_kcmp_tells_one_open_file_from_two(tmp_path):
    path = tmp_path / "node"
    path.write_text("")
    fd = os.open(path, os.O_RDONLY)
    dup = os.dup(fd)
    other = os.open(path, os.O_RDONLY)
    try:
        me = os.getpid()
        assert kcmp_file(me, fd, me, dup) is True
        assert kcmp_file(me, fd, me, other) is False
        # A process that is gone holds nothing.
        assert kcmp_file(me, fd, 2**22 + 12345, fd) is False
    finally:
        for n in (fd, dup, other):
            os.close(n)
