"""What the hook's slow path (a managed VM's prepare and release) imports: only what it uses.

Guards import-structure decisions made for the hook's start-up time (measured by bench/run --only slowpath);
each name here was removed from the slow path on purpose and would come back silently otherwise.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from janus_hooks.logfile import RotatingLog
from tests.conftest import FakeHost, domain_xml
from tests.fake import hosts

REPO = Path(__file__).resolve().parents[2]
# logging.handlers (and what only it pulls in): the hook's log file has its own small rotating handler.
# The CLI, the agent and their libraries, VM creation; CPU isolation, shared-vram and AMD's reset method
# (their actions are imported only for a VM that uses them); difflib (only a config error suggests a key).
NOT_ON_SLOW_PATH = (
    "logging.handlers", "socket", "pickle", "queue",
    "click", "libvirt", "pyudev", "watchdog", "janus_hooks.cli", "janus_hooks.agent", "janus_hooks.vm",
    "janus_hooks.install", "janus_hooks.check",
    "janus_hooks.isolation", "janus_hooks.actions.cpu", "janus_hooks.actions.shared", "janus_hooks.actions.reset",
    "difflib",
)

CHILD = """
import io, json, sys
sys.path.insert(0, {repo!r})
from pathlib import Path
from janus_hooks.hook import main
root = Path({root!r})

def open_janus(_root, restoring=False):
    from janus_hooks.host import Host
    from janus_hooks.runtime import Janus
    from tests.fake.kernel import FakeKernel
    from tests.fake.services import FakeRunner, FakeServices
    return Janus.open(Host(root, FakeKernel(root)), services=FakeServices(root), runner=FakeRunner(root),
                      restoring=restoring)

xml = sys.stdin.read()
codes = [main(["win11", op, sub, "-"], root=str(root), stdin=io.StringIO(xml), open_janus=open_janus)
         for op, sub in (("prepare", "begin"), ("release", "end"))]
print(json.dumps({{"codes": codes, "modules": sorted(sys.modules)}}))
"""


def test_prepare_and_release_import_only_what_they_use(tmp_path):
    root = hosts.single_nvidia(tmp_path / "host")
    child = CHILD.format(repo=str(REPO), root=str(root))
    out = subprocess.run([sys.executable, "-I", "-S", "-c", child], capture_output=True, text=True, timeout=60,
                         input=domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS, hugepages=True))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["codes"] == [0, 0], out.stderr
    # The slow path ran to the end, log file included: the handler that replaced RotatingFileHandler wrote.
    log = (root / "var/log/janus-hooks/hook.log").read_text()
    assert "VM win11: prepared" in log and "VM win11: released" in log
    assert "janus_hooks.plan" in result["modules"]  # it was the slow path
    assert [m for m in NOT_ON_SLOW_PATH if m in result["modules"]] == []


def test_release_alone_imports_no_planner_and_no_gpu_backend(tmp_path):
    """libvirt's release end is a process of its own: it replays the journal, it reads janus.toml (and its
    profile keys) but never plans, so the planner, the host snapshot and the GPU backends stay unloaded."""
    root = hosts.single_nvidia(tmp_path / "host")
    xml = domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS, hugepages=True)
    assert FakeHost(root).hook("win11", "prepare", "begin", xml)[0] == 0
    child = CHILD.format(repo=str(REPO), root=str(root)).replace(
        'for op, sub in (("prepare", "begin"), ("release", "end"))', 'for op, sub in (("release", "end"),)')
    out = subprocess.run([sys.executable, "-I", "-S", "-c", child], capture_output=True, text=True, timeout=60,
                         input=xml)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["codes"] == [0], out.stderr
    assert "janus_hooks.engine" in result["modules"]  # it replayed the journal
    loaded = [m for m in ("janus_hooks.plan", "janus_hooks.snapshot", "janus_hooks.domain", "janus_hooks.gpu")
              if m in result["modules"]]
    assert loaded == []


def test_each_action_kind_is_found_in_the_module_the_kind_table_names():
    from janus_hooks.actions import action_kinds
    from janus_hooks.actions.base import KIND_MODULES

    assert {kind: cls.__module__ for kind, cls in action_kinds().items()} == {
        kind: f"janus_hooks.actions.{module}" for kind, module in KIND_MODULES.items()}


KIND_CHILD = """
import json, sys
sys.path.insert(0, {repo!r})
from janus_hooks.actions import action_from_json
before = [m for m in sys.modules if m.startswith("janus_hooks.actions.")]
action = action_from_json({{"kind": "set-governor", "vm": "win11", "cores": [2, 3], "governor": "performance"}})
print(json.dumps({{"before": sorted(before), "class": type(action).__module__ + "." + type(action).__name__}}))
"""


def test_a_journal_record_loads_the_module_of_its_kind():
    out = subprocess.run([sys.executable, "-I", "-S", "-c", KIND_CHILD.format(repo=str(REPO))],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result == {"before": ["janus_hooks.actions.base"], "class": "janus_hooks.actions.cpu.SetGovernor"}


def _record(text: str) -> logging.LogRecord:
    return logging.LogRecord("janus_hooks.test", logging.INFO, __file__, 1, text, None, None)


def test_log_file_rotates_like_logging_handlers(tmp_path):
    path = tmp_path / "hook.log"
    handler = RotatingLog(path, max_bytes=100, backups=2)
    try:
        for n in range(10):
            handler.emit(_record(f"line {n} " + "x" * 30))  # 38 characters + newline: two lines per file
    finally:
        handler.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["hook.log", "hook.log.1", "hook.log.2"]  # older ones dropped
    assert path.read_text().splitlines()[-1].startswith("line 9 ")
    assert (tmp_path / "hook.log.1").read_text().startswith("line 6 ")
    assert (tmp_path / "hook.log.2").read_text().startswith("line 4 ")
    assert all(p.stat().st_size < 100 for p in tmp_path.iterdir())


def test_log_file_without_backups_starts_afresh(tmp_path):
    path = tmp_path / "hook.log"
    handler = RotatingLog(path, max_bytes=50, backups=0)
    try:
        for n in range(3):
            handler.emit(_record(f"line {n} " + "y" * 30))
    finally:
        handler.close()
    assert [p.name for p in tmp_path.iterdir()] == ["hook.log"]
    assert path.read_text() == "line 2 " + "y" * 30 + "\n"
