"""A systemd desktop: logind and PID 1's fd store hold the session's card as the same open file (kcmp)."""

from __future__ import annotations

import os

from janus_hooks.domain import parse_domain
from janus_hooks.host.kernel import kcmp_file
from tests.conftest import domain_xml
from tests.core.helpers import assert_same_tree
from tests.fake import hosts
from tests.fake.builder import HostBuilder
from tests.fake.world import LOGIND_PID, load_world, open_fd, save_world

XML = domain_xml(hostdevs=hosts.DESKTOP_FUNCTIONS)


def test_logind_and_pid1_copies_go_with_the_session_the_plan_ends(fake):
    h = fake(hosts.systemd_desktop)
    holders = {(x.pid, x.command) for x in h.janus().host.gpu_holders()}
    assert holders == {(1, "systemd"), (LOGIND_PID, "systemd-logind"), (1150, "weston"), (1210, "pipewire"),
                       (1211, "wireplumber")}
    plan = h.janus().plan(parse_domain(XML))
    assert plan.refusal is None
    assert [a.describe() for a in plan.actions][:4] == [
        "stop user unit wireplumber.service of uid 1000", "stop greetd.service", "end graphical session 1 of uid 1000",
        "wait until no process holds /dev/dri/card0, /dev/dri/renderD128, /dev/snd/controlC0, /dev/snd/hwC0D0, "
        "/dev/snd/pcmC0D0p"]
    before = h.snapshot()
    assert h.hook("win11", "prepare", "begin", XML) == (0, "")
    assert h.driver(hosts.DESKTOP_GPU) == "vfio-pci"
    # The session ended with greetd: weston, logind's and PID 1's descriptors are gone.
    assert h.janus().host.gpu_holders() == []
    assert h.hook("win11", "release", "end", XML) == (0, "")
    assert_same_tree(before, h.snapshot())


def _session_outlives_its_display_manager(root):
    """logind still lists the session a moment after greetd stopped: janus-hooks goes on to end it."""
    hosts.systemd_desktop(root)
    world = load_world(root)
    world["sessions_end_late"] = True
    save_world(root, world)
    return root


def test_session_that_ends_with_its_display_manager_before_it_is_terminated_is_not_a_failure(fake):
    h = fake(_session_outlives_its_display_manager)

    def gone_meanwhile(call, target):
        # logind forgets the session (its display manager stopped) just before janus-hooks ends it.
        if call == "terminate-session":
            h.services._end_session(target)
            return True
        return False

    h.services._fault = gone_meanwhile
    before = h.snapshot()
    assert h.hook("win11", "prepare", "begin", XML) == (0, "")
    assert ("terminate-session", "1") in h.services.calls
    assert h.driver(hosts.DESKTOP_GPU) == "vfio-pci"
    assert h.hook("win11", "release", "end", XML) == (0, "")
    assert_same_tree(before, h.snapshot())


def test_session_that_does_not_end_still_fails_the_start(fake):
    h = fake(_session_outlives_its_display_manager)
    h.services._fault = lambda call, target: call == "terminate-session"
    before = h.snapshot()
    code, err = h.hook("win11", "prepare", "begin", XML)
    assert code == 1 and "end graphical session 1 of uid 1000" in err, err
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


def test_display_manager_starts_only_once_seat0_can_draw(fake):
    def build(root):
        hosts.systemd_desktop(root)
        world = load_world(root)
        world["seat_lag"] = 3  # udev takes a while to tag the card that came back
        save_world(root, world)
        return root

    h = fake(build)
    before = h.snapshot()
    assert h.hook("win11", "prepare", "begin", XML) == (0, "")
    h.services.calls.clear()
    assert h.hook("win11", "release", "end", XML) == (0, "")
    calls = h.services.calls
    start = calls.index(("start", "greetd.service"))
    assert calls[:start].count(("can-graphical", "seat0")) == 4  # three times no, then yes
    assert ("can-graphical", "seat0") not in calls[start:]
    assert_same_tree(before, h.snapshot())
    assert h.janus().store.notes("win11") == []


def test_a_seat_that_never_can_draw_is_a_warning_and_the_display_manager_is_started_anyway(fake):
    def build(root):
        hosts.systemd_desktop(root)
        world = load_world(root)
        world["seat_lag"] = 10**6
        save_world(root, world)
        return root

    h = fake(build)
    assert h.hook("win11", "prepare", "begin", XML) == (0, "")
    assert h.hook("win11", "release", "end", XML) == (0, "")
    assert ("start", "greetd.service") in h.services.calls
    assert h.journal_vms() == []
    assert h.janus().store.notes("win11") == [
        "seat0 becoming able to draw (logind's CanGraphical) did not happen within 0.3 s; "
        "starting greetd.service anyway"]


def test_can_graphical_asks_logind():
    from janus_hooks.host.runner import Result
    from janus_hooks.host.services import SystemdServices

    class Runner:
        def __init__(self, out: str, code: int = 0) -> None:
            self.out, self.code, self.calls = out, code, []

        def run(self, argv, timeout):
            self.calls.append(tuple(argv))
            return Result(tuple(argv), self.code, self.out, "")

    yes = Runner("yes\n")
    assert SystemdServices(yes).can_graphical("seat0") is True
    assert yes.calls == [("loginctl", "show-seat", "seat0", "--property=CanGraphical", "--value")]
    assert SystemdServices(Runner("no\n")).can_graphical("seat0") is False
    assert SystemdServices(Runner("", 1)).can_graphical("seat0") is False
