"""Runs one property of the parsers in this process, under an address-space limit set before anything else.

Usage: python -m tests.hostile.property_child NAME MAX_EXAMPLES LIMIT_MIB
Prints one JSON line {"examples": N} when every input gave a result or a JanusError; a falsifying example
makes hypothesis raise, and the exit status says so.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
from pathlib import Path


def _limit(mib: int) -> None:
    limit = mib << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main() -> int:
    name, max_examples, limit_mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    _limit(limit_mib)
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from janus_hooks.errors import JanusError
    from tests.hostile import strategies

    seen = {"examples": 0}
    config = settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
                      suppress_health_check=list(HealthCheck))

    def accept(call, count: bool = True) -> None:
        seen["examples"] += count
        try:
            call()
        except JanusError:
            pass

    if name == "domain":
        from janus_hooks.domain import parse_domain

        @config
        @given(st.one_of(strategies.domain_xml(), st.text(max_size=2000)))
        def prop(xml: str) -> None:
            accept(lambda: parse_domain(xml))

    elif name == "journal":
        from janus_hooks.journal import parse_journal

        work = Path(tempfile.mkdtemp(prefix="janus-prop-"))
        path = work / "win11.jsonl"

        @config
        @given(st.one_of(strategies.journal_bytes(), st.binary(max_size=2000)))
        def prop(data: bytes) -> None:
            path.write_bytes(data)
            accept(lambda: parse_journal(path, "win11"))

    elif name == "config":
        from janus_hooks.config import load_config, load_profile

        work = Path(tempfile.mkdtemp(prefix="janus-prop-"))
        (work / "vms").mkdir(mode=0o700)
        os.chmod(work, 0o700)

        @config
        @given(st.one_of(strategies.config_bytes(), st.binary(max_size=2000)))
        def prop(data: bytes) -> None:
            (work / "janus.toml").write_bytes(data)
            os.chmod(work / "janus.toml", 0o600)
            accept(lambda: load_config(work))
            (work / "vms/win11.toml").write_bytes(data)
            os.chmod(work / "vms/win11.toml", 0o600)
            accept(lambda: load_profile(work, "win11"), count=False)  # the same input, read as a profile

    else:
        print(f"unknown property {name}", file=sys.stderr)
        return 2
    prop()
    print(json.dumps(seen), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
