"""profile: the janus metadata, hostdevs and hugepage backing in a libvirt definition, or a TOML profile."""

from __future__ import annotations

import tomllib

import pytest

from janus_hooks.config import load_profile
from janus_hooks.domain import parse_domain
from janus_hooks.domain_edit import edit_domain, xml_diff
from janus_hooks.errors import ConfigError
from tests.cli.conftest import FakeConn
from tests.fake import desktops

# As virt-manager defines a Windows 11 VM: libosinfo metadata, no GPU yet.
VIRT_MANAGER_XML = """<domain type='kvm'>
  <name>win11</name>
  <uuid>3f1a6c2e-0000-4000-8000-000000000001</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://microsoft.com/win/11"/>
    </libosinfo:libosinfo>
  </metadata>
  <memory unit='KiB'>8388608</memory>
  <currentMemory unit='KiB'>8388608</currentMemory>
  <vcpu placement='static'>4</vcpu>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <graphics type='spice' autoport='yes' passwd='s3cret'/>
  </devices>
</domain>
"""


def test_edit_adds_the_profile_every_function_and_hugepages():
    new = edit_domain(VIRT_MANAGER_XML, "single-gpu", list(desktops.NVIDIA_CARD), True)
    spec = parse_domain(new)
    assert spec.mode == "single-gpu"
    assert [(d.address, d.managed) for d in spec.hostdevs] == [(a, True) for a in desktops.NVIDIA_CARD]
    assert spec.hugepages is not None and spec.hugepages.per_node_kb == {None: 8388608}
    # What was there stays: the libosinfo metadata under its own prefix, the graphics password.
    assert '<libosinfo:os id="http://microsoft.com/win/11" />' in new
    assert 'passwd="s3cret"' in new


def test_edit_is_idempotent_and_replaces_the_mode():
    once = edit_domain(VIRT_MANAGER_XML, "single-gpu", list(desktops.NVIDIA_CARD), True)
    assert edit_domain(once, "single-gpu", list(desktops.NVIDIA_CARD), True) == once
    switched = edit_domain(once, "passthrough", [], None)
    assert parse_domain(switched).mode == "passthrough"
    assert switched.count("janus:profile") == 1
    assert len(parse_domain(switched).hostdevs) == 2


def test_edit_mode_none_and_no_hugepages_take_them_away():
    once = edit_domain(VIRT_MANAGER_XML, "single-gpu", list(desktops.NVIDIA_CARD), True)
    off = edit_domain(once, "none", [], False)
    spec = parse_domain(off)
    assert spec.mode is None and spec.hugepages is None
    assert "memoryBacking" not in off and "janus" not in off
    assert "libosinfo:libosinfo" in off  # the metadata element stays for what else it holds


def test_edit_refuses_what_the_hook_refuses():
    with pytest.raises(ConfigError, match="DOCTYPE"):
        edit_domain("<!DOCTYPE x [<!ENTITY a 'b'>]><domain><name>x</name></domain>", "single-gpu", [], None)


def test_the_diff_holds_only_what_changed():
    new = edit_domain(VIRT_MANAGER_XML, "passthrough", [], None)
    diff = xml_diff(VIRT_MANAGER_XML, new, "win11")
    changed = [line for line in diff.splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert changed == ['+    <janus:profile mode="passthrough" />']


def test_profile_defines_the_vm_through_libvirt(make_cli):
    conn = FakeConn({"win11": VIRT_MANAGER_XML})
    c = make_cli(desktops.nvidia_desktop, conn=conn)
    result = c("profile", "win11", "--mode", "single-gpu", "--gpu", "01:00.0", "--hugepages", "--yes")
    assert result.exit_code == 0, result.output
    assert "+    <janus:profile mode=\"single-gpu\" />" in result.output
    assert "+        <address domain=\"0x0000\" bus=\"0x01\" slot=\"0x00\" function=\"0x1\" />" in result.output
    assert "VM 'win11' defined with janus-hooks mode single-gpu." in result.output
    assert len(conn.defined) == 1
    spec = parse_domain(conn.domains["win11"])
    assert spec.mode == "single-gpu" and {d.address for d in spec.hostdevs} == set(desktops.NVIDIA_CARD)
    # The VM now plans as the hook will run it.
    plan = c("plan", "win11")
    assert plan.exit_code == 0 and "14 change(s) on prepare" in plan.output

    again = c("profile", "win11", "--mode", "single-gpu", "--gpu", "01:00", "--hugepages", "--yes")
    assert again.exit_code == 0 and "nothing to change" in again.output
    assert len(conn.defined) == 1


def test_profile_asks_before_defining(make_cli):
    conn = FakeConn({"win11": VIRT_MANAGER_XML})
    c = make_cli(desktops.nvidia_desktop, conn=conn, interactive=True)
    declined = c("profile", "win11", "--mode", "passthrough", input="n\n")
    assert declined.exit_code == 1 and conn.defined == []
    c.interactive = False
    refused = c("profile", "win11", "--mode", "passthrough")
    assert refused.exit_code == 1 and "add --yes" in refused.stderr and conn.defined == []


def test_profile_without_a_gpu_warns_that_only_hugepages_are_managed(make_cli):
    conn = FakeConn({"win11": VIRT_MANAGER_XML})
    c = make_cli(desktops.nvidia_desktop, conn=conn)
    result = c("profile", "win11", "--mode", "single-gpu", "--hugepages", "--yes")
    assert result.exit_code == 0
    assert "has no PCI hostdev: only its hugepages are managed" in result.stderr


def test_profile_refuses_an_address_the_host_does_not_have(make_cli):
    conn = FakeConn({"win11": VIRT_MANAGER_XML})
    c = make_cli(desktops.nvidia_desktop, conn=conn)
    result = c("profile", "win11", "--mode", "passthrough", "--gpu", "09:00.0", "--yes")
    assert result.exit_code == 1
    assert result.stderr.strip() == "janus-hooks: no PCI device 09:00.0 on this host (see 'janus-hooks devices')"
    assert conn.defined == []


def test_profile_of_an_unknown_vm_is_one_line(make_cli):
    c = make_cli(desktops.nvidia_desktop, conn=FakeConn({}))
    result = c("profile", "nope", "--mode", "passthrough", "--yes")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "no domain with matching name 'nope'" in result.stderr


def test_profile_toml_writes_and_removes_the_profile(make_cli):
    c = make_cli(desktops.nvidia_desktop)  # no libvirt at all
    result = c("profile", "my vm", "--mode", "passthrough", "--toml", "--yes")
    assert result.exit_code == 0, result.output
    path = c.root / "etc/janus-hooks/vms/my vm.toml"
    assert tomllib.loads(path.read_text()) == {"mode": "passthrough"}
    assert load_profile(c.root / "etc/janus-hooks", "my vm").mode == "passthrough"
    assert "+mode = \"passthrough\"" in result.output

    path.write_text('mode = "passthrough"\nstop_units = ["sunshine.service"]\n')
    changed = c("profile", "my vm", "--mode", "single-gpu", "--toml", "--yes")
    assert changed.exit_code == 0
    assert tomllib.loads(path.read_text()) == {"mode": "single-gpu", "stop_units": ["sunshine.service"]}

    removed = c("profile", "my vm", "--mode", "none", "--toml", "--yes")
    assert removed.exit_code == 0 and not path.exists()
    assert "no TOML profile" in c("profile", "my vm", "--mode", "none", "--toml", "--yes").output


def test_profile_toml_does_not_take_gpu_or_hugepages(make_cli):
    c = make_cli(desktops.nvidia_desktop)
    result = c("profile", "win11", "--mode", "single-gpu", "--toml", "--gpu", "01:00.0", "--yes")
    assert result.exit_code == 1 and "with --toml only the mode is recorded" in result.stderr


def test_profile_without_gpu_or_hugepages_says_the_start_changes_nothing(make_cli):
    c = make_cli(desktops.nvidia_desktop, conn=FakeConn({"win11": VIRT_MANAGER_XML}))
    result = c("profile", "win11", "--mode", "passthrough", "--yes")
    assert result.exit_code == 0
    assert "has no PCI hostdev: its start changes nothing on the host" in result.stderr


def test_edit_asks_for_or_declines_cpu_isolation_and_keeps_it_across_mode_changes():
    asked = edit_domain(VIRT_MANAGER_XML, "single-gpu", [], None, isolate=True)
    assert parse_domain(asked).isolate is True
    # Changing the mode later keeps what the person chose for isolation.
    assert parse_domain(edit_domain(asked, "passthrough", [], None)).isolate is True
    declined = edit_domain(asked, "passthrough", [], None, isolate=False)
    assert parse_domain(declined).isolate is False and declined.count("isolate=") == 1


def test_profile_isolate_warns_when_the_vm_is_not_pinned_and_writes_the_toml(make_cli):
    c = make_cli(desktops.nvidia_desktop, conn=FakeConn({"win11": VIRT_MANAGER_XML}))
    result = c("profile", "win11", "--mode", "passthrough", "--isolate", "--yes")
    assert result.exit_code == 0, result.output
    assert parse_domain(c.conn.domains["win11"]).isolate is True
    assert "asks for CPU isolation but its vCPUs are not pinned" in result.stderr
    toml = c("profile", "win11", "--mode", "passthrough", "--toml", "--isolate", "--yes")
    assert toml.exit_code == 0
    assert load_profile(c.root / "etc/janus-hooks", "win11").isolate is True
