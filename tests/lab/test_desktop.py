"""The desktop flavour of the real-kernel lab, booted once for this module: systemd, logind, greetd with
weston in a wayland session on seat0, PipeWire/WirePlumber on the GPU's audio function, a second GPU; then
janus-hooks' single-GPU switch there (tests/lab/desktop.py all).

Every assertion is on what the scenario read from the lab's real /sys, /proc, logind and processes.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lab import STALL_AFTER, run_in_lab_again_if_stalled  # noqa: E402

pytestmark = pytest.mark.lab

FRESH = ("/etc/libvirt/hooks", "/etc/libvirt/qemu", "/etc/janus-hooks", "/var/lib/janus-hooks", "/etc/udev/rules.d",
         "/var/log/janus-hooks")
GPU, AUDIO, SECOND_GPU = "0000:00:02.0", "0000:00:02.1", "0000:00:06.0"


@pytest.fixture(scope="module")
def desktop():
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: run scripts/bootstrap")
    # Every step of the scenarios is bounded at 300 s or less and says what it does.
    result = run_in_lab_again_if_stalled([".venv/bin/python", "tests/lab/desktop.py", "all"], 1200, STALL_AFTER,
                                         fresh=FRESH, flavour="desktop")
    path = result.out_dir / "desktop-all.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data["_lab"] = {"returncode": result.returncode, "message": result.message, "output": result.output[-4000:],
                    "boot_seconds": result.boot_seconds, "total_seconds": result.total_seconds}
    return data


def _ok(results, key):
    lab = results["_lab"]
    assert key in results, f"scenario {key} did not run: {lab['message']}\n{lab['output']}"
    return results[key]


def _comms(holders):
    return sorted({h["comm"] for h in holders})


def assert_desktop(state, session_id=None):
    """The desktop as a person has it: a wayland session of desk's, active on seat0, whose weston has the
    card through logind (weston, systemd-logind and PID 1 hold it), the user's application holding the card
    too, WirePlumber holding the audio card, fbcon bound, nothing of janus-hooks left."""
    session = state["session"]
    assert session and session["Type"] == "wayland" and session["Active"] == "yes" and session["Seat"] == "seat0"
    assert session["Name"] == "desk"
    if session_id is not None:
        assert session["Id"] == session_id
    assert state["display_manager"] == "active"
    assert state["gpu_driver"] == "bochs-drm" and state["audio_driver"] == "snd_hda_intel"
    assert state["card"] == "/dev/dri/card0" and "card0" in state["seat_masters"]
    card = state["card_holders"]
    assert {"weston", "systemd-logind"} <= set(_comms(card)) and 1 in [h["pid"] for h in card]
    assert "janus-lab-app.service" in [h["unit"] for h in card]
    assert "wireplumber" in _comms(state["audio_holders"])
    assert state["fbcon_bound"] is True
    assert state["journal_open"] is False and state["vfio_group_node"] is False
    assert state["hugepages_total"] == 0


def _switch(results):
    switch = _ok(results, "switch")
    assert "failed" not in switch, f"{switch.get('failed')}\n{json.dumps(switch.get('diagnostics'), indent=1)}"
    assert switch["error"] is None, switch["error"]
    return switch


def test_desktop_lab_boots_a_systemd_desktop(desktop):
    smoke = _ok(desktop, "smoke")
    assert_desktop(smoke)
    # The GPU's audio function shares the GPU's IOMMU group; the second GPU has its own, on bochs-drm.
    assert smoke["groups"][GPU] == smoke["groups"][AUDIO] != smoke["groups"][SECOND_GPU]
    assert smoke["second_gpu_driver"] == "bochs-drm"
    assert [n for n in smoke["audio_nodes"] if n.startswith("/dev/snd/controlC")] == ["/dev/snd/controlC0"]
    # logind opened the card for weston and keeps it, with a copy in PID 1's fd store: one open file.
    assert smoke["card_same_open_file"] == {"systemd": True, "systemd-logind": True}
    assert smoke["vfio_modules"] == []
    assert desktop["_lab"]["boot_seconds"] is not None


def test_vm_start_frees_the_gpu_and_its_audio(desktop):
    switch = _switch(desktop)
    during = switch["during"]
    assert during["gpu_driver"] == "vfio-pci" and during["audio_driver"] == "vfio-pci"
    assert during["vfio_group_node"] is True
    assert during["session"] is None and during["card_holders"] == [] and during["audio_holders"] == []
    assert during["display_manager"] != "active"
    assert during["second_gpu_driver"] == "bochs-drm"  # the other GPU is not touched
    devices = [tuple(d) for d in switch["nested_qemu_devices"]]
    assert (0x1234, 0x1111) in devices and (0x8086, 0x293E) in devices
    assert during["hugepages_total"] == 32 and switch["qemu_uses_hugepages"] is True


def test_vm_destroy_brings_a_new_session_back(desktop):
    switch = _switch(desktop)
    after = switch["after"]
    assert_desktop(after)
    assert after["session"]["Id"] != switch["before"]["session"]["Id"]


@pytest.mark.parametrize("which", ["audio", "card"])
def test_start_refused_while_a_process_outside_the_session_holds_a_node(desktop, which):
    refuse = _ok(desktop, f"refuse-{which}")
    assert "failed" not in refuse, f"{refuse.get('failed')}\n{json.dumps(refuse.get('diagnostics'), indent=1)}"
    assert refuse["error"] is not None
    assert_desktop(refuse["after"])
    assert f"pid {refuse['holder_pid']} (python" in refuse["error"]
    assert refuse["node"] in refuse["error"]
    assert refuse["same_session"] is True  # refused before anything was stopped


def test_kill_9_mid_switch_then_rollback_brings_the_desktop_back(desktop):
    crash = _ok(desktop, "crash")
    assert "failed" not in crash, f"{crash.get('failed')}\n{json.dumps(crash.get('diagnostics'), indent=1)}"
    assert_desktop(crash["after"])
    assert crash["hook_status"] == -9 and crash["killed_at"] == "bind-vfio"
    assert crash["crashed"]["journal_open"] is True and crash["crashed"]["session"] is None
    assert crash["rollback_status"] == 0, crash["rollback_output"]
