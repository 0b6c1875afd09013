"""shared-vram: the hook makes the VM's mediated device or SR-IOV virtual function on prepare and removes it
on release, journaled like every change; the host keeps its GPU. Domains come from ``vm create``'s own
builder, the kernel's part (mdev create/remove, sriov_numvfs) from the fake kernel."""

from __future__ import annotations

from pathlib import Path

from janus_hooks.host import Host
from janus_hooks.vm.build import Placement, build_domain
from janus_hooks.vm.request import VmRequest, resolve
from tests.core.helpers import assert_same_tree
from tests.fake.hosts import amd_dgpu_with_igpu
from tests.fake.world import write
from tests.vm.conftest import vm_facts, with_mdev, with_vfs
from tests.vm.variants import IGPU

MDEV_TYPE = "i915-GVTg_V5_4"
TYPE_DIR = f"sys/bus/pci/devices/{IGPU}/mdev_supported_types/{MDEV_TYPE}"
NUMVFS = f"sys/bus/pci/devices/{IGPU}/sriov_numvfs"


def _mdev_host(root: Path) -> Path:
    amd_dgpu_with_igpu(root)
    vm_facts(root)
    with_mdev(root, IGPU, available=1)
    write(root / "media/win.iso", "")
    return root


def _vf_host(root: Path, enabled: int = 0) -> Path:
    amd_dgpu_with_igpu(root)
    vm_facts(root)
    with_vfs(root, IGPU)
    write(root / NUMVFS, f"{enabled}\n")
    write(root / "media/win.iso", "")
    return root


def _domain(root: Path, name: str) -> str:
    request = VmRequest(name=name, mode="shared-vram", iso=str(root / "media/win.iso"), memory=4 * 1024**3,
                        vcpus=2, virt_type="qemu", network="user")
    return build_domain(resolve(request, Host(root)), Placement(f"/var/lib/libvirt/images/{name}.qcow2"))


def test_mdev_made_on_prepare_and_removed_on_release(fake):
    h = fake(_mdev_host)
    xml = _domain(h.root, "shared")
    uuid = xml.split('uuid="')[1].split('"')[0]
    before = h.snapshot()
    assert h.hook("shared", "prepare", "begin", xml) == (0, "")
    assert (h.root / "sys/bus/mdev/devices" / uuid).is_dir()
    assert h.read(f"{TYPE_DIR}/available_instances") == "0"
    assert h.read(f"sys/bus/pci/devices/{IGPU}/driver_override") in ("", "(null)")  # the host keeps its GPU
    assert h.journal_vms() == ["shared"]
    assert h.hook("shared", "release", "end", xml) == (0, "")
    assert_same_tree(before, h.snapshot())
    assert h.journal_vms() == []


def test_no_instance_left_refuses_the_start_and_changes_nothing(fake):
    h = fake(_mdev_host)
    first, second = _domain(h.root, "first"), _domain(h.root, "second")
    assert h.hook("first", "prepare", "begin", first) == (0, "")
    before = h.snapshot()
    code, err = h.hook("second", "prepare", "begin", second)
    assert code == 1
    assert err.startswith("janus-hooks: VM 'second': create mediated device ") and "No space left" in err, err
    assert_same_tree(before, h.snapshot())
    assert h.journal_vms() == ["first"]


def test_virtual_function_enabled_on_prepare_and_disabled_on_release(fake):
    h = fake(_vf_host)
    xml = _domain(h.root, "vf")
    assert "managed=\"yes\"" in xml and "0x0c" in xml
    before = h.snapshot()
    assert h.hook("vf", "prepare", "begin", xml) == (0, "")
    assert h.read(NUMVFS) == "1"
    assert h.hook("vf", "release", "end", xml) == (0, "")
    assert_same_tree(before, h.snapshot())


def test_virtual_functions_someone_else_enabled_are_left_alone(fake):
    h = fake(_vf_host, enabled=2)
    xml = _domain(h.root, "vf")
    assert h.hook("vf", "prepare", "begin", xml) == (0, "")
    assert h.hook("vf", "release", "end", xml) == (0, "")
    assert h.read(NUMVFS) == "2"


def test_plan_names_the_step(fake):
    from janus_hooks.domain import parse_domain
    from janus_hooks.plan import make_plan
    from janus_hooks.snapshot import HostSnapshot

    h = fake(_mdev_host)
    spec = parse_domain(_domain(h.root, "shared"))
    plan = make_plan(spec, spec.mode, h.janus().config, HostSnapshot.read(Host(h.root)))
    assert plan.refusal is None
    assert [a.describe() for a in plan.actions] == [
        f"create mediated device {spec.shared[0].uuid} ({MDEV_TYPE}) on {IGPU}"]
