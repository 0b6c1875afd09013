"""``install`` refuses to make root run code that someone else can change: the interpreter, the package or a
directory on the way writable by group or others (a sticky directory such as /tmp excepted) or owned by
another user. Run for real: the CLI in a child process importing a copy of the package from such a place."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import janus_hooks
from janus_hooks.host.paths import others_can_change, tree_others_can_change
from janus_hooks.install import ROOT_OWNED_INSTALL
from janus_hooks.resources import DATA_DIRS, data_dir
from tests.cli.conftest import tree_diff, tree_state
from tests.fake import desktops
from tests.hostile import tally

NOBODY = 65534
TIMEOUT = 120


def _copy_package(dest: Path) -> Path:
    """This janus_hooks as a wheel lays it out (data files inside the package), below ``dest``."""
    package = dest / "janus_hooks"
    shutil.copytree(Path(janus_hooks.__file__).resolve().parent, package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in DATA_DIRS:
        shutil.copytree(data_dir(name), package / "data" / name)
    return package


def _install(code: Path, root: Path, *command: str) -> subprocess.CompletedProcess:
    """``janus-hooks install --yes`` (or ``command``) run from the copy of the package in ``code``."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    # Bytecode is written (by root, into the copy): the next command from the same copy starts faster.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("JANUS_HOOKS_ROOT", None)
    return subprocess.run([sys.executable, "-m", "janus_hooks", *(command or ("install", "--yes")),
                           "--root", str(root)],
                          env=env, cwd=root.parent, capture_output=True, text=True, timeout=TIMEOUT, check=False)


@pytest.fixture
def host_root(tmp_path: Path) -> Path:
    root = tmp_path / "host"
    desktops.nvidia_desktop(root)
    return root


@pytest.mark.parametrize("case", ["directory others can write", "directory owned by a user",
                                  "package file others can write"])
def test_install_refuses_a_package_others_can_change(tmp_path, host_root, case):
    code = tmp_path / "code"
    code.mkdir()
    package = _copy_package(code)
    if case == "directory others can write":
        os.chmod(code, 0o777)
        culprit = f"{code} is writable by others (mode 777)"
    elif case == "directory owned by a user":
        os.chown(code, NOBODY, NOBODY)
        culprit = f"{code} is owned by uid {NOBODY}, not root"
    else:
        os.chmod(package / "hook.py", 0o666)
        culprit = f"{package / 'hook.py'} is writable by others (mode 666)"
    before = tree_state(host_root)
    result = _install(code, host_root)
    assert (result.returncode, result.stdout, result.stderr) == (
        1, "", f"janus-hooks: {culprit}: the hook would run as root code that others can change; "
               f"{ROOT_OWNED_INSTALL}\n")
    assert tree_diff(before, tree_state(host_root)) == []
    tally.record("inputs tried")
    tally.record("host states checked")


def test_a_root_owned_package_under_opt_linked_to_var_opt_installs_and_its_hook_runs(tmp_path):
    """/opt -> var/opt, as on image-based distributions: a root-owned venv-like tree under /opt is fine,
    the hook is written to run the package where the link leads, and it runs (install checks the shim)."""
    system = tmp_path / "system"
    (system / "var/opt/janus-hooks/lib").mkdir(parents=True)
    os.symlink("var/opt", system / "opt")
    package = _copy_package(system / "opt/janus-hooks/lib")
    assert others_can_change(package / "hook.py") is None
    root = tmp_path / "host"
    desktops.nvidia_desktop(root)
    result = _install(system / "opt/janus-hooks/lib", root)
    assert result.returncode == 0, result.stderr
    shim = (root / "etc/libvirt/hooks/qemu.d/janus-hooks").read_text()
    assert f'JANUS_PATH = "{system}/var/opt/janus-hooks/lib"\n' in shim
    tally.record("host states checked")


def test_check_fails_when_the_installed_code_became_writable_by_others(tmp_path, host_root):
    code = tmp_path / "code"
    code.mkdir()
    _copy_package(code)
    assert _install(code, host_root).returncode == 0
    assert "installed and current" in _install(code, host_root, "check").stdout
    os.chmod(code, 0o777)
    check = _install(code, host_root, "check")
    hook = host_root / "etc/libvirt/hooks/qemu.d/janus-hooks"
    assert check.returncode == 1
    assert (f"  FAIL  hook       {code} is writable by others (mode 777): the installed hook runs it as root; "
            f"{ROOT_OWNED_INSTALL}\n") in check.stdout, check.stdout
    assert hook.is_file()
    tally.record("inputs tried")


def test_others_can_change_walks_every_component_and_link(tmp_path):
    base = tmp_path / "t"
    (base / "ok/bin").mkdir(parents=True)
    (base / "ok/bin/python").write_text("")
    assert others_can_change(base / "ok/bin/python") is None
    # A sticky directory writable by all: others cannot replace root's entries in it.
    (base / "sticky").mkdir(mode=0o1777)
    os.chmod(base / "sticky", 0o1777)
    (base / "sticky/root-owned").mkdir()
    assert others_can_change(base / "sticky/root-owned") is None
    (base / "sticky/theirs").mkdir()
    os.chown(base / "sticky/theirs", NOBODY, NOBODY)
    assert others_can_change(base / "sticky/theirs/x") == f"{base}/sticky/theirs is owned by uid {NOBODY}, not root"
    # Group write counts as much as others' write.
    (base / "group").mkdir()
    os.chmod(base / "group", 0o775)
    assert others_can_change(base / "group/x") == f"{base}/group is writable by its group (mode 775)"
    # A link a user owns on the way, and a root-owned link that leads into a user's directory.
    os.symlink("ok", base / "theirs-link")
    os.lchown(base / "theirs-link", NOBODY, NOBODY)
    assert others_can_change(base / "theirs-link/bin") == f"{base}/theirs-link is owned by uid {NOBODY}, not root"
    os.symlink("sticky/theirs", base / "to-theirs")
    assert others_can_change(base / "to-theirs/x") == f"{base}/sticky/theirs is owned by uid {NOBODY}, not root"
    # Inside a package: any file or directory below it.
    (base / "ok/pkg/sub").mkdir(parents=True)
    (base / "ok/pkg/sub/mod.py").write_text("")
    assert tree_others_can_change(base / "ok/pkg") is None
    os.chmod(base / "ok/pkg/sub/mod.py", 0o646)
    assert tree_others_can_change(base / "ok/pkg") == f"{base}/ok/pkg/sub/mod.py is writable by others (mode 646)"
    tally.record("inputs tried", 7)
