"""AMD's reset bug: a GPU that needs vendor-reset gets reset_method=device_specific for the VM's run (journaled,
restored, crash-safe); without the module a single-GPU start is refused unless the VM's profile accepts it."""

from __future__ import annotations

from pathlib import Path

import pytest

from janus_hooks.domain import parse_domain
from janus_hooks.gpu.amdgpu import NEEDS_VENDOR_RESET, vendor_reset_family
from janus_hooks.hook import MAX_LINE
from tests.conftest import FAST_TIMEOUTS, FakeHost, domain_xml
from tests.core.helpers import assert_same_tree, diff, kill_hook_at
from tests.fake import hosts
from tests.hostile import tally

XML = domain_xml(hostdevs=hosts.POLARIS_FUNCTIONS)
RESET_FILE = f"sys/bus/pci/devices/{hosts.POLARIS_GPU}/reset_method"
REFUSAL = (f"janus-hooks: VM 'win11': GPU {hosts.POLARIS_GPU} (Polaris 10) only resets with vendor-reset, which "
           "is not loaded: the desktop may not come back after the VM; load vendor-reset or set "
           "reset_risk = \"accept\" in the VM's profile")


def _polaris(root: Path, **kwargs) -> FakeHost:
    hosts.single_polaris(root, **kwargs)
    h = FakeHost(root)
    h.config(FAST_TIMEOUTS)
    return h


def _accept(h: FakeHost, mode: str = "single-gpu") -> None:
    path = h.root / "etc/janus-hooks/vms/win11.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'mode = "{mode}"\nreset_risk = "accept"\n')


@pytest.mark.parametrize("device, family", [
    ("0x67df", "Polaris 10"), ("0x6fdf", "Polaris 10"), ("0x67ef", "Polaris 11"), ("0x67ff", "Polaris 11"),
    ("0x699f", "Polaris 12"), ("0x687f", "Vega 10"), ("0x6863", "Vega 10"), ("0x66af", "Vega 20"),
    ("0x731f", "Navi 10"), ("0x7360", "Navi 12"), ("0x7340", "Navi 14"), ("0x734F", "Navi 14"),
])
def test_table_knows_the_cards_vendor_reset_supports(device, family):
    assert vendor_reset_family("0x1002", device) == family


def test_table_leaves_other_cards_alone():
    # vendor-reset's device database lists 67 ids, none twice.
    assert len(NEEDS_VENDOR_RESET) == 67
    assert vendor_reset_family("0x1002", "0x73bf") is None  # Navi 21 resets cleanly
    assert vendor_reset_family("0x10de", "0x67df") is None  # the same id from another vendor
    assert vendor_reset_family("", "") is None and vendor_reset_family("0x1002", "junk") is None


def test_plan_sets_device_specific_before_the_binding(tmp_path):
    h = _polaris(tmp_path / "host")
    plan = h.janus().plan(parse_domain(XML))
    assert plan.refusal is None
    kinds = [a.kind for a in plan.actions]
    assert kinds == ["stop-unit", "wait-released", "unbind-vtconsole", "detach-framebuffer", "unload-module",
                     "load-module", "load-module", "reset-method", "bind-vfio", "bind-vfio"]
    assert f"set the reset method of {hosts.POLARIS_GPU} to device_specific" in plan.render()
    # Only the GPU function: vendor-reset resets the card through it.
    assert [a.address for a in plan.actions if a.kind == "reset-method"] == [hosts.POLARIS_GPU]


def test_start_sets_it_and_release_restores_it(tmp_path):
    h = _polaris(tmp_path / "host")
    before = h.snapshot()
    assert h.hook("win11", "prepare", "begin", XML) == (0, "")
    assert h.read(RESET_FILE) == "device_specific"
    assert h.driver(hosts.POLARIS_GPU) == "vfio-pci"
    assert h.hook("win11", "release", "end", XML) == (0, "")
    assert h.read(RESET_FILE) == "bus"
    assert_same_tree(before, h.snapshot())


@pytest.mark.parametrize("event", ["intent", "applied"])
def test_kill_9_at_every_point_then_release_restores(tmp_path, event):
    steps = len(_polaris(tmp_path / "probe").janus().plan(parse_domain(XML)).actions)
    xml_file = tmp_path / "domain.xml"
    xml_file.write_text(XML)
    for step in range(steps):
        h = _polaris(tmp_path / f"{event}-{step}")
        before = h.snapshot()
        kill_hook_at(h.root, "win11", xml_file, event, step)
        code, err = h.hook("win11", "release", "end", XML)
        assert code == 0, f"{event} {step}: {err}"
        tally.check_host(before, h.snapshot())
        assert h.journal_vms() == []
        tally.record("crash points recovered")


def test_fault_at_every_kernel_operation_rolls_back(tmp_path):
    probe = _polaris(tmp_path / "probe")
    assert probe.hook("win11", "prepare", "begin", XML)[0] == 0
    operations = probe.kernel.ops
    assert ("write", RESET_FILE, "device_specific") in probe.kernel.log
    for fail_at in range(1, operations + 1):
        h = FakeHost(_polaris(tmp_path / f"fault-{fail_at}").root, fail_at=fail_at)
        before = h.snapshot()
        code, err = h.hook("win11", "prepare", "begin", XML)
        assert code == 1 and f"injected fault at operation {fail_at}" in err and "\n" not in err, fail_at
        tally.check_host(before, h.snapshot())
        assert h.journal_vms() == []
        tally.record("faults injected")


def test_fault_restoring_it_keeps_the_journal_until_a_later_release(tmp_path):
    h = _polaris(tmp_path / "host")
    before = h.snapshot()
    assert h.hook("win11", "prepare", "begin", XML)[0] == 0
    h.kernel = type(h.kernel)(h.root, fault=lambda n, op, target: target == RESET_FILE)
    code, err = h.hook("win11", "release", "end", XML)
    assert code == 1 and f"undo set the reset method of {hosts.POLARIS_GPU} to device_specific" in err
    assert h.journal_vms() == ["win11"] and h.read(RESET_FILE) == "device_specific"
    h.kernel = type(h.kernel)(h.root)
    assert h.hook("win11", "release", "end", XML) == (0, "")
    assert_same_tree(before, h.snapshot())


@pytest.mark.parametrize("vendor_reset", [False, None], ids=["installed-not-loaded", "absent"])
def test_single_gpu_without_vendor_reset_is_refused_naming_device_reason_and_fix(tmp_path, vendor_reset):
    h = _polaris(tmp_path / "host", vendor_reset=vendor_reset)
    before = h.snapshot()
    code, err = h.hook("win11", "prepare", "begin", XML)
    assert (code, err) == (1, REFUSAL)
    assert len(err) <= MAX_LINE
    assert h.kernel.ops == 0 and h.services.calls == []
    tally.check_host(before, h.snapshot())
    # `plan` says the same before anything is tried.
    assert "would be refused: GPU 0000:03:00.0 (Polaris 10) only resets with vendor-reset" in \
        h.janus().plan(parse_domain(XML)).render()


def test_profile_accepting_the_risk_starts_without_touching_the_reset_method(tmp_path):
    h = _polaris(tmp_path / "host", vendor_reset=None)
    _accept(h)
    plan = h.janus().plan(parse_domain(XML))
    assert "reset-method" not in [a.kind for a in plan.actions]
    assert (f"{hosts.POLARIS_GPU} (Polaris 10) may stay hung after the VM: vendor-reset is not loaded; the VM's "
            "profile accepts the risk") in plan.notes
    before = h.snapshot()
    assert h.hook("win11", "prepare", "begin", XML) == (0, "")
    assert h.read(RESET_FILE) == "bus"
    assert h.hook("win11", "release", "end", XML) == (0, "")
    assert_same_tree(before, h.snapshot())


def test_profile_refusing_or_unset_keeps_the_refusal(tmp_path):
    h = _polaris(tmp_path / "host", vendor_reset=None)
    path = h.root / "etc/janus-hooks/vms/win11.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('mode = "single-gpu"\nreset_risk = "refuse"\n')
    assert h.hook("win11", "prepare", "begin", XML) == (1, REFUSAL)


def test_profile_with_a_misspelt_risk_is_refused_naming_file_and_key(tmp_path):
    h = _polaris(tmp_path / "host", vendor_reset=None)
    path = h.root / "etc/janus-hooks/vms/win11.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('reset_risk = "yes"\n')
    code, err = h.hook("win11", "prepare", "begin", XML)
    assert (code, err) == (1, f"janus-hooks: VM 'win11': {path}: reset_risk: 'yes' is not one of refuse, accept")


def test_passthrough_second_gpu_without_vendor_reset_starts_with_a_note(fake):
    h = fake(hosts.amd_dgpu_with_igpu, dgpu="0x67df")
    xml = domain_xml(hostdevs=("0000:03:00.0", "0000:03:00.1"), mode="passthrough")
    plan = h.janus().plan(parse_domain(xml))
    assert plan.refusal is None and "reset-method" not in [a.kind for a in plan.actions]
    assert "0000:03:00.0 (Polaris 10) may stay hung after the VM: vendor-reset is not loaded" in plan.notes
    before = h.snapshot()
    assert h.hook("win11", "prepare", "begin", xml) == (0, "")
    assert h.hook("win11", "release", "end", xml) == (0, "")
    assert diff(before, h.snapshot()) == []


def test_already_device_specific_is_left_as_it_is(tmp_path):
    # vendor-reset's own udev rule sets it when the card appears.
    h = _polaris(tmp_path / "host", reset="device_specific")
    plan = h.janus().plan(parse_domain(XML))
    assert "reset-method" not in [a.kind for a in plan.actions]
    assert f"{hosts.POLARIS_GPU} (Polaris 10): reset method is device_specific already (vendor-reset)" in plan.notes


def test_kernel_without_reset_method_relies_on_vendor_reset_as_it_is(tmp_path):
    h = _polaris(tmp_path / "host", reset=None)
    plan = h.janus().plan(parse_domain(XML))
    assert plan.refusal is None and "reset-method" not in [a.kind for a in plan.actions]
    assert f"{hosts.POLARIS_GPU} (Polaris 10): reset by vendor-reset (this kernel has no reset_method)" in plan.notes


def test_kernel_refusing_device_specific_fails_the_start_and_rolls_back(tmp_path):
    # vendor-reset loaded but not knowing this card: the kernel's probe of device_specific fails (EINVAL).
    h = _polaris(tmp_path / "host", vendor_reset=None)
    (h.root / "sys/module/vendor_reset/holders").mkdir(parents=True)
    (h.root / "sys/module/vendor_reset/refcnt").write_text("0\n")
    before = h.snapshot()
    code, err = h.hook("win11", "prepare", "begin", XML)
    assert code == 1 and "\n" not in err
    assert err.startswith(f"janus-hooks: VM 'win11': set the reset method of {hosts.POLARIS_GPU} to device_specific: "
                          f"writing 'device_specific' to {h.root / RESET_FILE} failed: Invalid argument")
    assert_same_tree(before, h.snapshot())
    assert h.journal_vms() == []
