"""``janus-hooks vm`` end to end against libvirt's own test driver (``test:///default``: real libvirt code,
in process, no daemon; the libvirt suite does the same through the real libvirtd), on fake host trees."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from xml.etree import ElementTree

import libvirt
import pytest
from click.testing import CliRunner

from janus_hooks.cli import Env, cli
from janus_hooks.domain import parse_domain
from tests.vm.conftest import with_mdev

TEST_URI = "test:///default"
POOL = "default-pool"  # the test driver's own pool


@pytest.fixture
def conn():
    """One connection held open for the test: the test driver keeps its state while one is open."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    c = libvirt.open(TEST_URI)
    try:
        yield c
    finally:
        c.close()


def run(root: Path, *args: str, interactive: bool = False, input: str | None = None):
    env = Env(connect=lambda uri, ro: libvirt.openReadOnly(uri) if ro else libvirt.open(uri),
              interactive=lambda: interactive, progress=lambda: False)
    argv = ["vm", *args]
    if args and args[0] == "create":
        argv += ["--root", str(root), "--connect", TEST_URI]
    elif args:
        argv += ["--connect", TEST_URI]
    return CliRunner().invoke(cli, argv, obj=env, input=input, catch_exceptions=False)


def _flags(vm_host, *extra: str) -> list[str]:
    return ["--mode", "passthrough", "--gpu", "03:00.0", "--iso", vm_host.iso, "--memory", "8GiB", "--vcpus", "4",
            "--virt-type", "qemu", "--network", "user", "--pool", POOL, *extra]


def _volumes(conn) -> list[str]:
    return sorted(conn.storagePoolLookupByName(POOL).listVolumes())


def test_dry_run_prints_the_definition_and_creates_nothing(two_gpus, conn):
    before = (conn.listDefinedDomains(), _volumes(conn))
    result = run(two_gpus.root, "create", "gamer", *_flags(two_gpus, "--hugepages"))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "VM gamer: win11, passthrough, 8 GiB RAM (hugepages), 4 vCPU(s)" in out
    assert "GPU:       0000:03:00.0, 0000:03:00.1 (janus-hooks mode passthrough)" in out
    assert "NVIDIA drivers since 465 no longer need hiding" in out
    assert "Nothing was created. Add --apply" in out
    spec = parse_domain(out[out.index("<domain"):out.index("</domain>") + len("</domain>")])
    assert spec.mode == "passthrough" and spec.hugepages is not None
    assert (conn.listDefinedDomains(), _volumes(conn)) == before


def test_apply_creates_the_volume_and_defines_then_list_and_delete(two_gpus, conn):
    result = run(two_gpus.root, "create", "gamer", *_flags(two_gpus, "--apply", "--yes", "--disk-size", "2GiB"))
    assert result.exit_code == 0, result.output
    assert "Created volume /default-pool/gamer.qcow2." in result.output
    assert "press Run (janus-hooks frees the GPU when it starts)" in result.output
    assert "gamer.qcow2" in _volumes(conn)
    assert conn.storageVolLookupByPath("/default-pool/gamer.qcow2").info()[1] == 2 * 1024**3
    spec = parse_domain(conn.lookupByName("gamer").XMLDesc(0))
    assert (spec.mode, [h.address for h in spec.hostdevs]) == ("passthrough", ["0000:03:00.0", "0000:03:00.1"])

    listed = run(two_gpus.root, "list")
    assert "gamer" in listed.output and "passthrough  0000:03:00.0, 0000:03:00.1" in listed.output

    again = run(two_gpus.root, "create", "gamer", *_flags(two_gpus, "--apply", "--yes"))
    assert again.exit_code == 1
    assert again.stderr.strip() == "janus-hooks: a VM named 'gamer' already exists at test:///default; choose " \
                                   "another name"

    kept = run(two_gpus.root, "delete", "gamer", "--yes")
    assert kept.exit_code == 0, kept.output
    assert "gamer" not in conn.listDefinedDomains() and "gamer.qcow2" in _volumes(conn)
    conn.storageVolLookupByPath("/default-pool/gamer.qcow2").delete(0)


def test_delete_with_storage_removes_the_volume(two_gpus, conn):
    assert run(two_gpus.root, "create", "gone", *_flags(two_gpus, "--apply", "--yes")).exit_code == 0
    dry = run(two_gpus.root, "delete", "gone", "--storage")
    assert dry.exit_code == 1 and "delete volume /default-pool/gone.qcow2" in dry.output
    assert "gone" in conn.listDefinedDomains()
    assert run(two_gpus.root, "delete", "gone", "--storage", "--yes").exit_code == 0
    assert "gone" not in conn.listDefinedDomains() and "gone.qcow2" not in _volumes(conn)


def test_delete_refuses_a_vm_it_did_not_make(two_gpus, conn):
    result = run(two_gpus.root, "delete", "test", "--yes")  # the test driver's own VM
    assert result.exit_code == 1
    assert "VM 'test' was not made by 'janus-hooks vm create'" in result.stderr


def test_a_failure_part_way_removes_what_this_run_created(two_gpus, conn, tmp_path):
    # The test driver cannot upload (virStorageVolUpload): the disk volume exists by then and must go.
    password = tmp_path / "pw"
    password.write_text("s3cret\n")
    before = (conn.listDefinedDomains(), _volumes(conn))
    result = run(two_gpus.root, "create", "halfway", *_flags(two_gpus, "--apply", "--yes", "--unattend-user", "alice",
                                                             "--unattend-password-file", str(password)))
    assert result.exit_code == 1
    assert result.stderr.strip() == ("janus-hooks: creating VM 'halfway' failed: this function is not supported by "
                                     "the connection driver: virStorageVolUpload; removed what this run created")
    assert (conn.listDefinedDomains(), _volumes(conn)) == before


def _everything(conn) -> tuple:
    """What a run could create: domains, pools, and the volumes of every pool (the unattend ISO is one)."""
    pools = sorted(conn.listAllStoragePools(0), key=lambda p: p.name())
    return (sorted(conn.listDefinedDomains()), [p.name() for p in pools],
            [(p.name(), sorted(p.listVolumes())) for p in pools if p.isActive()])


# Each run would otherwise create the "default" pool (absent from the test driver), a disk volume and the VM
# (the test driver cannot upload an unattend ISO: the real-libvirt suite checks that one).
WOULD_CREATE = ["--iso", "ISO", "--os", "win10", "--memory", "1GiB", "--virt-type", "qemu", "--network", "user",
                "--no-guided", "--apply", "--yes"]
UNATTEND = ["--unattend-user", "alice", "--unattend-password-file", "PASSWORD"]


def _would_create(vm_host, password: Path, *extra: str) -> list[str]:
    return [{"ISO": vm_host.iso, "PASSWORD": str(password)}.get(a, a) for a in (*WOULD_CREATE, *extra)]


@pytest.mark.parametrize(("name", "args", "message"), [
    ("../evil", [], "VM name '../evil' is refused: use 1-63 letters"),
    ("it's", [], "VM name \"it's\" is refused"),
    ('a"b', [], "VM name 'a\"b' is refused"),
    ("test", [], "a VM named 'test' already exists at test:///default; choose another name"),  # the driver's own
    ("ok", ["--iso", "/no/such.iso"], "installation ISO /no/such.iso does not exist"),
    ("ok", ["--storage", "block", "--disk", "/dev/sda"], "/dev/sda holds the host's root filesystem"),
    ("ok", ["--storage", "block", "--disk", "/dev/sda1"], "/dev/sda1 holds the host's root filesystem"),
    ("ok", ["--memory", "1TiB"], "1 TiB of RAM is more than this host has (31.25 GiB)"),
    ("ok", ["--vcpus", "64"], "64 vCPUs: this host has 8 CPUs online"),
    ("ok", ["--pool", "../images"], "storage pool '../images' is refused"),
    ("ok", ["--network", 'lan"0'], "network 'lan\"0' is refused"),
    ("ok", ["--network", "nowhere"], "libvirt has no network 'nowhere' (virsh net-list --all)"),
    ("ok", [*UNATTEND, "--unattend-password-file", "/no/such/pw"], "--unattend-password-file /no/such/pw: No such "
                                                                   "file"),
    ("ok", [*UNATTEND, "--os", "linux"], "--unattend-user writes a Windows Autounattend.xml; it has no meaning for "
                                         "--os linux"),
])
def test_hostile_values_are_refused_in_one_line_and_nothing_is_created(two_gpus, conn, tmp_path, name, args,
                                                                       message):
    password = tmp_path / "pw"
    password.write_text("s3cret\n")
    assert "default" not in _pool_names(conn)
    before = _everything(conn)
    result = run(two_gpus.root, "create", name, "--mode", "cpu-only", *_would_create(two_gpus, password, *args))
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"janus-hooks: {message}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Created" not in result.output
    assert _everything(conn) == before


def test_the_same_run_without_a_refusal_creates_pool_volume_and_vm(two_gpus, conn, tmp_path):
    # The counterpart of the refusals above: their "nothing created" could not fail if this created nothing.
    made = run(two_gpus.root, "create", "ok", "--mode", "cpu-only", *_would_create(two_gpus, tmp_path / "pw"))
    assert made.exit_code == 0, made.output
    try:
        assert "Created storage pool default" in made.output and "ok" in conn.listDefinedDomains()
        assert conn.storagePoolLookupByName("default").listVolumes() == ["ok.qcow2"]
    finally:
        assert run(two_gpus.root, "delete", "ok", "--storage", "--yes").exit_code == 0
        pool = conn.storagePoolLookupByName("default")
        pool.destroy()
        pool.undefine()


@pytest.mark.parametrize(("args", "message"), [
    (["--mode", "cpu-only"], "--iso required (or answer step by step on a terminal: --guided)"),
    (["--iso", "/x.iso"], "--mode required"),
    (["--mode", "cpu-only", "--iso", "ISO", "--unattend-user", "bob"],
     "--unattend-user bob needs --unattend-password-file without a terminal"),
])
def test_missing_flags_without_a_terminal_create_nothing(two_gpus, conn, args, message):
    before = _everything(conn)
    args = [two_gpus.iso if a == "ISO" else a for a in args]
    result = run(two_gpus.root, "create", "refused", "--os", "win10", "--virt-type", "qemu", "--pool", POOL,
                 "--network", "user", "--apply", "--yes", *args)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"janus-hooks: {message}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert _everything(conn) == before


def _guided(vm_host, name: str, *flags: str):
    """``vm create NAME`` on a pseudo-terminal (the installed command, as a person runs it)."""
    pexpect = pytest.importorskip("pexpect")
    cli_path = str(Path(sys.executable).with_name("janus-hooks"))
    return pexpect, pexpect.spawn(cli_path, ["vm", "create", name, "--root", str(vm_host.root), "--connect", TEST_URI,
                                             "--virt-type", "qemu", "--network", "user", "--pool", POOL, *flags],
                                  encoding="utf-8", timeout=60, dimensions=(50, 200))


def test_guided_flow_through_a_pseudo_terminal(two_gpus, tmp_path):
    pexpect, child = _guided(two_gpus, "guided")
    try:
        child.expect("Step 1 of 3")
        child.expect("Installation ISO: ")
        child.sendline("/no/such.iso")  # refused with the reason, asked again
        child.expect("does not exist or is not a file")
        child.expect("Installation ISO: ")
        child.sendline(two_gpus.iso)
        child.expect(r"Guest OS \(win11, win10, linux\) \[win11\]: ")
        child.sendline("")
        child.expect(r"virtio drivers ISO \(empty: none\): ")
        child.sendline(two_gpus.virtio_iso)
        child.expect("Step 2 of 3")
        child.expect(r"RAM \[15GiB\]: ")  # half of the fake host's 31.25 GiB
        child.sendline("64GiB")
        child.expect(r"64 GiB of RAM is more than this host has \(31.25 GiB\)")
        child.expect(r"RAM \[15GiB\]: ")
        child.sendline("8GiB")
        child.expect(r"vCPUs \[4\]: ")
        child.sendline("")
        child.expect(r"Video profile .* \[passthrough\]: ")
        child.sendline("")
        child.expect(r"GPUs: 0000:03:00.0, 0000:0c:00.0 \(boot VGA\)")
        child.expect(r"GPU \[0000:03:00.0\]: ")
        child.sendline("05:00.0")
        child.expect(r"no GPU 0000:05:00.0 on this host")
        child.expect(r"GPU \[0000:03:00.0\]: ")
        child.sendline("")
        child.expect(r"hugepages\? \[Y/n\]: ")
        child.sendline("y")
        child.expect(r"Storage \(file, block\) \[file\]: ")
        child.sendline("")
        child.expect(r"Disk size \[64GiB\]: ")
        child.sendline("2GiB")
        child.expect("Step 3 of 3")
        child.expect(r"Local account .*: ")
        child.sendline("")
        child.expect("VM guided: win11, passthrough, 8 GiB RAM \\(hugepages\\), 4 vCPU\\(s\\)")
        child.expect(r"Create VM 'guided' now\? \[Y/n\]: ")
        child.sendline("y")
        child.expect("Created VM guided.")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


def _pool_names(conn) -> list[str]:
    return sorted(p.name() for p in conn.listAllStoragePools(0))


def test_a_missing_default_pool_is_created_and_taken_back_on_failure(two_gpus, conn, tmp_path):
    assert "default" not in _pool_names(conn)
    base = ["--mode", "cpu-only", "--iso", two_gpus.iso, "--os", "win10", "--memory", "1GiB", "--virt-type", "qemu",
            "--network", "user", "--apply", "--yes"]
    password = tmp_path / "pw"
    password.write_text("pw\n")
    # The upload of the unattend ISO fails (the test driver has none): the pool made for it goes too.
    failed = run(two_gpus.root, "create", "pooled", *base, "--unattend-user", "bob",
                 "--unattend-password-file", str(password))
    assert failed.exit_code == 1 and "removed what this run created" in failed.stderr
    assert "default" not in _pool_names(conn) and "pooled" not in conn.listDefinedDomains()

    made = run(two_gpus.root, "create", "pooled", *base)
    assert made.exit_code == 0, made.output
    assert "Created storage pool default at /var/lib/libvirt/images." in made.output
    pool = conn.storagePoolLookupByName("default")
    try:
        assert pool.isActive() and pool.autostart()
        assert pool.listVolumes() == ["pooled.qcow2"]
    finally:
        assert run(two_gpus.root, "delete", "pooled", "--storage", "--yes").exit_code == 0
        pool.destroy()
        pool.undefine()


def test_guided_account_password_is_read_without_echo(two_gpus):
    secret = "Tr0ub4dor&3"
    pexpect, child = _guided(two_gpus, "unattended", "--mode", "cpu-only", "--iso", two_gpus.iso, "--os", "win11",
                             "--memory", "4GiB", "--vcpus", "1", "--no-hugepages", "--storage", "file",
                             "--disk-size", "1GiB")
    # Everything read from the terminal, the terminal's own echo of what was typed included.
    transcript = io.StringIO()
    child.logfile_read = transcript
    try:
        child.expect(r"virtio drivers ISO \(empty: none\): ")
        child.sendline("")
        child.expect(r"Local account .*: ")
        child.sendline("alice")
        child.expect(r"Password for alice \(not shown\): ")
        child.sendline(secret)
        child.expect("Repeat for confirmation: ")
        child.sendline(secret)
        child.expect("account alice: this ISO holds the password in clear text")
        child.expect(r"Create VM 'unattended' now\? \[Y/n\]: ")
        child.sendline("n")
        child.expect("Nothing was created.")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert "alice" in transcript.getvalue()  # echoed, unlike the password
    assert secret not in transcript.getvalue()


def test_guided_answers_the_host_cannot_serve_are_asked_again_with_the_reason(two_gpus, conn):
    pexpect, child = _guided(two_gpus, "asked")
    before = _everything(conn)
    try:
        child.expect("Installation ISO: ")
        child.sendline(two_gpus.iso)
        child.expect(r"Guest OS .*: ")
        child.sendline("win11")
        child.expect(r"virtio drivers ISO \(empty: none\): ")
        child.sendline("")
        child.expect(r"RAM \[15GiB\]: ")
        child.sendline("2GiB")
        child.expect(r"Windows 11 needs at least 4 GiB of RAM, not 2 GiB")
        child.expect(r"RAM \[15GiB\]: ")
        child.sendline("4GiB")
        child.expect(r"vCPUs \[4\]: ")
        child.sendline("64")
        child.expect("64 vCPUs: this host has 8 CPUs online")
        child.expect(r"vCPUs \[4\]: ")
        child.sendline("2")
        child.expect(r"Video profile .* \[passthrough\]: ")
        child.sendline("")
        child.expect(r"GPU \[0000:03:00.0\]: ")
        child.sendline("0c:00.0")  # the desktop's GPU: passthrough refuses it, the profile is asked again
        child.expect(r"Error: GPU 0000:0c:00.0 cannot go to a passthrough VM: GPU 0000:0c:00.0 drives the host "
                     r"display .*; use mode single-gpu for it")
        child.expect(r"Video profile .* \[passthrough\]: ")
        child.sendline("cpu-only")
        child.expect(r"hugepages\? \[y/N\]: ")
        child.sendline("")
        child.expect(r"Storage \(file, block\) \[file\]: ")
        child.sendline("block")
        child.expect(r"Disk or partition \(/dev/...\): ")
        child.sendline("/dev/sda")
        child.expect(r"/dev/sda holds the host's root filesystem")
        child.expect(r"Disk or partition \(/dev/...\): ")
        child.sendline("/dev/sdc1")
        child.expect(r"/dev/sdc1 is in use on the host \(.*sdc1 in use by LVM \(dm-0\)\)")
        child.expect(r"Disk or partition \(/dev/...\): ")
        child.sendline("/dev/sdb")
        child.expect("Step 3 of 3")
        child.expect(r"Local account .*: ")
        child.sendline("")
        child.expect(r"VM asked: win11, cpu-only, 4 GiB RAM, 2 vCPU\(s\), qemu")
        child.expect(r"disk:      /dev/sdb \(whole device\)")
        child.expect(r"Create VM 'asked' now\? \[Y/n\]: ")
        child.sendline("n")
        child.expect("Nothing was created.")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    assert _everything(conn) == before


def test_list_shows_a_shared_vram_guest_with_the_gpu_it_shares(two_gpus, conn):
    args = ["--iso", two_gpus.iso, "--memory", "4GiB", "--vcpus", "2", "--disk-size", "1GiB", "--virt-type", "qemu",
            "--network", "user", "--pool", POOL, "--apply", "--yes"]
    linux = run(two_gpus.root, "create", "virgl", "--mode", "shared-vram", "--os", "linux", *args)
    assert linux.exit_code == 0, linux.output
    assert "display:   virtio-gpu with 3D acceleration (virgl) rendered by GPU 0000:0c:00.0" in linux.output
    with_mdev(two_gpus.root, "0000:0c:00.0")
    made = run(two_gpus.root, "create", "shared", "--mode", "shared-vram", "--hugepages", *args)
    assert made.exit_code == 0, made.output
    assert "hugepages: janus-hooks reserves 4 GiB of hugepages when the VM starts" in made.output
    assert "press Run (janus-hooks makes its mediated device when it starts)." in made.output
    try:
        listed = run(two_gpus.root, "list", "--json").output
        rows = {v["name"]: (v["mode"], v["video"], v["gpu"]) for v in json.loads(listed)}
        assert rows["shared"] == ("shared-vram", "shared-vram", ["0000:0c:00.0"])
        assert rows["virgl"] == (None, "shared-vram", ["0000:0c:00.0"])  # not managed: nothing to do at start
    finally:
        for name in ("shared", "virgl"):
            assert run(two_gpus.root, "delete", name, "--storage", "--yes").exit_code == 0


def test_an_existing_image_is_used_as_it_is_and_never_deleted(two_gpus, conn, tmp_path):
    qcow2, raw = tmp_path / "old.qcow2", tmp_path / "old.img"
    qcow2.write_bytes(b"QFI\xfb" + b"\0" * 4092)
    raw.write_bytes(b"\0" * 4096)
    volumes = _volumes(conn)
    base = ["--mode", "cpu-only", "--iso", two_gpus.iso, "--os", "win10", "--virt-type", "qemu", "--network", "user",
            "--pool", POOL]
    dry = run(two_gpus.root, "create", "raw", *base, "--disk", str(raw))
    assert f"disk:      {raw} (raw, existing)" in dry.output
    # RAM and vCPUs from the host's size: half of its 31.25 GiB in whole GiB, half of its 8 CPUs.
    assert "VM raw: win10, cpu-only, 15 GiB RAM, 4 vCPU(s), qemu" in dry.output
    made = run(two_gpus.root, "create", "img", *base, "--disk", str(qcow2), "--apply", "--yes")
    assert made.exit_code == 0, made.output
    assert f"disk:      {qcow2} (qcow2, existing)" in made.output and "Created volume" not in made.output
    dom = conn.lookupByName("img")
    disk = ElementTree.fromstring(dom.XMLDesc(0)).find("devices/disk[@device='disk']")
    assert (disk.find("source").get("file"), disk.find("driver").get("type")) == (str(qcow2), "qcow2")
    assert _volumes(conn) == volumes
    dom.create()
    try:
        running = run(two_gpus.root, "delete", "img", "--storage", "--yes")
        assert running.exit_code == 1 and running.stderr == "janus-hooks: VM 'img' is running; shut it down first\n"
        assert "img" in conn.listDefinedDomains() or dom.isActive()
    finally:
        dom.destroy()
    dry_delete = run(two_gpus.root, "delete", "img", "--storage")
    assert "  undefine VM img" in dry_delete.output and "delete volume" not in dry_delete.output
    assert run(two_gpus.root, "delete", "img", "--storage", "--yes").exit_code == 0
    assert qcow2.read_bytes().startswith(b"QFI\xfb") and "img" not in conn.listDefinedDomains()
