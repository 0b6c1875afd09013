"""The units as install renders them: systemd-analyze verify, and a hardening threshold per unit.

Thresholds: ``--threshold=N`` compares with ten times the exposure systemd-analyze prints (0.0 = locked
down, 10.0 = unprotected), in whole numbers. The agent and the boot-time recovery roll VMs back, which needs
root with CAP_SYS_MODULE, CAP_SYS_ADMIN, CAP_KILL and CAP_SYS_PTRACE, /sys and /dev: N = 35, exposure 3.5
(they score 3.3). The sleep guard only reads the journals: N = 10, exposure 1.0 (it scores 0.7).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from janus_hooks.host import Host
from janus_hooks.install import Identity, desired_items

THRESHOLDS = {"janus-hooks-agent.service": 35, "janus-hooks-recover.service": 35,
              "janus-hooks-sleep-guard.service": 10}

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


@pytest.fixture(scope="module")
def units(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("root")
    host = Host(root)
    rendered = {}
    for item in desired_items(host, Identity.current(root)):
        if item.kind == "unit":
            path = root / item.rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(item.data)
            rendered[path.name] = path
    assert set(rendered) == set(THRESHOLDS)
    return rendered


def _analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=60,  # noqa: S603,S607
                          cwd=cwd, check=False)


@pytest.mark.parametrize("unit", sorted(THRESHOLDS))
def test_unit_verifies(units, unit):
    proc = _analyze("verify", f"./{unit}", cwd=units[unit].parent)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


@pytest.mark.parametrize("unit", sorted(THRESHOLDS))
def test_unit_is_hardened_below_its_threshold(units, unit):
    threshold = THRESHOLDS[unit]
    proc = _analyze("security", "--offline=true", f"--threshold={threshold}", f"./{unit}", cwd=units[unit].parent)
    overall = [line.strip() for line in proc.stdout.splitlines() if "Overall exposure level" in line]
    assert proc.returncode == 0, f"{unit}: {overall or proc.stderr.strip()} (threshold {threshold})"


def test_a_looser_threshold_check_would_fail(units):
    # The check can fail: the agent's exposure (3.3) is above 3.0.
    proc = _analyze("security", "--offline=true", "--threshold=30", "./janus-hooks-agent.service",
                    cwd=units["janus-hooks-agent.service"].parent)
    assert proc.returncode != 0


def test_agent_unit_is_notify_with_a_watchdog_and_the_rollback_capabilities(units):
    text = units["janus-hooks-agent.service"].read_text()
    assert "Type=notify" in text and "WatchdogSec=60" in text
    caps = next(line for line in text.splitlines() if line.startswith("CapabilityBoundingSet="))
    assert set(caps.split("=", 1)[1].split()) == {"CAP_SYS_MODULE", "CAP_SYS_ADMIN", "CAP_KILL", "CAP_SYS_PTRACE"}
    assert "ReadWritePaths=" in text and not re.search(r"@[A-Z_]+@", text), "a placeholder was left"
