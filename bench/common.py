"""What every row shares: where things are, the hook shim rendered as an install would, timed spawns."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bench.stats import BenchError

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
# The venv's python is a symlink to the system interpreter; fall back to the one running us.
VENV_PYTHON = str(REPO / ".venv/bin/python") if (REPO / ".venv/bin/python").exists() else sys.executable
# The interpreter's floor: what any Python hook costs before it does anything.
FLOOR_ARGV = (SYSTEM_PYTHON, "-I", "-S", "-c", "pass")
# libvirt runs hooks with only these three variables (DESIGN.md, seen with libvirt 9.0).
HOOK_ENV = {"LC_ALL": "C", "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
SPAWN_TIMEOUT = 30.0
PROFILE_NS = "https://janus-hooks.org/xmlns/profile/1"


def render_shim(dest: Path, root: str, interpreter: str = VENV_PYTHON) -> Path:
    """hooks/qemu as an install writes it: absolute interpreter in the shebang, package path and root fixed.

    Refuses (BenchError) when hooks/qemu no longer has the lines an install rewrites, rather than timing
    something that is not the shim.
    """
    lines = (REPO / "hooks/qemu").read_text().splitlines(keepends=True)
    if not lines or not lines[0].startswith("#!"):
        raise BenchError("hooks/qemu has no shebang line to render")
    # Keep the shim's own interpreter flags, as one cluster: Linux hands everything after the interpreter
    # to it as a single argument, and Python rejects "-I -S" (exit 2) but takes "-IS".
    flags = "".join(f.lstrip("-") for f in lines[0][2:].split()[1:])
    lines[0] = f"#!{interpreter}{f' -{flags}' if flags else ''}\n"
    wanted = {"JANUS_PATH = None": f"JANUS_PATH = {str(REPO)!r}", 'JANUS_ROOT = "/"': f"JANUS_ROOT = {root!r}"}
    for i, line in enumerate(lines):
        key = line.strip()
        if key in wanted:
            lines[i] = wanted.pop(key) + "\n"
    if wanted:
        raise BenchError(f"hooks/qemu changed shape: cannot find {sorted(wanted)[0]!r} to render an installed copy")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(lines))
    dest.chmod(0o755)
    return dest


def timed_spawn(argv: list[str] | tuple[str, ...], stdin: bytes = b"", env: dict[str, str] | None = None,
                timeout: float = SPAWN_TIMEOUT, expect: int = 0) -> float:
    """Wall seconds from spawn to exit, as libvirt sees a hook: argv, XML through a pipe, stdio closed after.

    Raises BenchError when the program fails, so a broken hook is never timed as a fast one.
    """
    start = time.perf_counter()
    try:
        proc = subprocess.run(list(argv), input=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,  # noqa: S603
                              env=HOOK_ENV if env is None else env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        raise BenchError(f"{' '.join(argv)} did not finish within {timeout:g} s") from err
    seconds = time.perf_counter() - start
    if proc.returncode != expect:
        detail = proc.stderr.decode(errors="replace").strip().splitlines()
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode}: {detail[-1] if detail else 'no message'}")
    return seconds


def fs_type(path: Path) -> str:
    """The filesystem type a path lives on (from /proc/self/mountinfo), for fsync-cost context."""
    best, kind = "", "?"
    target = os.path.realpath(path)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return kind
    for line in lines:
        left, _, right = line.partition(" - ")
        mount = left.split()[4]
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, kind = mount, right.split()[0]
    return kind


def domain_xml(name: str, *, mode: str | None = None, hostdevs: tuple[str, ...] = (), memory_mib: int = 8192,
               hugepages: bool = False) -> str:
    """A domain definition the size and shape virt-manager writes (about 5 kB), optionally janus-managed."""
    meta = f"<janus:profile xmlns:janus='{PROFILE_NS}' mode='{mode}'/>" if mode else ""
    hostdev_xml = ""
    for address in hostdevs:
        dom, bus, rest = address.split(":")
        slot, fn = rest.split(".")
        hostdev_xml += (
            f"<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x{dom}' "
            f"bus='0x{bus}' slot='0x{slot}' function='0x{fn}'/></source></hostdev>\n"
        )
    backing = "<memoryBacking><hugepages/></memoryBacking>" if hugepages else ""
    return f"""<domain type='kvm' id='3'>
  <name>{name}</name>
  <uuid>3f1a6c2e-1b7d-4c5e-9a2f-6d0b8e4c7a11</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://microsoft.com/win/11"/>
    </libosinfo:libosinfo>
    {meta}
  </metadata>
  <memory unit='KiB'>{memory_mib * 1024}</memory>
  <currentMemory unit='KiB'>{memory_mib * 1024}</currentMemory>
  {backing}
  <vcpu placement='static'>8</vcpu>
  <resource><partition>/machine</partition></resource>
  <os firmware='efi'>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <firmware><feature enabled='yes' name='enrolled-keys'/><feature enabled='yes' name='secure-boot'/></firmware>
    <loader readonly='yes' secure='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.ms.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.ms.fd'>/var/lib/libvirt/qemu/nvram/{name}_VARS.fd</nvram>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/><apic/>
    <hyperv mode='custom'>
      <relaxed state='on'/><vapic state='on'/><spinlocks state='on' retries='8191'/><vpindex state='on'/>
      <runtime state='on'/><synic state='on'/><stimer state='on'/><reset state='on'/>
      <vendor_id state='on' value='janusbench'/><frequencies state='on'/>
    </hyperv>
    <kvm><hidden state='on'/></kvm>
    <vmport state='off'/><smm state='on'/>
  </features>
  <cpu mode='host-passthrough' check='none' migratable='on'>
    <topology sockets='1' dies='1' cores='4' threads='2'/>
  </cpu>
  <clock offset='localtime'>
    <timer name='rtc' tickpolicy='catchup'/><timer name='pit' tickpolicy='delay'/>
    <timer name='hpet' present='no'/><timer name='hypervclock' present='yes'/>
  </clock>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
  <pm><suspend-to-mem enabled='no'/><suspend-to-disk enabled='no'/></pm>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/var/lib/libvirt/images/{name}.qcow2'/>
      <target dev='sda' bus='sata'/>
      <address type='drive' controller='0' bus='0' target='0' unit='0'/>
    </disk>
    <controller type='usb' index='0' model='qemu-xhci' ports='15'>
      <address type='pci' domain='0x0000' bus='0x02' slot='0x00' function='0x0'/>
    </controller>
    <controller type='pci' index='0' model='pcie-root'/>
    <controller type='pci' index='1' model='pcie-root-port'>
      <model name='pcie-root-port'/><target chassis='1' port='0x10'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0' multifunction='on'/>
    </controller>
    <controller type='pci' index='2' model='pcie-root-port'>
      <model name='pcie-root-port'/><target chassis='2' port='0x11'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x1'/>
    </controller>
    <controller type='sata' index='0'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x1f' function='0x2'/>
    </controller>
    <interface type='network'>
      <mac address='52:54:00:6b:3c:58'/>
      <source network='default'/>
      <model type='virtio'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </interface>
    <input type='mouse' bus='ps2'/><input type='keyboard' bus='ps2'/>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
    <audio id='1' type='none'/>
    {hostdev_xml}
    <memballoon model='none'/>
  </devices>
</domain>
"""
