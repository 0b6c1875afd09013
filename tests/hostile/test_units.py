"""The installed sleep guard starts nothing while no journal is open (and so cannot fail a suspend when its
program vanished), like the boot-time recovery unit."""

from __future__ import annotations

from tests.fake import desktops


def test_sleep_guard_and_recovery_are_conditioned_on_an_open_journal(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    assert c("install", "--yes").exit_code == 0
    journal_dir = c.root / "var/lib/janus-hooks/journal"
    for unit in ("janus-hooks-sleep-guard.service", "janus-hooks-recover.service"):
        text = (c.root / "etc/systemd/system" / unit).read_text()
        assert f"ConditionDirectoryNotEmpty={journal_dir}\n" in text, unit
