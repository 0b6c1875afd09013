"""The one runner, for real: argv lists, timeouts, output, and daemons that keep stdout open."""

from __future__ import annotations

import time

import pytest

from janus_hooks.errors import CommandFailed
from janus_hooks.host.runner import SubprocessRunner, check


def test_output_and_status():
    result = SubprocessRunner().run(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
    with pytest.raises(CommandFailed, match="failed: err"):
        check(result)


def test_a_daemon_holding_stdout_does_not_hold_us():
    # Like an init script whose daemon inherits stdout: the command returns, the daemon lives on.
    start = time.monotonic()
    result = SubprocessRunner().run(["sh", "-c", "sleep 5 & echo started"], timeout=4)
    assert result.stdout == "started\n"
    assert time.monotonic() - start < 3


def test_timeout_kills_the_whole_group():
    start = time.monotonic()
    with pytest.raises(CommandFailed, match="did not finish within 0.5 s"):
        SubprocessRunner().run(["sh", "-c", "sleep 30; echo never"], timeout=0.5)
    assert time.monotonic() - start < 5


def test_missing_program_is_one_line():
    with pytest.raises(CommandFailed, match="cannot run /nonexistent/prog: No such file or directory"):
        SubprocessRunner().run(["/nonexistent/prog"], timeout=5)


def test_environment_is_clean(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "x")
    out = SubprocessRunner().run(["env"], timeout=5).stdout
    assert "SECRET_TOKEN" not in out and "LC_ALL=C" in out
