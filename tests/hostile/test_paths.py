"""Symbolic links on the way to the state, log, config and install paths: followed only when root owns them
and they stay below the root; anything else is refused with one line naming the path and the link, and
nothing inside or outside the root changes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from janus_hooks.errors import UnsafeStateError
from janus_hooks.hook import one_line
from janus_hooks.host.paths import resolve_beneath
from tests.cli.conftest import tree_diff, tree_state
from tests.conftest import domain_xml
from tests.fake import desktops, hosts
from tests.hostile import tally

XML = domain_xml(hostdevs=desktops.NVIDIA_CARD)
NOBODY = 65534
FAILURES = "var/lib/janus-hooks/failures"


def _link(root: Path, rel: str, target: str, owner: int | None = None) -> Path:
    """Replace ``root/rel`` (and what was below it) by a symbolic link to ``target``."""
    path = root / rel
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)
    if owner is not None:
        os.lchown(path, owner, owner)
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the host tree: whatever points there leads out of the root."""
    path = tmp_path / "outside"
    path.mkdir(mode=0o700)
    return path


def _escapes(root: Path, outside: Path) -> dict[str, tuple[str, str, int | None, str]]:
    """Case -> (link below the root, its target, its owner, the path janus-hooks wanted)."""
    return {
        "absolute state dir outside": ("var/lib", str(outside), None, "var/lib/janus-hooks"),
        "relative .. escape": ("var/lib", "../../outside", None, "var/lib/janus-hooks"),
        "escape further down": ("var/lib/janus-hooks", "../../../outside", None, "var/lib/janus-hooks"),
        "user-owned link": ("var/lib", "../srv/lib", NOBODY, "var/lib/janus-hooks"),
        "config dir outside": ("etc/janus-hooks", str(outside), None, "etc/janus-hooks"),
    }


def _refusal(root: Path, link: str, target: str, owner: int | None, wanted: str) -> str:
    if owner is not None:
        return (f"{root / wanted}: {root / link} is a symbolic link owned by uid {owner}, not root; "
                "refusing to follow it")
    return f"{root / wanted}: {root / link} is a symbolic link to {target}, which leads outside {root}; " \
           "refusing to follow it"


@pytest.mark.parametrize("case", ["absolute state dir outside", "relative .. escape", "escape further down",
                                  "user-owned link", "config dir outside"])
def test_a_start_refuses_a_link_out_of_the_root_or_not_roots(make_cli, outside, case):
    c = make_cli(desktops.nvidia_desktop)
    root = c.root
    (root / "srv/lib").mkdir(parents=True)
    if case == "config dir outside":
        shutil.copy(root / "etc/janus-hooks/janus.toml", outside / "janus.toml")
    link, target, owner, wanted = _escapes(root, outside)[case]
    _link(root, link, target, owner)
    before, before_outside = tree_state(root), tree_state(outside)
    code, err = c.fake.hook("win11", "prepare", "begin", XML)
    # The temporary root's long path is in the message up to four times: libvirt's line may be cut (head and
    # tail kept), the hook's log has it whole.
    refusal = f"janus-hooks: VM 'win11': {_refusal(root, link, target, owner, wanted)}"
    assert (code, err) == (1, one_line(refusal))
    # Only the failed start is kept, for 'status' (when the state dir itself is fine).
    assert [p for p in tree_diff(before, tree_state(root)) if not p.startswith(FAILURES)] == []
    assert tree_diff(before_outside, tree_state(outside)) == []
    tally.record("inputs tried")
    tally.record("host states checked")


@pytest.mark.parametrize("link", ["etc/libvirt", "etc/systemd/system", "etc/udev"])
def test_install_refuses_an_install_path_that_leads_out_of_the_root(make_cli, outside, link):
    c = make_cli(desktops.nvidia_desktop)
    _link(c.root, link, str(outside))
    before, before_outside = tree_state(c.root), tree_state(outside)
    result = c("install", "--yes")
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"janus-hooks: {c.root}/") and last.endswith(
        f": {c.root / link} is a symbolic link to {outside}, which leads outside {c.root}; refusing to follow it")
    assert tree_diff(before, tree_state(c.root)) == []
    assert tree_diff(before_outside, tree_state(outside)) == []
    tally.record("inputs tried")
    tally.record("host states checked")


def test_a_log_dir_out_of_the_root_is_not_written_and_the_vm_still_starts(make_cli, outside):
    """The log is a courtesy: a start goes on without it rather than write root's lines where a link points."""
    c = make_cli(desktops.nvidia_desktop)
    _link(c.root, "var/log", str(outside))
    before = c.fake.snapshot()
    assert c.fake.hook("win11", "prepare", "begin", XML) == (0, "")
    assert c.fake.hook("win11", "release", "end", XML) == (0, "")
    assert c.fake.snapshot() == before
    assert list(outside.iterdir()) == []
    tally.record("inputs tried")
    tally.record("host states checked")


@pytest.mark.parametrize("how", ["relative", "absolute within the root"])
def test_root_owned_links_that_stay_below_the_root_are_followed(make_cli, how):
    """As on image-based distributions (/opt -> var/opt): state kept where the link points, below the root."""
    c = make_cli(desktops.nvidia_desktop)
    root = c.root
    (root / "srv/lib").mkdir(parents=True)
    _link(root, "var/lib", "../srv/lib" if how == "relative" else str(root / "srv/lib"))
    before = c.fake.snapshot()
    assert c.fake.hook("win11", "prepare", "begin", XML) == (0, "")
    assert (root / "srv/lib/janus-hooks/journal/win11.jsonl").is_file()
    assert c.fake.hook("win11", "release", "end", XML) == (0, "")
    assert not (root / "srv/lib/janus-hooks/journal/win11.jsonl").exists()
    after = c.fake.snapshot()
    assert [k for k in after if k not in before or after[k] != before[k]] == [
        k for k in after if k.startswith("srv/lib/janus-hooks")]  # only janus-hooks' own state, moved with the link
    tally.record("host states checked")


def test_resolve_beneath_names_the_link_of_a_loop(tmp_path):
    root = tmp_path / "host"
    (root / "var").mkdir(parents=True)
    os.symlink("b", root / "var/a")
    os.symlink("a", root / "var/b")
    with pytest.raises(UnsafeStateError, match=r"more than 40 symbolic links on the way; refusing to follow"):
        resolve_beneath(root, "var/a/janus-hooks")
    tally.record("inputs tried")


def test_check_reports_a_hook_dir_out_of_the_root_and_still_answers(make_cli, outside):
    c = make_cli(desktops.nvidia_desktop)
    _link(c.root, "etc/libvirt", str(outside))
    result = c("check")
    assert result.exit_code == 1
    assert (f"  FAIL  hook       {c.root}/etc/libvirt/hooks: {c.root}/etc/libvirt is a symbolic link to {outside}, "
            f"which leads outside {c.root}; refusing to follow it\n") in result.output
    assert "GPUs:\n  0000:01:00.0" in result.output
    tally.record("inputs tried")


@pytest.mark.parametrize("link", ["etc/modprobe.d", "etc/initramfs-tools/hooks"])
def test_reserve_refuses_a_boot_path_that_leads_out_of_the_root(make_cli, outside, link):
    """reserve writes a modprobe softdep and an initramfs hook that root runs at every boot."""
    c = make_cli(hosts.amd_dgpu_with_igpu)
    (c.root / "etc/initramfs-tools").mkdir(parents=True, exist_ok=True)
    _link(c.root, link, str(outside))
    before, before_outside = tree_state(c.root), tree_state(outside)
    result = c("reserve", "0000:03:00", "--yes")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"janus-hooks: {c.root / link}: {c.root / link} is a symbolic link to {outside}, which leads outside "
        f"{c.root}; refusing to follow it")
    assert tree_diff(before, tree_state(c.root)) == []
    assert tree_diff(before_outside, tree_state(outside)) == []
    tally.record("inputs tried")
    tally.record("host states checked")
