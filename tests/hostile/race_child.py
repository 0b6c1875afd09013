"""A long-lived worker for the race tests: runs one janus-hooks transition per line of stdin, on cue.

Lines: ``ROOT OP VM XML_FILE`` with OP ``prepare`` or ``release`` (the hook's two slow paths, as libvirt
calls them) or ``rollback`` (what ``janus-hooks rollback VM`` runs). The worker answers ``ready`` once it
has read a line and everything is imported, then waits for ``go`` so that two workers start together; it
prints ``<exit status> <stderr line>`` when done. Staying alive keeps 50 races from paying 100 interpreter
starts on shared cores.
"""

from __future__ import annotations

import sys
from pathlib import Path

from janus_hooks.runtime import Janus  # noqa: F401 - imported before the cue, not inside the race
from tests.conftest import FakeHost


def main() -> int:
    for line in sys.stdin:
        root, op, vm, xml_file = line.split()
        host = FakeHost(Path(root))
        xml = Path(xml_file).read_text()
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            return 2
        if op == "rollback":
            try:
                host.janus(restoring=True).release(vm)
                code, err = 0, ""
            except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
                code, err = 1, f"{type(exc).__name__}: {exc}"
        else:
            code, err = host.hook(vm, op, "end" if op == "release" else "begin", xml)
        print(f"{code} {err}".replace("\n", " | "), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
