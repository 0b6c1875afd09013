"""Every variant of ``vm create`` is a valid libvirt domain with the devices its profile promises."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from xml.etree import ElementTree

import pytest

from janus_hooks.domain import PROFILE_NS, parse_domain
from janus_hooks.host import Host
from janus_hooks.vm.request import resolve
from tests.vm.variants import DGPU, IGPU, NVIDIA, SHARED_VARIANTS, VARIANTS, hosts, plan_of, xml_of

POOL = "/var/lib/libvirt/images"


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return hosts(tmp_path_factory.mktemp("vmhosts"))


@pytest.fixture(scope="module")
def iso(tmp_path_factory):
    path = tmp_path_factory.mktemp("media") / "win11.iso"
    path.write_bytes(b"\0" * 2048)
    return str(path)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.slug)
def test_variant_has_what_its_profile_promises(variant, roots, iso):
    plan = plan_of(variant, roots[variant.host], "win-" + variant.slug, iso, "/dev/sdb")
    xml = xml_of(plan, POOL)
    spec = parse_domain(xml)
    root = ElementTree.fromstring(xml)
    hostdevs = [h.address for h in spec.hostdevs]
    expected = {"passthrough": [DGPU, "0000:03:00.1"], "single-gpu": [NVIDIA[:-1] + f for f in "0123"]}
    assert hostdevs == expected.get(variant.mode, [])
    assert spec.mode == (variant.mode if variant.mode != "cpu-only" else None)
    assert (spec.hugepages is not None) == variant.hugepages
    disk = root.find("devices/disk[@device='disk']")
    assert disk.get("type") == variant.storage
    source = disk.find("source")
    assert (source.get("dev") if variant.storage == "block" else source.get("file")) == (
        "/dev/sdb" if variant.storage == "block" else f"{POOL}/win-{variant.slug}.qcow2")
    cdroms = [d.find("source").get("file") for d in root.findall("devices/disk[@device='cdrom']")]
    assert cdroms == [iso] + ([f"{POOL}/win-{variant.slug}-unattend.iso"] if variant.unattend else [])
    assert root.find("os/type").get("machine") == "q35" and root.find("os").get("firmware") == "efi"
    assert disk.find("target").get("bus") == "virtio" and root.find("devices/interface/model").get("type") == "virtio"
    assert root.find("os/firmware/feature[@name='secure-boot']").get("enabled") == "yes"
    assert root.find("devices/tpm/backend").get("version") == "2.0"
    stealth = root.find("features/kvm/hidden") is not None
    assert stealth == (variant.mode in ("passthrough", "single-gpu"))
    if variant.mode == "shared-vram":
        assert root.find("devices/hostdev[@type='mdev']/source/address").get("uuid")
        profile = root.find(f"metadata/{{{PROFILE_NS}}}profile")
        assert spec.mode == "shared-vram" and profile.find(f"{{{PROFILE_NS}}}mdev").get("parent") == IGPU
        assert spec.shared[0].uuid == root.find("devices/hostdev[@type='mdev']/source/address").get("uuid")
    if variant.mode == "cpu-only":
        assert root.find("devices/video/model").get("type") == "virtio"


@pytest.mark.skipif(shutil.which("virt-xml-validate") is None or shutil.which("xmllint") is None,
                    reason="virt-xml-validate (libvirt-clients) and xmllint (libxml2-utils) are not installed")
def test_every_variant_validates_against_libvirts_schema(roots, iso, tmp_path):
    failures, validated = [], 0
    assert len(VARIANTS) == 4 * 2 * 2 * 2 and len({v.slug for v in VARIANTS + SHARED_VARIANTS}) == 32 + 4
    for variant in VARIANTS + SHARED_VARIANTS:
        for virt_type in ("kvm", "qemu"):
            plan = plan_of(variant, roots[variant.host], "win-" + variant.slug, iso, "/dev/sdb", virt_type)
            path = tmp_path / f"{variant.slug}-{virt_type}.xml"
            path.write_text(xml_of(plan, POOL))
            proc = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True, text=True,
                                  timeout=60, check=False)
            if proc.returncode != 0:
                failures.append(f"{path.name}: {proc.stdout}{proc.stderr}")
            validated += "validates" in proc.stdout + proc.stderr
    assert not failures, "\n".join(failures)
    assert validated == 2 * (32 + 4)


@pytest.mark.parametrize("variant", SHARED_VARIANTS, ids=lambda v: v.slug)
def test_shared_vram_without_a_mediated_device(variant, roots, iso):
    xml = xml_of(plan_of(variant, roots[variant.host], "shared", iso, "/dev/sdb"), POOL)
    spec = parse_domain(xml)
    root = ElementTree.fromstring(xml)
    assert (spec.hugepages is not None) == variant.hugepages
    if variant.sharing == "vf":
        # VF 0 of the iGPU (sriov_offset 1): libvirt binds it (managed), janus-hooks enables it on prepare.
        hostdev = root.find("devices/hostdev[@type='pci']")
        assert hostdev.get("managed") == "yes"
        assert [h.address for h in spec.hostdevs] == ["0000:0c:00.1"]
        assert spec.mode == "shared-vram" and [(d.parent, d.vfs) for d in spec.shared] == [(IGPU, 1)]
        assert root.find("devices/video/model").get("type") == "none"
        assert root.find("devices/tpm") is not None
    else:
        # Linux: virtio-gpu with 3D on the host's GPU, nothing for janus-hooks to do at start (no profile).
        model = root.find("devices/video/model")
        assert (model.get("type"), model.find("acceleration").get("accel3d")) == ("virtio", "yes")
        assert root.find("devices/graphics/gl").get("enable") == "yes"
        assert spec.mode is None and not spec.hostdevs
        assert root.find("devices/tpm") is None and root.find("features/hyperv") is None
        assert root.find("clock").get("offset") == "utc"
        assert root.find("devices/disk[@device='cdrom']/source").get("file") == iso
        assert len(root.findall("devices/disk[@device='cdrom']")) == 1


def test_pinned_vcpus_and_no_stealth(roots, iso, tmp_path):
    plan = plan_of(VARIANTS[0], roots["passthrough"], "pinned", iso, "/dev/sdb", "kvm")
    request = replace(plan.request, vcpus=2, cpu_pin=(2, 3), stealth=False)
    xml = xml_of(resolve(request, Host(roots["passthrough"])), POOL)
    root = ElementTree.fromstring(xml)
    assert [(p.get("vcpu"), p.get("cpuset")) for p in root.findall("cputune/vcpupin")] == [("0", "2"), ("1", "3")]
    assert root.find("features/kvm") is None and root.find("cpu/feature") is None
    assert root.find("features/hyperv/vendor_id") is None and root.find("features/hyperv/relaxed") is not None
    if shutil.which("virt-xml-validate") and shutil.which("xmllint"):
        (tmp_path / "pinned.xml").write_text(xml)
        subprocess.run(["virt-xml-validate", str(tmp_path / "pinned.xml"), "domain"], check=True, timeout=60,
                       capture_output=True)
