"""Run one prepare on a fake host and kill -9 this very process at a chosen point.

Usage: python -m tests.core.crash_child ROOT VM XML_FILE EVENT STEP
EVENT is "intent" (right after the journal record was fsynced) or "applied" (right after the change).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from janus_hooks.domain import parse_domain
from tests.conftest import FakeHost


def main() -> int:
    root, vm, xml_file, event, step = sys.argv[1:6]

    def observer(seen: str, index: int) -> None:
        if seen == event and index == int(step):
            os.kill(os.getpid(), signal.SIGKILL)

    host = FakeHost(Path(root))
    janus = host.janus(observer=observer)
    janus.prepare(parse_domain(Path(xml_file).read_text()))
    return 3  # the kill point was never reached


if __name__ == "__main__":
    sys.exit(main())
