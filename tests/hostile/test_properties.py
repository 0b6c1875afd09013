"""Property tests: any input to the domain parser, the journal parser and the config loader gives a result
or a JanusError, never another exception. Each runs derandomized with a fixed number of examples, in a child
process under an address-space limit (a parser that builds a huge structure fails there, not the suite)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hostile import tally

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = 300
LIMIT_MIB = 1024


@pytest.mark.parametrize("name", ["domain", "journal", "config"])
def test_any_input_gives_a_result_or_a_janus_error(name):
    child = subprocess.run([sys.executable, "-m", "tests.hostile.property_child", name, str(EXAMPLES),
                            str(LIMIT_MIB)], cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert child.returncode == 0, child.stderr[-3000:]
    examples = json.loads(child.stdout.splitlines()[-1])["examples"]
    assert examples >= EXAMPLES  # every example ran (a shrink adds more)
    tally.record(f"inputs tried ({name} parser)", examples)


def test_the_address_space_limit_really_holds():
    """The limit is in force in the child: a 2 GiB allocation fails there with MemoryError."""
    code = (f"import resource, sys; from tests.hostile.property_child import _limit; _limit({LIMIT_MIB})\n"
            "try:\n    bytearray(2 << 30)\nexcept MemoryError:\n    sys.exit(7)\n")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60, check=False).returncode == 7
