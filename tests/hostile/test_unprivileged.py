"""``check``, ``devices`` and ``plan`` without root: what only root can read (other users' descriptors, the
journals) is missing, and they say so: "incomplete: run as root" as their last line (``incomplete`` in
JSON) and exit status 3, never an incomplete answer presented as complete."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from fnmatch import fnmatch
from pathlib import Path

import pytest

from janus_hooks.cli.common import INCOMPLETE
from tests.conftest import domain_xml
from tests.fake import desktops
from tests.hostile import tally
from tests.hostile.test_journals import _begin, _forge

NOBODY = 65534
XML = domain_xml(hostdevs=desktops.NVIDIA_CARD)
OTHER_XML = domain_xml(name="other", hostdevs=desktops.NVIDIA_CARD)


def _as_user(root: Path, *denied: str):
    """``listdir`` as a user would have it: PermissionError on the directories below ``root`` matching
    ``denied`` (fnmatch patterns), as the kernel says for another user's /proc/PID/fd or a 0700 directory."""
    def listdir(path: Path) -> list[str]:
        rel = os.path.relpath(path, root)
        if any(fnmatch(rel, pattern) for pattern in denied):
            raise PermissionError(13, "Permission denied", str(path))
        return os.listdir(path)

    return listdir


def _incomplete(root: Path, processes: int) -> str:
    return (f"incomplete: run as root (could not read the open files of {processes} process(es), "
            f"{root}/var/lib/janus-hooks/journal)")


def _other_vm_holds_the_gpu(root: Path) -> None:
    _forge(root, "other", [_begin("other", devices=list(desktops.NVIDIA_CARD))])


def test_devices_as_a_user_says_what_it_could_not_see(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    _other_vm_holds_the_gpu(c.root)
    full = c("devices")
    assert full.exit_code == 0 and "used by pid 1200 (Xorg" in full.output and "held by VM: other" in full.output
    assert "incomplete" not in full.output
    c.listdir = _as_user(c.root, "proc/*/fd", "var/lib/janus-hooks/journal")
    processes = len([p for p in (c.root / "proc").iterdir() if (p / "fd").is_dir()])
    user = c("devices")
    assert user.exit_code == INCOMPLETE
    assert "used by pid 1200" not in user.output and "held by VM: -" in user.output
    assert user.output.splitlines()[-1] == _incomplete(c.root, processes)
    as_json = c("devices", "--json")
    assert as_json.exit_code == INCOMPLETE
    assert json.loads(as_json.output)["incomplete"] == _incomplete(c.root, processes)
    tally.record("inputs tried")


def test_plan_and_check_as_a_user_say_what_they_could_not_see(make_cli, tmp_path):
    c = make_cli(desktops.nvidia_desktop)
    assert c("install", "--yes").exit_code == 0
    xml_file = tmp_path / "win11.xml"
    xml_file.write_text(XML)
    full = c("plan", "win11", "--xml", str(xml_file))
    assert full.exit_code == 0 and "incomplete" not in full.output
    c.listdir = _as_user(c.root, "proc/1200/fd", "var/lib/janus-hooks/journal")
    user = c("plan", "win11", "--xml", str(xml_file))
    assert user.exit_code == INCOMPLETE and user.output.splitlines()[-1] == _incomplete(c.root, 1)
    as_json = c("plan", "win11", "--xml", str(xml_file), "--json")
    assert as_json.exit_code == INCOMPLETE and json.loads(as_json.output)["incomplete"] == _incomplete(c.root, 1)
    check = c("check")
    # The host is ready as far as the user sees: not 0, since what only root sees may say otherwise.
    assert check.exit_code == INCOMPLETE and check.output.splitlines()[-2:] == [
        "The host is ready.", _incomplete(c.root, 1)]
    assert json.loads(c("check", "--json").output)["incomplete"] == _incomplete(c.root, 1)
    tally.record("inputs tried", 2)


@pytest.fixture
def shared_tree():
    """A fake host tree an unprivileged user can reach (the test's own tmp_path is private to root)."""
    top = Path(tempfile.mkdtemp(prefix="janus-unprivileged-"))
    os.chmod(top, 0o755)
    try:
        yield top
    finally:
        shutil.rmtree(top)


def test_a_real_unprivileged_user_gets_incomplete_not_a_wrong_answer(shared_tree):
    """The real thing: the CLI run as nobody (setpriv), the kernel saying EACCES for a root-only /proc/PID/fd
    and the 0700 state directory of a tree whose journal says VM 'other' holds the GPU."""
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv (util-linux) to run the CLI as another user")
    root = shared_tree / "host"
    desktops.nvidia_desktop(root)
    _other_vm_holds_the_gpu(root)
    os.chmod(root / "proc/1200/fd", 0o500)
    xml_file = shared_tree / "win11.xml"
    xml_file.write_text(XML)

    def run(*args: str, user: bool = True) -> subprocess.CompletedProcess:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent", "LC_ALL": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1"}
        setpriv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] if user else []
        return subprocess.run([*setpriv, sys.executable, "-m", "janus_hooks", *args, "--root", str(root)],
                              env=env, cwd=shared_tree, capture_output=True, text=True, timeout=120, check=False)

    assert run("install", "--yes", user=False).returncode == 0

    devices = run("devices")
    assert devices.returncode == INCOMPLETE, devices.stderr
    assert devices.stdout.splitlines()[-1] == _incomplete(root, 1)
    assert "used by pid 1200" not in devices.stdout and "held by VM: -" in devices.stdout
    plan = run("plan", "win11", "--xml", str(xml_file))
    assert plan.returncode == INCOMPLETE, plan.stderr
    assert plan.stdout.splitlines()[-1] == _incomplete(root, 1)
    check = run("check")
    # The install manifest is in the 0700 state directory too: the hook is there, whether it is current
    # only root can tell.
    hook = root / "etc/libvirt/hooks/qemu.d/janus-hooks"
    assert f"  ok    hook       {hook} installed (whether it is current: run as root)\n" in check.stdout
    assert check.stdout.splitlines()[-1] == (
        f"incomplete: run as root (could not read the open files of 1 process(es), "
        f"{root}/var/lib/janus-hooks/install-manifest.json, {root}/var/lib/janus-hooks/journal)")
    assert check.returncode == INCOMPLETE, check.stdout + check.stderr
    tally.record("inputs tried", 3)
