"""``janus-hooks vm create`` against the real libvirtd (``--virt-type qemu``): every variant validated and
defined, the cpu-only guest started into OVMF's boot manager, a passthrough guest's start reaching the janus
hook, refusals and a failure part-way leaving nothing behind.

Storage is a test pool in a temporary directory and a loop device on a sparse file, both removed at the end;
GPUs come from fake host trees (this machine has none)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import libvirt
import pytest

from janus_hooks.domain import parse_domain
from janus_hooks.host import Host
from janus_hooks.install import Identity, render_shim
from janus_hooks.resources import data_file
from janus_hooks.vm import apply as vmapply
from janus_hooks.vm.build import build_domain
from janus_hooks.vm.request import VmRequest, resolve
from janus_hooks.vm.values import VmError
from tests.libvirt.animator import KernelAnimator
from tests.libvirt.conftest import PREFIX, QEMU_D, Libvirt, remove_domain, run, wait_for, write_executable
from tests.libvirt.test_gpu_fake_root import AUDIO, DGPU, _amd_desktop
from tests.vm.conftest import vm_facts
from tests.vm.variants import SHARED_VARIANTS, VARIANTS, hosts, plan_of, xml_of

pytestmark = pytest.mark.libvirt

POOL = PREFIX + "pool"
CLI = str(Path(sys.executable).with_name("janus-hooks"))
CLI_TIMEOUT = 120.0
BOOT_TIMEOUT = 240.0  # OVMF under TCG on two shared cores: about 15-20 s when idle
IMAGES = Path("/var/lib/libvirt/images")
CONSOLE_LOG = "/var/log/libvirt/qemu/{name}-console.log"


@pytest.fixture
def workdir() -> Iterator[Path]:
    """Media and pool where QEMU (user libvirt-qemu) can reach them: pytest's temporary directories are
    private to root. Below libvirt's own images directory, removed at the end."""
    path = IMAGES / f"{PREFIX}{os.getpid()}"
    path.mkdir(mode=0o711, parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
def pool(libvirtd: Libvirt, workdir: Path) -> Iterator[Path]:
    """A directory storage pool of its own (the machine's "default" pool is left alone)."""
    path = workdir / "pool"
    path.mkdir(mode=0o711)
    conn = libvirtd.conn
    with contextlib.suppress(libvirt.libvirtError):
        _remove_pool(conn.storagePoolLookupByName(POOL))
    p = conn.storagePoolCreateXML(f"<pool type='dir'><name>{POOL}</name><target><path>{path}</path></target>"
                                  "</pool>", 0)
    try:
        yield path
    finally:
        _remove_pool(p)


def _remove_pool(p) -> None:
    p.refresh(0)
    for name in p.listVolumes():
        p.storageVolLookupByName(name).delete(0)
    if p.isActive():
        p.destroy()
    with contextlib.suppress(libvirt.libvirtError):
        p.undefine()


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    """A 64 MiB loop device on a sparse file: block storage that is no real disk."""
    backing = tmp_path / "disk.img"
    with backing.open("wb") as fh:
        fh.truncate(64 * 1024**2)
    device = run(["losetup", "--find", "--show", str(backing)], 30).stdout.strip()
    try:
        yield device
    finally:
        run(["losetup", "-d", device], 30, check=False)


@pytest.fixture
def media(workdir: Path) -> str:
    iso = workdir / "win.iso"
    iso.write_bytes(b"\0" * 1024**2)
    iso.chmod(0o644)
    return str(iso)


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run([CLI, "vm", *args], CLI_TIMEOUT, check=check)


def _volumes(conn) -> list[str]:
    p = conn.storagePoolLookupByName(POOL)
    p.refresh(0)
    return sorted(p.listVolumes())


def test_every_variant_validates_and_is_defined(libvirtd, loop_device, media, tmp_path):
    roots = hosts(tmp_path / "hosts", block=os.path.basename(loop_device))
    conn = libvirtd.conn
    failures, defined = [], []
    variants = VARIANTS + SHARED_VARIANTS
    assert len(VARIANTS) == 32 and len({v.slug for v in variants}) == 32 + 4
    for variant in variants:
        name = f"{PREFIX}v-{variant.slug}"
        plan = plan_of(variant, roots[variant.host], name, media, loop_device)
        xml = xml_of(plan, str(tmp_path / "pool"))
        path = tmp_path / f"{variant.slug}.xml"
        path.write_text(xml)
        validated = run(["virt-xml-validate", str(path), "domain"], 60, check=False)
        if validated.returncode != 0:
            failures.append(f"{variant.slug}: {validated.stdout}{validated.stderr}")
            continue
        try:
            dom = conn.defineXML(xml)
            spec = parse_domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))  # as libvirtd keeps it
            shown = (spec.name, spec.hugepages is not None, spec.mode, [h.address for h in spec.hostdevs],
                     [d.uuid or d.vfs for d in spec.shared])
            wanted = (name, variant.hugepages, None if variant.mode == "cpu-only" or variant.sharing == "virgl"
                      else variant.mode, list(plan.gpu_functions) or ([plan.shared.vf_address] if plan.shared and
                                                                       plan.shared.vf_address else []),
                      [plan.shared.mdev_uuid or 1] if plan.shared and plan.shared.kind != "virgl" else [])
            if shown != wanted:
                failures.append(f"{variant.slug}: libvirtd keeps {shown}, expected {wanted}")
            defined.append(variant.slug)
        except libvirt.libvirtError as err:
            failures.append(f"{variant.slug}: define: {err}")
        finally:
            failures += remove_domain(libvirtd, name)
    assert not failures, "\n".join(failures)
    assert len(defined) == 32 + 4


def test_cpu_only_guest_created_started_into_ovmf_and_deleted(libvirtd, pool, loop_device, media, tmp_path):
    name = PREFIX + "vm-cpu"
    password = tmp_path / "password"
    password.write_text("s3cret <&>\n")
    # Windows 11: the TPM 2.0 is Debian's swtpm, started by libvirtd with the guest. 4 GiB is Windows 11's
    # minimum; QEMU only touches what OVMF uses of it.
    created = _cli("create", name, "--mode", "cpu-only", "--iso", media, "--os", "win11", "--memory", "4GiB",
                   "--vcpus", "1", "--storage", "block", "--disk", loop_device, "--unattend-user", "alice",
                   "--unattend-password-file", str(password), "--pool", POOL, "--network", "user",
                   "--virt-type", "qemu", "--no-guided", "--apply", "--yes")
    iso = pool / f"{name}-unattend.iso"
    assert f"Created volume {iso}." in created.stdout and f"Created VM {name}." in created.stdout
    assert "this ISO holds the password in clear text" in created.stdout
    assert stat.S_IMODE(iso.stat().st_mode) == 0o600
    assert b"s3cret &lt;&amp;&gt;" in _file_in_iso(iso, "/Autounattend.xml")
    dom = libvirtd.conn.lookupByName(name)
    xml = dom.XMLDesc(0)
    assert f"<source dev='{loop_device}'/>" in xml and "secure-boot" in xml and "<tpm model='tpm-crb'>" in xml

    console = Path(CONSOLE_LOG.format(name=name))
    console.unlink(missing_ok=True)
    qemu_log = Path(f"/var/log/libvirt/qemu/{name}.log")
    qemu_log.unlink(missing_ok=True)
    try:
        dom.create()
        # libvirtd chose Debian's Secure Boot build of OVMF and gave QEMU the TPM of a running swtpm.
        command = _text(qemu_log)
        assert "/usr/share/OVMF/OVMF_CODE_4M.ms.fd" in command and "tpm-crb" in command, command
        assert re.search(r"chardev[= ]socket,id=chrtpm,path=\S*swtpm", command), command
        # OVMF finds nothing to boot (an empty ISO, a blank disk) and offers its boot manager on the console.
        wait_for(lambda: "Boot Manager" in _text(console), BOOT_TIMEOUT, f"OVMF's boot manager on {console}")
        log = _text(console)
        assert "BdsDxe" in log and "Security Violation" in log, log  # Secure Boot refused the unsigned shell
    finally:
        if dom.isActive():
            dom.destroy()
    listed = _cli("list")
    assert re.search(rf"{re.escape(name)}\s+off\s+cpu-only\s+-", listed.stdout), listed.stdout
    try:
        dry = _cli("delete", name, check=False)
        assert dry.returncode == 1 and f"delete volume {iso}" in dry.stdout
        assert name in libvirtd.conn.listDefinedDomains()
        _cli("delete", name, "--yes")
        assert name not in libvirtd.conn.listDefinedDomains()
        assert not iso.exists()
    finally:
        remove_domain(libvirtd, name)


def test_passthrough_guest_start_reaches_the_janus_hook(libvirtd, janus, pool, media, tmp_path):
    if janus.installed:  # the real install would act on this managed VM too (and refuse the absent GPU)
        janus.uninstall()
    root = _amd_desktop(tmp_path / "host")
    vm_facts(root)
    root.chmod(0o755)
    name = PREFIX + "vm-gpu"
    _cli("create", name, "--root", str(root), "--mode", "passthrough", "--gpu", DGPU, "--iso", media, "--os", "win10",
         "--memory", "512MiB", "--vcpus", "1", "--disk-size", "1GiB", "--pool", POOL, "--network", "user",
         "--virt-type", "qemu", "--no-guided", "--apply", "--yes")
    dom = libvirtd.conn.lookupByName(name)
    assert f"{DGPU[5:7]}" in dom.XMLDesc(0) and "managed='no'" in dom.XMLDesc(0)
    # The dry run of the hook, read from libvirtd's definition: what the hook's log must show it did.
    planned = json.loads(run([CLI, "plan", name, "--root", str(root), "--json"], CLI_TIMEOUT).stdout)
    steps = [a["description"] for a in planned["actions"]]
    assert planned["refusal"] is None and f"bind {DGPU} to vfio-pci" in steps and f"bind {AUDIO} to vfio-pci" in steps
    # The hook as `janus-hooks install` renders it, acting on the fake tree (the only janus hook here).
    shim = QEMU_D / "janus-hooks-fakeroot"
    write_executable(shim, render_shim(data_file("hooks", "qemu").read_text(), Identity.current(root)))
    try:
        libvirtd.rescan_hooks()
        with KernelAnimator(root) as kernel, pytest.raises(libvirt.libvirtError) as err:
            dom.create()
    finally:
        shim.unlink()
        libvirtd.rescan_hooks()
        remove_domain(libvirtd, name)
    assert "janus-hooks" not in str(err.value), err.value  # libvirt gave up on the device, not the hook
    assert not kernel.errors, kernel.errors
    log = (root / "var/log/janus-hooks/hook.log").read_text()
    done = re.findall(rf"janus_hooks.engine: VM {re.escape(name)}: (?!reverted )(.+) \([\d.]+ ms\)$", log, re.MULTILINE)
    undone = re.findall(rf"janus_hooks.engine: VM {re.escape(name)}: reverted (.+) \([\d.]+ ms\)$", log, re.MULTILINE)
    assert (done, undone) == (steps, steps[::-1]), log
    assert re.search(rf"VM {name}: prepared {len(steps)} step", log), log
    assert re.search(rf"VM {name}: released, {len(steps)} change", log), log
    for address in (DGPU, AUDIO):  # every function of the card went to vfio-pci, and came back
        assert (f"sys/bus/pci/devices/{address}/driver_override", "vfio-pci") in kernel.handled, kernel.handled
        assert (f"sys/bus/pci/devices/{address}/driver_override", "") in kernel.handled, kernel.handled
    assert not list((root / "var/lib/janus-hooks/journal").glob("*"))


def _everything(conn, *dirs: Path) -> tuple:
    """What a run could make: domains, pools, every active pool's volumes, the files in ``dirs``."""
    pools = sorted(conn.listAllStoragePools(0), key=lambda p: p.name())
    for p in pools:
        if p.isActive():
            p.refresh(0)
    return (sorted(d.name() for d in conn.listAllDomains(0)), [p.name() for p in pools],
            [(p.name(), sorted(p.listVolumes())) for p in pools if p.isActive()],
            [sorted(os.listdir(d)) if d.is_dir() else None for d in dirs])


def test_existing_name_and_hostile_values_create_nothing(libvirtd, pool, media, tmp_path):
    name = PREFIX + "vm-twice"
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    # What every refused run asks for: a disk volume, the unattend ISO and the VM, in the suite's pool.
    base = ["--mode", "cpu-only", "--iso", media, "--os", "win10", "--memory", "512MiB", "--disk-size", "1GiB",
            "--unattend-user", "alice", "--unattend-password-file", str(password), "--pool", POOL,
            "--network", "user", "--virt-type", "qemu", "--no-guided", "--apply", "--yes"]
    made = _cli("create", name, *base)
    assert f"Created volume {pool / name}.qcow2." in made.stdout and f"Created volume {pool / name}-unattend.iso." \
        in made.stdout, made.stdout  # so the same flags would have made something each time below
    try:
        before = _everything(libvirtd.conn, pool, IMAGES)
        assert f"{name}-unattend.iso" in before[3][0]
        for args, message in (
            ([name, *base], f"a VM named '{name}' already exists at qemu:///system; choose another name"),
            ([PREFIX + "../x", *base], f"VM name '{PREFIX}../x' is refused"),
            ([PREFIX + "it's", *base], f"VM name \"{PREFIX}it's\" is refused"),
            ([PREFIX + 'say"hi', *base], f"VM name '{PREFIX}say\"hi' is refused"),
            ([PREFIX + "x", *base, "--iso", "/nonexistent.iso"], "installation ISO /nonexistent.iso does not exist"),
            ([PREFIX + "x", *base, "--storage", "block", "--disk", _root_disk()],
             f"{_root_disk()} holds the host's root filesystem"),
            ([PREFIX + "x", *base, "--memory", "64TiB"], "64 TiB of RAM is more than this host has"),
        ):
            proc = _cli("create", *args, check=False)
            assert proc.returncode == 1 and proc.stderr.startswith(f"janus-hooks: {message}"), (args, proc.stderr)
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
            assert "Created" not in proc.stdout, proc.stdout
            assert _everything(libvirtd.conn, pool, IMAGES) == before, args
    finally:
        _cli("delete", name, "--storage", "--yes")


def test_a_failure_part_way_removes_what_this_run_created(libvirtd, pool, media, tmp_path):
    # Between the check and the define another VM took the name: libvirtd refuses the definition after the
    # disk volume and the unattend ISO exist; both must go, the other VM must stay.
    name = PREFIX + "vm-race"
    root = vm_facts(tmp_path / "host")
    (root / "proc/meminfo").write_text("MemTotal: 8000000 kB\n")
    request = VmRequest(name=name, mode="cpu-only", iso=media, os="win10", memory=512 * 1024**2, vcpus=1,
                        pool=POOL, disk_size=1024**3, unattend_user="alice", unattend_password="pw",
                        virt_type="qemu", network="user")
    plan = resolve(request, Host(root))
    conn = libvirtd.conn
    target = vmapply.inspect(conn, plan)
    place = vmapply.placement(plan, target)
    other = build_domain(replace(plan, request=replace(request, unattend_user=None)), place)
    conn.defineXML(other)
    try:
        before = _volumes(conn)
        with pytest.raises(VmError, match=rf"creating VM '{name}' failed: .*already exists.*; removed what this "
                                          "run created"):
            vmapply.create(conn, plan, target, place, build_domain(plan, place), b"\0" * 2048)
        assert _volumes(conn) == before
        assert name in conn.listDefinedDomains()
    finally:
        remove_domain(libvirtd, name)


def _root_disk() -> str:
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            if fields[4] == "/":
                source = fields[fields.index("-") + 2]
                return source if source.startswith("/dev/") else "/dev/root"
    return "/dev/root"


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _file_in_iso(path: Path, name: str) -> bytes:
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, joliet_path=name)
        return out.getvalue()
    finally:
        iso.close()
