"""Hostile suite: ``--tally FILE`` writes what this run tried (see tests/hostile/tally.py)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.conftest import make_cli  # noqa: F401 - the CLI on fake trees, shared with tests/cli
from tests.hostile import tally


def pytest_addoption(parser):
    parser.addoption("--tally", default=None, help="write the hostile suite's counts as JSON to this file")


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--tally", None)
    if path:
        counts = dict(tally.COUNTS)
        counts["tests failed"] = session.testsfailed
        Path(path).write_text(json.dumps(counts, indent=1, sort_keys=True) + "\n")
