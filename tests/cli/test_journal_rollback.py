"""journal, rollback, status and agent; --help of every command."""

from __future__ import annotations

import json

import pytest

from janus_hooks.cli import cli
from janus_hooks.domain import parse_domain
from tests.cli.conftest import FakeConn, tree_state
from tests.conftest import domain_xml
from tests.fake import desktops
from tests.fake.world import spawn_process, write

XML = domain_xml(hostdevs=desktops.NVIDIA_CARD, hugepages=True)
CRASH_STEP = 8  # the 9th change, unload module nvidia_uvm: the desktop is gone, the GPU on no driver yet


class Crash(BaseException):
    """Not an Exception: the engine's own rollback does not catch it, as it would not catch a kill -9."""


def crashed_prepare(c, step: int = CRASH_STEP) -> None:
    """Leave a journal as a prepare killed right after applying ``step`` would."""

    def observer(event: str, index: int) -> None:
        if event == "applied" and index == step:
            raise Crash

    with pytest.raises(Crash):
        c.fake.janus(observer=observer).prepare(parse_domain(XML))


def test_journal_of_a_crashed_prepare(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    crashed_prepare(c)
    result = c("journal")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("VM 'win11': started ") and "(this boot), devices 0000:01:00.0, 0000:01:00.1" in lines[0]
    assert lines[1] == "  the start did not finish (crash or rollback pending)"
    assert len(lines) == 2 + CRASH_STEP + 1
    assert lines[2].split()[:2] == ["1.", "done"]
    assert lines[2].endswith("add 2048 x 2048 kB hugepages on the host (4096 MiB)")
    assert lines[-1].split()[:2] == [f"{CRASH_STEP + 1}.", "pending"]
    assert lines[-1].endswith("unload module nvidia_uvm")

    data = json.loads(c("journal", "--json").output)
    [entry] = data["journals"]
    assert entry["vm"] == "win11" and entry["this_boot"] is True and entry["complete"] is False
    assert entry["devices"] == list(desktops.NVIDIA_CARD)
    assert [s["state"] for s in entry["steps"]] == ["done"] * CRASH_STEP + ["pending"]
    assert entry["steps"][0] == {**entry["steps"][0], "index": 0, "kind": "allocate-hugepages"}
    assert isinstance(entry["steps"][0]["duration_ms"], float) and entry["steps"][-1]["duration_ms"] is None

    assert c("journal", "--fail-if-open").exit_code == 1
    assert c("journal", "other").output.strip() == "VM 'other' has no open journal: nothing of it is switched."


def test_rollback_dry_run_lists_and_changes_nothing(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    crashed_prepare(c)
    before = tree_state(c.root)
    result = c("rollback", "win11", "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "VM 'win11': would restore, newest first:"
    assert lines[1] == "  undo unload module nvidia_uvm"
    assert lines[-1] == "  undo add 2048 x 2048 kB hugepages on the host (4096 MiB)"
    assert len(lines) == 1 + CRASH_STEP + 1
    assert tree_state(c.root) == before


def test_rollback_after_a_crashed_prepare_restores_the_host(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    before = c.fake.snapshot()
    crashed_prepare(c)
    assert c.fake.snapshot() != before
    assert c.fake.driver(desktops.NVIDIA_VGA) is None  # the desktop is gone, the GPU on nothing

    result = c("rollback", "win11")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"VM 'win11': {CRASH_STEP + 1} change(s) reverted; the journal is closed."
    assert c.fake.snapshot() == before
    assert c("journal", "--json").output.strip() == '{\n  "journals": []\n}'
    assert c("journal", "--fail-if-open").exit_code == 0
    again = c("rollback", "win11")
    assert again.exit_code == 0 and "nothing to roll back" in again.output


def test_rollback_works_with_a_broken_config(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    before = c.fake.snapshot()
    crashed_prepare(c)
    c.fake.config("log_level = [\n")
    result = c("rollback", "win11")
    assert result.exit_code == 0, result.output
    after = c.fake.snapshot()
    assert {k for k in set(before) | set(after) if before.get(k) != after.get(k)} == {"etc/janus-hooks/janus.toml"}


def test_rollback_refuses_while_the_vm_runs(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    code, err = c.fake.hook("win11", "prepare", "begin", XML)
    assert code == 0, err
    spawn_process(c.root, {"pid": 4242, "comm": "qemu-system-x86", "fds": []})
    (c.root / "proc/4242/cmdline").write_bytes(b"/usr/bin/qemu-system-x86_64\0-name\0guest=win11,debug-threads=on\0")
    before = tree_state(c.root)

    refused = c("rollback", "win11")
    assert refused.exit_code == 1
    assert refused.stderr.strip() == ("janus-hooks: VM 'win11' is running (QEMU pid 4242): shut it down first, "
                                      "or add --force to take its devices away while it runs")
    assert tree_state(c.root) == before
    forced = c("rollback", "win11", "--force")
    assert forced.exit_code == 0, forced.output


def test_rollback_all_at_boot_closes_only_journals_of_an_earlier_boot(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    crashed_prepare(c)
    same_boot = c("rollback", "--all", "--boot")
    assert same_boot.exit_code == 0
    assert "VM 'win11': journal is from this boot; left alone." in same_boot.output
    assert c.fake.journal_vms() == ["win11"]

    (c.root / "proc/sys/kernel/random/boot_id").write_text("0d3f9c2e-0000-4000-8000-00000000b008\n")
    assert "(an EARLIER boot)" in c("journal").output
    rebooted = c("rollback", "--all", "--boot")
    assert rebooted.exit_code == 0, rebooted.output
    assert f"0 change(s) reverted, {CRASH_STEP + 1} already gone with the reboot" in rebooted.output
    assert c.fake.journal_vms() == []


def test_rollback_needs_a_vm_or_all(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    assert c("rollback").exit_code == 2
    assert c("rollback", "win11", "--all").exit_code == 2
    nothing = c("rollback", "--all")
    assert nothing.exit_code == 0 and nothing.output.strip() == "No open journal: nothing to roll back."


def test_rollback_that_cannot_finish_names_the_step(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    crashed_prepare(c)
    # The 2 MiB pool's knob is gone (as if the kernel no longer offered it): that step cannot be undone.
    (c.root / "sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages").unlink()
    (c.root / "sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages").unlink()
    result = c("rollback", "win11")
    assert result.exit_code == 1
    assert result.stderr.startswith("janus-hooks: VM win11: 1 change(s) could not be reverted; first: "
                                    "undo add 2048 x 2048 kB hugepages")
    assert result.stderr.strip().endswith("the journal is kept: fix that and run 'janus-hooks rollback win11' again")
    assert c.fake.journal_vms() == ["win11"]  # kept: what could not be undone is still recorded


def test_status_shows_install_agent_and_what_each_vm_holds(make_cli):
    conn = FakeConn({"win11": XML, "plain": domain_xml("plain", mode=None)})
    c = make_cli(desktops.nvidia_desktop, conn=conn)
    assert c("install", "--yes").exit_code == 0
    assert c("profile", "games", "--mode", "passthrough", "--toml", "--yes").exit_code == 0
    crashed_prepare(c)
    result = c("status")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1] == "  installed: 8 file(s), all in place"  # the config was there before
    assert any(line.startswith("  hook: ") and "installed and current" in line for line in lines)
    assert any(line.startswith("  agent: not running") for line in lines)
    games = next(line for line in lines if line.startswith("  games"))
    assert "passthrough (TOML profile)" in games and games.endswith("idle")
    win11 = next(line for line in lines if line.startswith("  win11"))
    assert "single-gpu (libvirt metadata)" in win11
    assert "holds 0000:01:00.0, 0000:01:00.1 since " in win11 and f"{CRASH_STEP + 1} change(s) open" in win11
    assert not any(line.startswith("  plain") for line in lines)


def test_status_shows_the_last_failed_start_and_a_host_driver_under_a_running_vm(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    refused = domain_xml("refused", hostdevs=("0000:09:00.0",))  # no such device: the planner refuses
    code, err = c.fake.hook("refused", "prepare", "begin", refused)
    assert code == 1
    assert c.fake.hook("win11", "prepare", "begin", XML)[0] == 0
    write(c.root / "proc/4242/cmdline", "qemu-system-x86_64\0-name\0guest=win11,debug-threads=on\0")
    # A host driver takes the audio function back while the VM runs (a udev rule, a person's modprobe).
    audio = c.root / "sys/bus/pci/devices" / desktops.NVIDIA_AUDIO / "driver"
    audio.unlink()
    audio.symlink_to("../../../../bus/pci/drivers/snd_hda_intel")
    lines = c("status").output.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("  refused "))
    assert lines[at + 1].startswith("    last failed start: ") and lines[at + 1].endswith(f": {err}")
    at = next(i for i, line in enumerate(lines) if line.startswith("  win11 "))
    assert lines[at + 1] == (f"    WARNING: {desktops.NVIDIA_AUDIO} is bound to host driver snd_hda_intel while VM "
                             "win11 runs (QEMU pid 4242)")


def test_a_start_that_succeeds_later_clears_the_failed_one_from_status(make_cli):
    from janus_hooks.failures import FailureStore

    c = make_cli(desktops.nvidia_desktop)
    failures = FailureStore(c.root / "var/lib/janus-hooks")
    broken = domain_xml("win11", hostdevs=("0000:09:00.0",))  # no such device: the planner refuses
    code, err = c.fake.hook("win11", "prepare", "begin", broken)
    assert code == 1
    refused = failures.read("win11")
    assert refused is not None and refused.reason == err
    # Shown on the desktop: the record keeps the time of the failure.
    failures.mark_notified(refused)
    assert failures.read("win11").time == refused.time and failures.read("win11").notified
    assert "    last failed start: " in c("status").output
    # Fixed; libvirt runs prepare, starts QEMU, then the started phase: the failure is history.
    assert c.fake.hook("win11", "prepare", "begin", XML)[0] == 0
    assert failures.read("win11") is not None  # prepare alone is no start: QEMU may still fail
    assert c.fake.hook("win11", "started", "begin", XML) == (0, "")
    assert failures.read("win11") is None
    assert "last failed start" not in c("status").output
    # A failure recorded after the start (another attempt) is not cleared by it.
    later = failures.record("win11", "janus-hooks: VM 'win11': refused", when=refused.time + 3600)
    assert failures.clear("win11", started=refused.time + 1) is None
    assert failures.read("win11") == later


def test_status_without_libvirt_still_lists_what_it_knows(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    result = c("status")
    assert result.exit_code == 0
    assert "  installed: no (run 'janus-hooks install')" in result.output
    assert "  VMs in libvirt: not listed (libvirt at qemu:///system: Failed to connect socket" in result.output
    assert "Managed VMs: none" in result.output


def test_agent_needs_root(make_cli):
    c = make_cli(desktops.nvidia_desktop, euid=1000)
    result = c("agent")
    assert result.exit_code == 1
    assert result.stderr.strip() == ("janus-hooks: 'janus-hooks agent' changes the host and must run as root: "
                                     "try 'sudo janus-hooks agent'")


def _commands() -> dict:
    """The top-level commands, each imported (they load lazily)."""
    import click

    ctx = click.Context(cli)
    return {name: cli.get_command(ctx, name) for name in cli.list_commands(ctx)}


def _leaf_commands() -> list[str]:
    """Every command a person runs, a group's subcommands as "group sub"."""
    names = []
    for name, command in sorted(_commands().items()):
        subs = getattr(command, "commands", None)
        names += [f"{name} {sub}" for sub in sorted(subs)] if subs else [name]
    return names


# Commands that only talk to libvirt, never read the host tree: no --root.
LIBVIRT_ONLY = {"vm list", "vm delete"}


@pytest.mark.parametrize("command", _leaf_commands())
def test_every_command_has_help_that_reads_well(make_cli, command):
    c = make_cli(desktops.nvidia_desktop)
    result = c(*command.split(), "--help")
    assert result.exit_code == 0
    text = result.output
    assert text.startswith(f"Usage: cli {command} [OPTIONS]") or text.startswith(f"Usage: janus-hooks {command}")
    if command not in LIBVIRT_ONLY:
        assert "--root DIRECTORY" in text and "Host tree to act on" in text
    summary = text.split("\n\n")[1].strip()
    assert summary.endswith((".", ")")) and len(summary) > 20
    assert all(len(line) <= 80 for line in text.splitlines())


def test_top_level_help_lists_every_command_with_its_summary(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    result = c("--help")
    assert result.exit_code == 0
    for name, command in _commands().items():
        assert f"  {name:<10} {command.short_help}" in result.output


def test_status_shows_what_the_last_release_warned_about(make_cli):
    from tests.fake.kernel import FakeKernel

    c = make_cli(desktops.nvidia_desktop)
    assert c.fake.hook("win11", "prepare", "begin", XML)[0] == 0
    c.fake.kernel = FakeKernel(c.root, fault=lambda n, op, target: target.endswith("efi-framebuffer/bind"))
    assert c.fake.hook("win11", "release", "end", XML) == (0, "")
    result = c("status")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("  win11"))
    assert lines[at].endswith("idle")
    assert lines[at + 1].startswith("    warning (last release): boot framebuffer efi-framebuffer.0 could not be "
                                    "re-attached to efi-framebuffer")


def test_commands_load_lazily_and_only_the_agent_runs_asyncio():
    """The agent runs for the host's lifetime: starting it must not load vm create, the installer or the
    planner; and no other command loads asyncio or the agent's event sources (status included)."""
    import json
    import subprocess
    import sys

    code = """if True:
        import json, sys
        import click
        from janus_hooks.cli import cli
        from janus_hooks.cli import agent
        started = sorted(m for m in sys.modules if m.startswith(("janus_hooks.vm", "janus_hooks.install",
                                                                  "janus_hooks.plan", "janus_hooks.engine")))
        ctx = click.Context(cli)
        for name in cli.list_commands(ctx):
            cli.get_command(ctx, name)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("asyncio", "libvirt", "pyudev", "watchdog"))
        print(json.dumps([started, heavy]))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    started, heavy = json.loads(out.stdout)
    assert started == [], "the agent's command loads what it does not need"
    assert heavy == [], "a command module loads asyncio or an event source at import"


def test_rollback_puts_back_what_cpu_isolation_changed(make_cli):
    from tests.conftest import FAST_TIMEOUTS
    from tests.fake import hosts

    c = make_cli(hosts.pinned_nvidia)
    c.fake.config(FAST_TIMEOUTS + "\n[cpu]\nworkqueues = true\n")
    before = c.fake.snapshot()
    xml = domain_xml(mode="passthrough", isolate="yes", vcpu="<vcpu placement='static'>1</vcpu>",
                     cputune="<cputune><vcpupin vcpu='0' cpuset='2'/></cputune>")

    def observer(event: str, index: int) -> None:
        if event == "applied" and index == 5:  # AllowedCPUs x3, irqbalance, default IRQ affinity, IRQs
            raise Crash

    with pytest.raises(Crash):
        c.fake.janus(observer=observer).prepare(parse_domain(xml))
    assert c.fake.services.unit_property("system.slice", "AllowedCPUs") == "0-1 3-7"
    dry = c("rollback", "win11", "--dry-run")
    assert dry.output.splitlines()[1:] == [
        "  undo move IRQ affinities off cores 2",
        "  undo keep new IRQs off cores 2 (default_smp_affinity)",
        "  undo stop irqbalance.service while cores 2 are isolated",
        "  undo keep init.scope off cores 2 (AllowedCPUs, runtime)",
        "  undo keep user.slice off cores 2 (AllowedCPUs, runtime)",
        "  undo keep system.slice off cores 2 (AllowedCPUs, runtime)",
    ]
    result = c("rollback", "win11")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "VM 'win11': 6 change(s) reverted; the journal is closed."
    after = c.fake.snapshot()
    # systemd keeps an emptied runtime drop-in once a property was set; AllowedCPUs itself reads as before.
    assert [k for k in set(before) | set(after)
            if before.get(k) != after.get(k) and not k.startswith("run/systemd/system.control")] == []
    assert all(c.fake.services.unit_property(u, "AllowedCPUs") == "" for u in ("system.slice", "user.slice",
                                                                                "init.scope"))
