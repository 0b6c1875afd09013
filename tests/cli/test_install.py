"""install / uninstall on fake host trees: idempotence, byte-for-byte removal, neighbours, refusals."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from janus_hooks.install import Identity, InstallError, render_shim
from janus_hooks.resources import data_file
from tests.cli.conftest import Cli, tree_diff, tree_state
from tests.conftest import FakeHost, domain_xml
from tests.fake import desktops

MANIFEST = "var/lib/janus-hooks/install-manifest.json"
HOOK = "etc/libvirt/hooks/qemu.d/janus-hooks"
CONFIG = "etc/janus-hooks/janus.toml"
AGENT_UNIT = "etc/systemd/system/janus-hooks-agent.service"


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_install_twice_is_idempotent_and_uninstall_restores_the_tree(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    before = tree_state(c.root)

    first = c("install", "--yes")
    assert first.exit_code == 0, first.output
    installed = tree_state(c.root)
    manifest = (c.root / MANIFEST).read_bytes()
    assert "create" in first.output and HOOK in first.output

    second = c("install", "--yes")
    assert second.exit_code == 0, second.output
    assert "nothing to do" in second.output
    assert tree_state(c.root) == installed
    assert (c.root / MANIFEST).read_bytes() == manifest

    gone = c("uninstall")
    assert gone.exit_code == 0, gone.output
    assert tree_diff(before, tree_state(c.root)) == []


def test_install_into_an_empty_root_sets_modes_and_a_truthful_manifest(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    c = Cli(FakeHost(root))
    result = c("install", "--yes")
    assert result.exit_code == 0, result.output
    assert _mode(root / HOOK) == 0o755
    assert _mode(root / CONFIG) == 0o644
    assert _mode(root / "var/lib/janus-hooks") == 0o700
    assert _mode(root / "var/log/janus-hooks") == 0o700
    assert _mode(root / MANIFEST) == 0o600
    manifest = json.loads((root / MANIFEST).read_text())
    kinds = {e["kind"] for e in manifest["files"]}
    assert kinds == {"hook", "udev", "unit", "link", "config"}
    for entry in manifest["files"]:
        path = root / entry["path"]
        if entry["kind"] == "link":
            assert os.readlink(path) == entry["link"]
        else:
            import hashlib

            assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
            assert _mode(path) == int(entry["mode"], 8)
    # The recovery unit and the agent are enabled the way systemctl would.
    for unit in ("janus-hooks-recover.service", "janus-hooks-agent.service"):
        assert os.readlink(root / "etc/systemd/system/multi-user.target.wants" / unit) == \
            f"/etc/systemd/system/{unit}"
    assert f"--root {root}" in (root / "etc/systemd/system/janus-hooks-recover.service").read_text()

    assert c("uninstall").exit_code == 0
    assert list(root.iterdir()) == []


def test_install_leaves_an_existing_dispatcher_and_other_dropins_alone(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    # The classic per-VM dispatcher (qemu.d/<vm>/<op>/<sub>/*) and an unrelated drop-in.
    _write(c.root / "etc/libvirt/hooks/qemu",
           '#!/bin/bash\nGUEST_NAME="$1"\nHOOKPATH="/etc/libvirt/hooks/qemu.d/$GUEST_NAME/$2/$3"\n'
           'if [ -d "$HOOKPATH" ]; then for f in "$HOOKPATH"/*; do "$f" "$@"; done; fi\n', 0o755)
    _write(c.root / "etc/libvirt/hooks/qemu.d/10-snapshot-cleanup", "#!/bin/sh\nexit 0\n", 0o755)
    before = tree_state(c.root)
    neighbours = {k: v for k, v in before.items() if k.startswith("etc/libvirt/hooks")}

    result = c("install", "--yes")
    assert result.exit_code == 0, result.output
    assert "etc/libvirt/hooks/qemu " not in result.output and "10-snapshot-cleanup" not in result.output
    after = tree_state(c.root)
    assert {k: after[k] for k in neighbours} == neighbours
    assert "run twice" not in result.output  # a per-VM dispatcher never runs a qemu.d file itself

    assert c("uninstall").exit_code == 0
    assert tree_diff(before, tree_state(c.root)) == []


def test_known_conflicting_hooks_are_named(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    _write(c.root / "etc/libvirt/hooks/qemu",
           '#!/bin/bash\nif [ "$1" = win10 ] && [ "$2/$3" = prepare/begin ]; then /bin/vfio-startup.sh; fi\n'
           'for f in /etc/libvirt/hooks/qemu.d/*; do "$f" "$@"; done\n', 0o755)
    _write(c.root / "bin/vfio-startup.sh", "#!/bin/bash\n", 0o755)
    _write(c.root / "etc/libvirt/hooks/qemu.d/win10/prepare/begin/start.sh", "#!/bin/bash\n", 0o755)

    result = c("install", "--dry-run")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert any("vfio-startup/vfio-teardown" in w and "etc/libvirt/hooks/qemu" in w for w in warnings)
    assert any("bin/vfio-startup.sh" in w for w in warnings)
    assert any("run twice" in w for w in warnings)
    assert any("qemu.d/win10/prepare/begin/start.sh" in w and "'win10'" in w for w in warnings)

    report = json.loads(c("check", "--json").output)
    assert sum(1 for ch in report["checks"] if ch["name"] == "conflict") == 4


def test_a_dispatcher_calling_janus_is_a_double_run(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    _write(c.root / "etc/libvirt/hooks/qemu", "#!/bin/sh\n/usr/local/bin/janus-hooks-hook \"$@\"\n", 0o755)
    result = c("install", "--dry-run")
    assert "janus-hooks would run twice for every VM" in result.stderr


def test_a_foreign_file_with_our_name_is_backed_up_and_put_back(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    _write(c.root / AGENT_UNIT, "[Service]\nExecStart=/usr/local/bin/old-agent\n", 0o600)
    before = tree_state(c.root)

    result = c("install", "--yes")
    assert result.exit_code == 0, result.output
    assert f"replace    {AGENT_UNIT}" in result.output and "backup: var/lib/janus-hooks/backup/" in result.output
    assert "janus_hooks agent" in (c.root / AGENT_UNIT).read_text()

    assert c("uninstall").exit_code == 0
    assert (c.root / AGENT_UNIT).read_text() == "[Service]\nExecStart=/usr/local/bin/old-agent\n"
    assert tree_diff(before, tree_state(c.root)) == []


@pytest.mark.parametrize("args", [
    ("install", "--yes"),
    ("uninstall",),
    ("rollback", "win11"),
    ("rollback", "--all"),
    ("profile", "win11", "--mode", "single-gpu", "--toml", "--yes"),
])
def test_commands_that_change_the_host_refuse_without_root(make_cli, args):
    c = make_cli(desktops.nvidia_desktop, euid=1000)
    before = tree_state(c.root)
    result = c(*args)
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "must run as root" in result.stderr
    assert f"sudo janus-hooks {args[0]}" in result.stderr
    assert tree_state(c.root) == before


def test_dry_run_needs_no_root_and_changes_nothing(make_cli):
    c = make_cli(desktops.nvidia_desktop, euid=1000)
    before = tree_state(c.root)
    result = c("install", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "Dry run: nothing was changed." in result.output
    assert f"create     {HOOK}" in result.output
    assert tree_state(c.root) == before


def test_install_off_a_terminal_wants_yes(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    before = tree_state(c.root)
    result = c("install")
    assert result.exit_code == 1
    assert "--yes" in result.stderr
    assert tree_state(c.root) == before


def test_install_asks_on_a_terminal(make_cli):
    c = make_cli(desktops.nvidia_desktop, interactive=True)
    declined = c("install", input="n\n")
    assert declined.exit_code == 1 and not (c.root / HOOK).exists()
    accepted = c("install", input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert (c.root / HOOK).exists()


def test_uninstall_refuses_while_a_journal_is_open(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    assert c("install", "--yes").exit_code == 0
    code, err = c.fake.hook("win11", "prepare", "begin", domain_xml(hostdevs=desktops.NVIDIA_CARD))
    assert code == 0, err

    refused = c("uninstall")
    assert refused.exit_code == 1
    assert "VM 'win11' still has switched host devices" in refused.stderr
    assert "janus-hooks rollback win11" in refused.stderr
    assert (c.root / HOOK).exists() and (c.root / MANIFEST).exists()

    forced = c("uninstall", "--force")
    assert forced.exit_code == 0, forced.output
    assert not (c.root / HOOK).exists()
    assert "keeps its open journal" in forced.stderr
    assert c("rollback", "win11").exit_code == 0


def test_a_config_the_person_changed_survives_install_and_uninstall(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    (c.root / CONFIG).unlink()  # the fake fixture's own short timeouts; start from none, as a host would
    assert c("install", "--yes").exit_code == 0
    mine = (c.root / CONFIG).read_text().replace('log_level = "info"', 'log_level = "debug"')
    (c.root / CONFIG).write_text(mine)

    again = c("install", "--yes")
    assert again.exit_code == 0, again.output
    assert f"keep       {CONFIG} (mode 0644; changed by you)" in again.output
    assert (c.root / CONFIG).read_text() == mine

    gone = c("uninstall")
    assert gone.exit_code == 0, gone.output
    assert f"keep     {CONFIG} (changed by you; your settings stay)" in gone.output
    assert (c.root / CONFIG).read_text() == mine
    assert not (c.root / HOOK).exists() and not (c.root / MANIFEST).exists()


def test_an_existing_config_is_never_overwritten(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    before = (c.root / CONFIG).read_text()  # written by the fixture, as a person would
    result = c("install", "--yes")
    assert result.exit_code == 0, result.output
    assert f"keep       {CONFIG} (mode 0644; already there)" in result.output
    assert (c.root / CONFIG).read_text() == before
    assert CONFIG not in (c.root / MANIFEST).read_text()
    assert c("uninstall").exit_code == 0
    assert (c.root / CONFIG).read_text() == before


def test_a_unit_changed_since_install_is_named_and_left(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    assert c("install", "--yes").exit_code == 0
    with (c.root / AGENT_UNIT).open("a") as fh:
        fh.write("Environment=DEBUG=1\n")

    reinstall = c("install", "--yes")
    assert reinstall.exit_code == 1
    assert f"{AGENT_UNIT} is changed since install; not replacing it" in reinstall.stderr

    gone = c("uninstall")
    assert gone.exit_code == 1
    assert gone.stderr.strip() == (f"janus-hooks: {AGENT_UNIT} was changed since install; "
                                   "left in place (remove it by hand)")
    assert (c.root / AGENT_UNIT).exists() and not (c.root / HOOK).exists()
    assert [e["path"] for e in json.loads((c.root / MANIFEST).read_text())["files"]] == [AGENT_UNIT]


def test_uninstall_without_an_install_says_so(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    result = c("uninstall")
    assert result.exit_code == 1
    assert "is not installed under" in result.stderr and MANIFEST in result.stderr


def _run_shim(root: Path, vm: str, op: str, sub: str, xml: str) -> subprocess.CompletedProcess:
    # As libvirt runs it: clean environment, XML on stdin.
    return subprocess.run([str(root / HOOK), vm, op, sub, "-"], input=xml, capture_output=True, text=True,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": "/root"},
                          timeout=30, check=False)


def test_the_installed_hook_runs_this_copy_against_the_given_root(make_cli):
    c = make_cli(desktops.igpu_and_dgpu_sharing_usb)
    assert c("install", "--yes").exit_code == 0
    before = tree_state(c.root)

    unmanaged = _run_shim(c.root, "scratch", "prepare", "begin", domain_xml("scratch", mode=None))
    assert unmanaged.returncode == 0, unmanaged.stderr
    # A managed VM on this tree is refused by the planner: the slow path ran on the fake root, not on /.
    refused = _run_shim(c.root, "win11", "prepare", "begin", domain_xml(hostdevs=desktops.NVIDIA_CARD))
    assert refused.returncode == 1
    assert f"also holds {desktops.USB_CONTROLLER}" in refused.stderr
    # Only janus-hooks' own log, the host-wide lock file it planned under and the record of the refused
    # start (for status and the agent) may have appeared.
    assert all(p.startswith(("var/log/janus-hooks", "var/lib/janus-hooks/failures")) or p == "var/lib/janus-hooks/lock"
               for p in tree_diff(before, tree_state(c.root)))
    record = json.loads((c.root / "var/lib/janus-hooks/failures/win11.json").read_text())
    assert record["vm"] == "win11" and record["reason"] == refused.stderr.strip() and not record["notified"]


def test_on_the_running_system_install_tells_libvirt_udev_and_systemd(make_cli):
    c = make_cli(desktops.nvidia_desktop, live=True, answers={"udevadm": (0, ""), "systemctl": (0, "")})
    for program in ("usr/bin/udevadm", "usr/bin/systemctl"):
        _write(c.root / program, "#!/bin/sh\n", 0o755)
    _write(c.root / "run/udev/control", "")
    result = c("install", "--yes")
    assert result.exit_code == 0, result.output
    assert c.signals == [(desktops.LIBVIRTD_PID, signal.SIGHUP)]
    assert ("udevadm", "control", "--reload") in c.runner.calls
    assert ("systemctl", "daemon-reload") in c.runner.calls
    assert "asked libvirtd (pid 777) to rescan its hooks" in result.output

    c.signals.clear()
    c.runner.calls.clear()
    assert "nothing to do" in c("install", "--yes").output
    assert c.signals == [] and c.runner.calls == []  # nothing changed: nobody is disturbed


def test_a_stale_libvirt_pid_file_is_not_signalled(make_cli):
    c = make_cli(desktops.nvidia_desktop, live=True)
    (c.root / f"proc/{desktops.LIBVIRTD_PID}/comm").write_text("bash\n")  # the pid was reused
    result = c("install", "--yes")
    assert result.exit_code == 0, result.output
    assert c.signals == []
    assert "libvirt does not run now" in result.output


def test_not_the_running_system_means_no_signals_and_no_commands(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    result = c("install", "--yes")
    assert result.exit_code == 0
    assert c.signals == []
    assert [call for call in c.runner.calls if not call[0].startswith(str(c.root))] == []
    assert "is not the running system" in result.output


def test_the_shim_gets_this_interpreter_package_and_root():
    ident = Identity(root="/srv/host root", interpreter="/usr/bin/python3.11", python="/opt/venv/bin/python",
                     package_dir="/opt/venv/lib/python3.11/site-packages")
    text = render_shim(data_file("hooks", "qemu").read_text(), ident)
    # One word of flags: Linux hands everything after the interpreter over as a single argument.
    assert text.splitlines()[0] == "#!/usr/bin/python3.11 -IS"
    assert 'JANUS_PATH = "/opt/venv/lib/python3.11/site-packages"' in text
    assert 'JANUS_ROOT = "/srv/host root"' in text
    compile(text, "janus-hooks", "exec")
    with pytest.raises(InstallError, match="white space"):
        render_shim(text, Identity("/", "/opt/my python/bin/python3", "/x", "/y"))


def test_files_already_identical_are_adopted_so_uninstall_removes_them(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    before = tree_state(c.root)
    assert c("install", "--yes").exit_code == 0
    (c.root / MANIFEST).unlink()  # a wiped state directory: the files stay, the manifest is gone
    result = c("install", "--yes")
    assert result.exit_code == 0, result.output
    assert f"adopt      {HOOK} (mode 0755; identical, not in the manifest)" in result.output
    assert "backup" not in (c.root / MANIFEST).read_text().replace('"backup": null', "")
    assert c("uninstall").exit_code == 0
    after = tree_state(c.root)
    # Every janus-hooks file is gone; only the directories the lost manifest knew it had made are left.
    assert {p: after[p][0] for p in tree_diff(before, after)} == dict.fromkeys(tree_diff(before, after), "dir")
    assert "etc/libvirt/hooks/qemu.d" in tree_diff(before, after)
