"""User units and the GPU's audio function on a systemd desktop: what stops with the session, what is refused."""

from __future__ import annotations

import pytest

from janus_hooks.domain import parse_domain
from janus_hooks.errors import CommandFailed
from janus_hooks.host import Host
from janus_hooks.host.runner import Result
from janus_hooks.host.services import SystemdServices
from tests.conftest import FAST_TIMEOUTS, domain_xml
from tests.core.helpers import assert_same_tree
from tests.fake import hosts
from tests.fake.builder import HostBuilder
from tests.fake.services import FakeServices
from tests.fake.world import load_world, save_world, write

XML = domain_xml(hostdevs=hosts.DESKTOP_FUNCTIONS)
SECOND = domain_xml("games", hostdevs=(hosts.SECOND_GPU,), mode="passthrough")


def _add_user_unit(root, unit: str, procs: list[dict]) -> None:
    """One more unit in user 1000's systemd instance, running."""
    world = load_world(root)
    slice_ = "app.slice" if unit.startswith("app-") else "session.slice"
    base = f"/user.slice/user-1000.slice/user@1000.service/{slice_}"
    world["user_units"]["1000"][unit] = [{**p, "uid": 1000, "cgroup": f"{base}/{unit}"} for p in procs]
    save_world(root, world)
    (root / "run/fake-systemd/user-1000" / unit).write_text("active\n")
    for p in world["user_units"]["1000"][unit]:
        HostBuilder(root).process(p["pid"], p["comm"], p["fds"], cgroup=p["cgroup"], uid=1000)


def test_lingering_user_units_holding_the_audio_stop_and_start_again(fake):
    def build(root):
        hosts.systemd_desktop(root, linger=True)
        # A player started from the user's systemd instance holds the PCM.
        _add_user_unit(root, "app-player.scope", [{"pid": 1300, "comm": "pw-play", "fds": ["/dev/snd/pcmC0D0p"]}])
        return root

    h = fake(build)
    before = h.snapshot()
    assert h.hook("win11", "prepare", "begin", XML) == (0, "")
    assert h.driver(hosts.DESKTOP_AUDIO) == "vfio-pci"
    # The manager outlived the session: janus stopped the units that held the card, and only those, with one
    # call to read their state and one to stop them (each call is a PAM session on a real host).
    units = ("wireplumber.service", "app-player.scope")
    assert h.services.user_calls == [("show", 1000, units), ("stop", 1000, units)]
    assert (h.root / "proc/1210").is_dir()  # pipewire held only /dev/snd/seq
    h.services.user_calls.clear()
    h.services.system_calls.clear()
    assert h.hook("win11", "release", "end", XML) == (0, "")
    # Back with one start for both, once the system bus said the manager runs.
    assert h.services.user_calls == [("start", 1000, units)]
    assert h.services.system_calls == [("is-active", "user@1000.service")]
    assert_same_tree(before, h.snapshot())


def test_rollback_while_the_user_manager_stops_is_not_held_by_its_bus(fake):
    """Seen in the desktop lab: the hook killed right after it stopped the user's units, `rollback` while the
    lingering user's manager was stopping: a query on that manager's bus timed out, and the rollback kept the
    journal for a unit that the next login starts anyway. It is a warning; the rest is put back."""

    def build(root):
        hosts.systemd_desktop(root, linger=True)
        return root

    h = fake(build)
    assert h.hook("win11", "prepare", "begin", XML) == (0, "")
    world = load_world(h.root)
    world["user_bus_hangs"] = ["1000"]
    save_world(h.root, world)
    status, err = h.hook("win11", "release", "end", XML)
    assert status == 0, err
    assert h.driver(hosts.DESKTOP_AUDIO) != "vfio-pci"
    assert not (h.root / "proc/1211").exists()
    assert not list((h.root / "var/lib/janus-hooks/journal").glob("*.jsonl"))
    notes = " ".join(h.janus().store.notes("win11"))
    assert "user units wireplumber.service of uid 1000 did not all start again" in notes
    assert "did not finish within 15 s" in notes


def test_without_linger_the_manager_goes_with_the_session_and_comes_back_with_the_next(fake):
    h = fake(hosts.systemd_desktop)
    before = h.snapshot()
    assert h.hook("win11", "prepare", "begin", XML) == (0, "")
    assert not (h.root / "proc/1211").exists()
    assert not (h.root / "run/user/1000/systemd/private").exists()
    h.services.user_calls.clear()
    assert h.hook("win11", "release", "end", XML) == (0, "")
    # greetd's autologin brought the manager back with its units: the one start call finds them running.
    assert h.services.user_calls == [("start", 1000, ("wireplumber.service",))]
    assert_same_tree(before, h.snapshot())


def test_a_user_manager_that_is_not_running_costs_no_call(fake):
    """Sunshine named in stop_user_units for a user logind still tracks but whose manager is gone (no private
    socket): nothing to read, stop or start, and no systemctl --user call either way."""
    h = fake(_sunshine)
    h.config(FAST_TIMEOUTS + '[display]\nstop_user_units = ["sunshine.service"]\n')
    h.services.stop("user@1000.service", 1)
    assert (h.root / "run/systemd/users/1000").is_file()
    h.services.calls.clear()
    before = h.snapshot()
    plan = h.janus().plan(parse_domain(SECOND))
    assert "stop user unit sunshine.service of uid 1000" in plan.render()
    assert h.hook("games", "prepare", "begin", SECOND) == (0, "")
    assert h.driver(hosts.SECOND_GPU) == "vfio-pci"
    assert h.hook("games", "release", "end", SECOND) == (0, "")
    assert h.services.user_calls == [] and h.services.system_calls == [] and h.services.calls == []
    assert_same_tree(before, h.snapshot())


def test_manager_listening_needs_logind_to_know_the_user_and_the_private_socket(tmp_path):
    host = Host(tmp_path)
    assert not host.user_manager_listening(1000)
    write(tmp_path / "run/user/1000/systemd/private", "")
    assert not host.user_manager_listening(1000)  # logind does not know the user: a stale runtime directory
    write(tmp_path / "run/systemd/users/1000", "NAME=user1000\nSTATE=lingering\n")
    assert host.user_manager_listening(1000)
    (tmp_path / "run/user/1000/systemd/private").unlink()
    assert not host.user_manager_listening(1000)


def test_a_stop_that_fails_half_way_starts_again_what_it_stopped(fake):
    """systemctl stops every unit it can and fails for the rest: the revert starts those that ran before,
    whatever the stop got to (one call; a unit still running is left as it is)."""

    def build(root):
        hosts.systemd_desktop(root, linger=True)
        _add_user_unit(root, "app-player.scope", [{"pid": 1300, "comm": "pw-play", "fds": ["/dev/snd/pcmC0D0p"]}])
        return root

    h = fake(build)
    h.services = FakeServices(h.root, fault=lambda call, target: (call, target) == ("stop-user", "app-player.scope"))
    before = h.snapshot()
    code, err = h.hook("win11", "prepare", "begin", XML)
    assert code == 1
    assert err == ("janus-hooks: VM 'win11': stop user units wireplumber.service, app-player.scope of uid 1000: "
                   "injected fault: systemctl --user stop app-player.scope")
    units = ("wireplumber.service", "app-player.scope")
    assert h.services.user_calls == [("show", 1000, units), ("stop", 1000, units), ("start", 1000, units)]
    assert_same_tree(before, h.snapshot())
    assert h.journal_vms() == []


def test_audio_held_outside_any_session_is_refused_naming_the_process(fake):
    def build(root):
        hosts.systemd_desktop(root)
        HostBuilder(root).process(4242, "aplay", ["/dev/snd/pcmC0D0p"], cgroup="/system.slice/alarm.service")
        return root

    h = fake(build)
    before = h.snapshot()
    code, err = h.hook("win11", "prepare", "begin", XML)
    assert (code, err) == (1, "janus-hooks: VM 'win11': audio function 0000:00:02.1 is held by pid 4242 (aplay) via "
                              "/dev/snd/pcmC0D0p (unit alarm.service), which janus-hooks may not stop; close it or "
                              "list its unit in display.stop_units")
    assert h.services.calls == []
    assert_same_tree(before, h.snapshot())


def test_user_unit_of_a_user_without_graphical_session_is_refused_with_the_user_setting(fake):
    def build(root):
        hosts.systemd_desktop(root, linger=True)
        return root

    h = fake(build)
    # The session ended earlier; the lingering manager's WirePlumber still holds the card's control node.
    h.services.terminate_session("1", 1)
    h.services.calls.clear()
    before = h.snapshot()
    code, err = h.hook("win11", "prepare", "begin", XML)
    assert (code, err) == (1, "janus-hooks: VM 'win11': audio function 0000:00:02.1 is held by pid 1211 (wireplumber) "
                              "via /dev/snd/controlC0 (user unit wireplumber.service of uid 1000), which janus-hooks "
                              "may not stop; close it or list its unit in display.stop_user_units")
    assert_same_tree(before, h.snapshot())
    h.config(FAST_TIMEOUTS + '[display]\nstop_user_units = ["wireplumber.service"]\n')
    assert h.hook("win11", "prepare", "begin", XML) == (0, "")
    assert h.hook("win11", "release", "end", XML) == (0, "")
    assert [c for c in h.services.calls if c[0] != "can-graphical"] == [
        ("stop-user", "1000:wireplumber.service"), ("stop", "greetd.service"),
        # Back in reverse: the display manager and a session on the seat before the user's units.
        ("start", "greetd.service"), ("active-session", "seat0"), ("start-user", "1000:wireplumber.service")]


def _sunshine(root):
    hosts.systemd_desktop(root, second_gpu=True, linger=True)
    _add_user_unit(root, "sunshine.service", [{"pid": 1400, "comm": "sunshine", "fds": ["/dev/dri/card1"]}])
    return root


def test_second_gpu_held_by_a_user_unit_is_refused_with_one_remedy_and_the_others_in_plan_and_log(fake):
    h = fake(_sunshine)
    before = h.snapshot()
    code, err = h.hook("games", "prepare", "begin", SECOND)
    assert code == 1
    assert err == ("janus-hooks: VM 'games': GPU 0000:00:03.0 is held by pid 1400 (sunshine) via /dev/dri/card1 "
                   "(user unit sunshine.service of uid 1000), which janus-hooks may not stop; close it or list its "
                   "unit in display.stop_user_units")
    assert_same_tree(before, h.snapshot())
    detail = ("display.stop_units is for system units; the compositor can be told to leave this card alone "
              "(GNOME: the mutter-device-ignore udev tag; KDE: KWIN_DRM_DEVICES)")
    plan = h.janus().plan(parse_domain(SECOND))
    assert plan.refusal_detail == detail and plan.render().endswith(f"\n  also: {detail}")
    assert detail in (h.root / "var/log/janus-hooks/hook.log").read_text()


def test_second_gpu_freed_by_stop_user_units_and_the_desktop_stays(fake):
    h = fake(_sunshine)
    h.config(FAST_TIMEOUTS + '[display]\nstop_user_units = ["sunshine.service"]\n')
    before = h.snapshot()
    assert h.hook("games", "prepare", "begin", SECOND) == (0, "")
    assert h.driver(hosts.SECOND_GPU) == "vfio-pci"
    assert h.services.calls == [("stop-user", "1000:sunshine.service")]
    assert (h.root / "proc/1150").is_dir()  # weston on the first card is untouched
    assert h.hook("games", "release", "end", SECOND) == (0, "")
    assert h.services.calls[-1] == ("start-user", "1000:sunshine.service")
    assert_same_tree(before, h.snapshot())


def test_second_gpu_that_the_compositor_merely_has_open_is_not_the_host_display(fake):
    def build(root):
        hosts.systemd_desktop(root, second_gpu=True)
        # weston opened card1 too, as compositors do with every card of the seat.
        HostBuilder(root).process(1151, "weston", ["/dev/dri/card1"],
                                  cgroup="/user.slice/user-1000.slice/session-1.scope", uid=1000)
        return root

    h = fake(build)
    code, err = h.hook("games", "prepare", "begin", SECOND)
    assert code == 1
    assert "drives the host display" not in err
    assert err.startswith("janus-hooks: VM 'games': GPU 0000:00:03.0 is held by pid 1151 (weston) via /dev/dri/card1")
    assert err.endswith("close it or list its unit in display.stop_units")
    assert h.janus().plan(parse_domain(SECOND)).refusal_detail.startswith("the compositor can be told to leave")


class _Recorder:
    def __init__(self, stdout: str = "") -> None:
        self.calls: list[tuple[str, ...]] = []
        self.stdout = stdout

    def run(self, argv, timeout):
        self.calls.append(tuple(argv))
        return Result(tuple(argv), 0, self.stdout, "")


def test_user_units_are_reached_through_the_system_bus_as_root_one_call_for_all():
    runner = _Recorder("Id=pipewire.service\nActiveState=active\n\nId=wireplumber.service\nActiveState=inactive\n"
                       "\nId=app.service\nActiveState=activating\n")
    services = SystemdServices(runner)
    units = ("pipewire.service", "wireplumber.service", "app.service")
    assert services.user_units_running(1000, units) == {"pipewire.service", "app.service"}
    services.stop_user(1000, units[:2], 5)
    services.start_user(1000, units[:2], 5)
    services.stop_user(1000, (), 5)  # nothing ran: no call
    assert services.user_units_running(1000, ()) == set()
    assert services.user_manager_running(1000)
    user = ("systemctl", "--user", "--machine=1000@.host")
    assert runner.calls == [
        (*user, "show", "--property=Id,ActiveState", "--", *units),
        (*user, "stop", "--", "pipewire.service", "wireplumber.service"),
        (*user, "start", "--", "pipewire.service", "wireplumber.service"),
        ("systemctl", "is-active", "--quiet", "user@1000.service"),
    ]


def test_a_show_that_does_not_answer_for_every_unit_fails_naming_the_call():
    services = SystemdServices(_Recorder("Id=pipewire.service\nActiveState=active\n"))
    with pytest.raises(CommandFailed, match=r"--machine=1000@.host show .*: 1 unit block\(s\) in its output, 2 "):
        services.user_units_running(1000, ("pipewire.service", "wireplumber.service"))


def test_a_journal_from_before_one_step_per_user_is_still_put_back(fake):
    """A VM started by a janus-hooks that journaled one ``stop-user-unit`` step per unit, released by this one."""
    h = fake(lambda root: hosts.systemd_desktop(root, linger=True))
    before = h.snapshot()
    assert h.hook("win11", "prepare", "begin", XML) == (0, "")
    journal = next((h.root / "var/lib/janus-hooks/journal").glob("*.jsonl"))
    new = ('{"action":{"kind":"stop-user-units","uid":1000,"units":["wireplumber.service"]},'
           '"old":{"running":["wireplumber.service"]}')
    old = '{"action":{"kind":"stop-user-unit","uid":1000,"unit":"wireplumber.service"},"old":{"active":true}'
    assert new in journal.read_text()
    journal.write_text(journal.read_text().replace(new, old))
    h.services.user_calls.clear()
    assert h.hook("win11", "release", "end", XML) == (0, "")
    assert h.services.user_calls == [("start", 1000, ("wireplumber.service",))]
    assert_same_tree(before, h.snapshot())
