"""reserve / unreserve: a dry run first, refusals, the three files, and what check and devices show."""

from __future__ import annotations

import json

from tests.fake import desktops, hosts

RULES = "etc/udev/rules.d/40-janus-hooks-reserve.rules"
MODPROBE = "etc/modprobe.d/janus-hooks-reserve.conf"
INITRAMFS_HOOK = "etc/initramfs-tools/hooks/janus-hooks-reserve"


def _cli(make_cli, build=hosts.amd_dgpu_with_igpu, **options):
    c = make_cli(build, **options)
    (c.root / "etc/initramfs-tools/hooks").mkdir(parents=True, exist_ok=True)  # Debian's initramfs-tools
    return c


def test_dry_run_shows_the_rule_and_changes_nothing(make_cli):
    c = _cli(make_cli, euid=1000)  # a dry run needs no root
    result = c("reserve", "0000:03:00.0", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "GPU 0000:03:00: functions 0000:03:00.0, 0000:03:00.1; host driver modules amdgpu" in result.output
    assert ('ACTION=="add", SUBSYSTEM=="pci", KERNEL=="0000:03:00.1", ATTR{driver_override}="vfio-pci", '
            'RUN{builtin}+="kmod load vfio-pci"') in result.output
    assert result.output.strip().endswith("Dry run: nothing was changed.")
    assert not (c.root / RULES).exists() and not (c.root / MODPROBE).exists()
    assert c("reserve", "0000:03:00.0").stderr.startswith("janus-hooks: 'janus-hooks reserve' changes the host")


def test_reserve_writes_rule_softdep_and_initramfs_hook_and_unreserve_takes_them_away(make_cli):
    c = _cli(make_cli)
    result = c("reserve", "0000:03:00", "--yes")  # a slot or any function names the GPU
    assert result.exit_code == 0, result.output
    rules = (c.root / RULES).read_text().splitlines()
    body = [line for line in rules if not line.startswith("#")]
    assert body == [f'ACTION=="add", SUBSYSTEM=="pci", KERNEL=="0000:03:00.{f}", ATTR{{driver_override}}="vfio-pci", '
                    'RUN{builtin}+="kmod load vfio-pci"' for f in (0, 1)]
    modprobe = (c.root / MODPROBE).read_text().splitlines()
    assert [line for line in modprobe if not line.startswith("#")] == ["softdep amdgpu pre: vfio-pci",
                                                                       "softdep snd_hda_intel pre: vfio-pci"]
    hook = c.root / INITRAMFS_HOOK
    assert "manual_add_modules vfio-pci vfio_iommu_type1" in hook.read_text() and hook.stat().st_mode & 0o111
    assert "not the running system: run 'update-initramfs -u' there" in result.output
    # Nothing changed on the running host: the reservation takes effect at the next boot.
    assert c.fake.driver("0000:03:00.0") == "amdgpu"
    again = c("reserve", "0000:03:00.1", "--yes")
    assert again.exit_code == 0 and "reserved already; nothing to do" in again.output

    listing = c("devices")
    block = listing.output.split("GPU 0000:03:00")[1].split("GPU ")[0]
    assert "reserved for VMs from boot on" in block
    assert "reserved for VMs" not in listing.output.split("GPU 0000:0c:00")[1]
    data = json.loads(c("devices", "--json").output)
    assert {g["slot"]: g["reserved"] for g in data["gpus"]} == {"0000:03:00": True, "0000:0c:00": False}
    checked = json.loads(c("check", "--json").output)
    assert {g["slot"]: g["reserved"] for g in checked["gpus"]} == {"0000:03:00": True, "0000:0c:00": False}
    assert "reserved:  for VMs from boot on ('janus-hooks unreserve 0000:03:00' to undo)" in c("check").output

    result = c("unreserve", "0000:03:00.0", "--yes")
    assert result.exit_code == 0, result.output
    assert not (c.root / RULES).exists() and not (c.root / MODPROBE).exists() and not hook.exists()
    assert "goes to its host driver from the next boot on" in result.output
    result = c("unreserve", "0000:03:00.0", "--yes")
    assert result.exit_code == 1
    assert result.stderr.strip() == "janus-hooks: 0000:03:00 is not reserved (reserved: none)"


def test_the_boot_gpu_is_refused(make_cli):
    c = _cli(make_cli)
    result = c("reserve", "0000:0c:00.0", "--yes")
    assert result.exit_code == 1
    assert result.stderr.startswith("janus-hooks: 0000:0c:00.0 (VGA controller, amdgpu) is the boot GPU "
                                    "(boot_vga=1): the host needs it")
    assert not (c.root / RULES).exists()


def test_a_gpu_sharing_its_iommu_group_is_refused(make_cli):
    c = _cli(make_cli, build=desktops.igpu_and_dgpu_sharing_usb)
    result = c("reserve", desktops.NVIDIA_VGA, "--yes")
    assert result.exit_code == 1
    assert f"also holds {desktops.USB_CONTROLLER}" in result.stderr
    assert "reserving the GPU would take those from the host too" in result.stderr
    assert not (c.root / RULES).exists()


def test_not_a_gpu_or_not_there(make_cli):
    c = _cli(make_cli)
    assert c("reserve", "0000:09:00.0", "--yes").stderr.strip() == \
        "janus-hooks: no PCI device 0000:09:00.0 on this host (see 'janus-hooks devices')"
    nic = next(a for a in ("0000:00:1f.6", "0000:00:14.0") if (c.root / "sys/bus/pci/devices" / a).exists())
    assert "is not a GPU" in c("reserve", nic, "--yes").stderr
