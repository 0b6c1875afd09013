"""The reliability counts: a host tree left changed is counted by the comparison itself, so a failing run
reports it (scripts/reliability prints "host states left changed" from these counts)."""

from __future__ import annotations

import pytest

from tests.hostile import tally


@pytest.fixture
def counts():
    """This run's counts, put back afterwards: the test's own changed tree is no finding of the suite."""
    saved = tally.COUNTS.copy()
    yield tally.COUNTS
    tally.COUNTS.clear()
    tally.COUNTS.update(saved)


def test_a_changed_host_tree_is_counted_before_the_test_fails(counts):
    before = {"sys/bus/pci/devices/0000:01:00.0/driver": ("link", "../nvidia"), "etc/janus-hooks": ("dir", "")}
    after = {**before, "sys/bus/pci/devices/0000:01:00.0/driver": ("link", "../vfio-pci")}
    checked, changed = counts["host states checked"], counts["host states left changed"]
    with pytest.raises(AssertionError, match=r"host tree differs at \['sys/bus/pci/devices/0000:01:00.0/driver'\]"):
        tally.check_host(before, after)
    assert (counts["host states checked"], counts["host states left changed"]) == (checked + 1, changed + 1)
    tally.check_host(before, dict(before))
    assert (counts["host states checked"], counts["host states left changed"]) == (checked + 2, changed + 1)


def test_paths_the_test_changed_itself_can_be_left_out(counts):
    before = {"etc/janus-hooks/janus.toml": ("file", "a")}
    changed = counts["host states left changed"]
    tally.check_host(before, {"etc/janus-hooks/janus.toml": ("file", "b")}, ignore=("etc/janus-hooks/janus.toml",))
    assert counts["host states left changed"] == changed
    with pytest.raises(AssertionError):
        tally.check_host(before, {"etc/janus-hooks/janus.toml": ("file", "b")})
    assert counts["host states left changed"] == changed + 1
