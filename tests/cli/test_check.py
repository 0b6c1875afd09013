"""check, devices and plan on host trees that mirror real desktops."""

from __future__ import annotations

import json

from tests.cli.conftest import FakeConn
from tests.conftest import domain_xml
from tests.fake import desktops

NVIDIA = desktops.NVIDIA_VGA


def _gpu(report: dict, address: str) -> dict:
    return next(g for g in report["gpus"] if g["address"] == address)


def _check(report: dict, name: str) -> dict:
    return next(c for c in report["checks"] if c["name"] == name)


# --- check ---------------------------------------------------------------------------------------------------
def test_check_on_a_single_nvidia_desktop_after_install(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    assert c("install", "--yes").exit_code == 0
    result = c("check")
    assert result.exit_code == 0, result.output
    assert "The host is ready." in result.output
    assert "ok    iommu      4 IOMMU groups (intel_iommu=on iommu=pt)" in result.output
    assert f"  {NVIDIA} [10de:2484] VGA controller, nvidia, IOMMU group 1, boot VGA, reset: flr bus" in result.output
    assert f"functions: {NVIDIA}, {desktops.NVIDIA_AUDIO}" in result.output
    assert (f"verdict:   ready for single-GPU; not for passthrough: GPU {NVIDIA} drives the host display "
            "(pid 1200 (Xorg) via /dev/dri/card0); use mode single-gpu for it") in result.output

    report = json.loads(c("check", "--json").output)
    assert report["ready"] is True
    gpu = _gpu(report, NVIDIA)
    assert gpu["ready"] == {"single-gpu": True, "passthrough": False}
    assert gpu["functions"] == list(desktops.NVIDIA_CARD)
    assert gpu["refusals"]["single-gpu"] is None
    assert "drives the host display" in gpu["refusals"]["passthrough"]
    assert {c["name"]: c["status"] for c in report["checks"]} == {
        "cpu": "ok", "kvm": "ok", "iommu": "ok", "vfio": "ok", "hugepages": "ok", "hugetlbfs": "ok",
        "libvirt": "ok", "hook": "ok", "agent": "warn"}


def test_check_says_the_hook_is_missing_before_install(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    result = c("check")
    assert result.exit_code == 1
    assert "FAIL  hook" in result.output and "run 'janus-hooks install'" in result.output
    assert "The host is not ready: 1 failed check(s)." in result.output


def test_check_a_gpu_sharing_its_iommu_group_with_a_usb_controller(make_cli):
    c = make_cli(desktops.igpu_and_dgpu_sharing_usb)
    assert c("install", "--yes").exit_code == 0
    report = json.loads(c("check", "--json").output)
    dgpu = _gpu(report, NVIDIA)
    reason = (f"IOMMU group 1 also holds {desktops.USB_CONTROLLER} (USB controller, xhci_hcd), "
              "which would have to go to the VM too")
    assert dgpu["refusals"] == {"single-gpu": reason, "passthrough": reason}
    assert dgpu["summary"] == f"not ready: {reason}"
    igpu = _gpu(report, desktops.INTEL_IGPU)
    assert igpu["ready"] == {"single-gpu": True, "passthrough": False}
    assert "Intel graphics is only unbound, never unloaded" in igpu["notes"]
    # The iGPU can still go to a VM in single-GPU mode: the host counts as ready.
    assert report["ready"] is True


def test_check_without_an_iommu_names_the_kernel_option(make_cli):
    c = make_cli(desktops.no_iommu_desktop)
    assert c("install", "--yes").exit_code == 0
    result = c("check")
    assert result.exit_code == 1
    assert "FAIL  iommu      no IOMMU groups: add intel_iommu=on (Intel) or amd_iommu=on (AMD)" in result.output
    report = json.loads(c("check", "--json").output)
    assert report["ready"] is False
    assert "has no IOMMU group" in _gpu(report, NVIDIA)["refusals"]["single-gpu"]


def test_check_reads_the_libvirt_version_on_the_running_system(make_cli):
    c = make_cli(desktops.nvidia_desktop, live=True)
    report = json.loads(c("check", "--json").output)
    assert _check(report, "libvirt") == {"name": "libvirt", "status": "ok",
                                         "detail": "libvirt 9.0.0, libvirtd running (pid 777)"}
    old = c.root / "usr/sbin/libvirtd"
    old.write_text("#!/bin/sh\necho 'libvirtd (libvirt) 6.0.0'\n")
    report = json.loads(c("check", "--json").output)
    assert _check(report, "libvirt")["status"] == "fail"
    assert "6.0.0 is too old: qemu.d hooks need 6.5" in _check(report, "libvirt")["detail"]


def test_check_with_a_broken_config_fails_naming_the_file(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    (c.root / "etc/janus-hooks/janus.toml").write_text("log_level = [\n")
    report = json.loads(c("check", "--json").output)
    config = _check(report, "config")
    assert config["status"] == "fail" and "etc/janus-hooks/janus.toml" in config["detail"]


def test_check_a_gpu_in_use_by_a_running_vm(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    assert c.fake.hook("win11", "prepare", "begin", domain_xml(hostdevs=desktops.NVIDIA_CARD))[0] == 0
    gpu = _gpu(json.loads(c("check", "--json").output), NVIDIA)
    assert gpu["refusals"]["single-gpu"] == f"PCI device {NVIDIA} is in use by VM 'win11' (its journal is open)"


# --- devices ------------------------------------------------------------------------------------------------
def test_devices_lists_functions_groups_drivers_and_users(make_cli):
    c = make_cli(desktops.igpu_and_dgpu_sharing_usb)
    result = c("devices")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "GPU 0000:01:00 [10de:2484] reset: flr bus" in lines
    assert "    0000:00:14.0  USB controller         xhci_hcd         OTHER DEVICE" in lines
    assert "    0000:00:01.0  PCI bridge             pcieport         bridge, stays" in lines
    assert "  used by pid 1300 (Xorg, unit sddm.service) via /dev/dri/card0" in lines

    found = json.loads(c("devices", "--json").output)["gpus"]
    assert [g["address"] for g in found] == [desktops.INTEL_IGPU, NVIDIA]
    dgpu = found[1]
    assert [f["address"] for f in dgpu["functions"]] == list(desktops.NVIDIA_CARD)
    assert {m["address"]: (m["same_card"], m["bridge"]) for m in dgpu["iommu_group_members"]} == {
        "0000:00:01.0": (False, True), desktops.USB_CONTROLLER: (False, False),
        NVIDIA: (True, False), desktops.NVIDIA_AUDIO: (True, False)}
    assert found[0]["used_by"] == [{"pid": 1300, "command": "Xorg", "node": "/dev/dri/card0",
                                    "unit": "sddm.service"}]


def test_devices_names_the_vm_holding_a_gpu(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    assert c.fake.hook("win11", "prepare", "begin", domain_xml(hostdevs=desktops.NVIDIA_CARD))[0] == 0
    result = c("devices")
    assert "  0000:01:00.0  VGA controller         vfio-pci" in result.output
    assert "  held by VM: win11" in result.output
    gpu = json.loads(c("devices", "--json").output)["gpus"][0]
    assert gpu["held_by_vm"] == "win11"
    assert {f["held_by_vm"] for f in gpu["functions"]} == {"win11"}


# --- plan ------------------------------------------------------------------------------------------------------
def test_plan_of_a_single_gpu_vm_lists_every_change(make_cli, tmp_path):
    c = make_cli(desktops.nvidia_desktop)
    xml = tmp_path / "win11.xml"
    xml.write_text(domain_xml(hostdevs=desktops.NVIDIA_CARD, hugepages=True))
    before = c.fake.snapshot()
    result = c("plan", "win11", "--xml", str(xml))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "VM 'win11' (single-gpu): 14 change(s) on prepare, undone on release"
    assert lines[1] == "  1. add 2048 x 2048 kB hugepages on the host (4096 MiB)"
    assert "  2. stop gdm3.service" in lines
    assert "  14. bind 0000:01:00.1 to vfio-pci" in lines
    assert c.fake.snapshot() == before  # a dry run

    data = json.loads(c("plan", "win11", "--xml", str(xml), "--json").output)
    assert data["refusal"] is None and data["managed"] is True
    assert [a["kind"] for a in data["actions"]][-2:] == ["bind-vfio", "bind-vfio"]


def test_plan_exits_non_zero_when_the_start_would_be_refused(make_cli, tmp_path):
    c = make_cli(desktops.nvidia_desktop)
    xml = tmp_path / "win11.xml"
    xml.write_text(domain_xml(hostdevs=desktops.NVIDIA_CARD, mode="passthrough"))
    result = c("plan", "win11", "--xml", str(xml))
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"VM 'win11' (passthrough): the start would be refused: GPU {NVIDIA} drives "
        "the host display (pid 1200 (Xorg) via /dev/dri/card0); use mode single-gpu for it")
    assert json.loads(c("plan", "win11", "--xml", str(xml), "--json").output)["refusal"].startswith("GPU ")


def test_plan_refuses_a_gpu_whose_group_holds_a_usb_controller(make_cli, tmp_path):
    c = make_cli(desktops.igpu_and_dgpu_sharing_usb)
    xml = tmp_path / "win11.xml"
    xml.write_text(domain_xml(hostdevs=desktops.NVIDIA_CARD, mode="passthrough"))
    result = c("plan", "win11", "--xml", str(xml))
    assert result.exit_code == 1
    assert f"IOMMU group 1 of {NVIDIA} also holds {desktops.USB_CONTROLLER}" in result.output


def test_plan_of_an_unmanaged_vm_changes_nothing(make_cli, tmp_path):
    c = make_cli(desktops.nvidia_desktop)
    xml = tmp_path / "plain.xml"
    xml.write_text(domain_xml("plain", mode=None))
    result = c("plan", "plain", "--xml", str(xml))
    assert result.exit_code == 0
    assert "is not managed by janus-hooks: nothing changes when it starts" in result.output


def test_plan_reads_the_live_definition_from_libvirt(make_cli):
    conn = FakeConn({"win11": domain_xml(hostdevs=desktops.NVIDIA_CARD)})
    c = make_cli(desktops.nvidia_desktop, conn=conn)
    result = c("plan", "win11")
    assert result.exit_code == 0, result.output
    assert "13 change(s) on prepare" in result.output
    assert conn.closed == 1


def test_plan_without_libvirt_says_so_in_one_line(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    result = c("plan", "win11")
    assert result.exit_code == 1
    assert result.stderr.startswith("janus-hooks: libvirt at qemu:///system: Failed to connect socket")
    assert result.stderr.count("\n") == 1


def test_plan_of_a_file_naming_another_vm(make_cli, tmp_path):
    c = make_cli(desktops.nvidia_desktop)
    xml = tmp_path / "x.xml"
    xml.write_text(domain_xml("other"))
    result = c("plan", "win11", "--xml", str(xml))
    assert result.exit_code == 1
    assert "defines VM 'other', not 'win11'" in result.stderr


def test_plan_of_broken_xml_is_one_line(make_cli, tmp_path):
    c = make_cli(desktops.nvidia_desktop)
    xml = tmp_path / "x.xml"
    xml.write_text("<domain><name>win11</name>")
    result = c("plan", "win11", "--xml", str(xml))
    assert result.exit_code == 1
    assert result.stderr.startswith("janus-hooks: domain XML cannot be parsed")


def test_devices_names_who_holds_the_gpus_audio_function(make_cli):
    from tests.fake import hosts

    c = make_cli(hosts.systemd_desktop)
    found = json.loads(c("devices", "--json").output)["gpus"]
    users = {(u["pid"], u["command"], u["node"]) for u in found[0]["used_by"]}
    assert (1211, "wireplumber", "/dev/snd/controlC0") in users
    assert (1150, "weston", "/dev/dri/card0") in users
