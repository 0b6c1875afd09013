"""The hook entry itself: phases, the fast path, guarded operations, reconnect, names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from janus_hooks import hook
from tests.conftest import domain_xml
from tests.core.helpers import assert_same_tree
from tests.fake import hosts

REPO = Path(__file__).resolve().parents[2]
SHIM = REPO / "hooks" / "qemu"


def test_fast_path_imports_nothing_heavy(tmp_path):
    """An unmanaged VM or an ignored phase must not import click, libvirt, pyudev, watchdog, xml or logging."""
    report = ("import json; heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
              "('click', 'libvirt', 'pyudev', 'watchdog', 'xml', 'logging', 'subprocess', 'tomllib', 'json_') "
              "or m.startswith('janus_hooks.') and m not in ('janus_hooks.hook', 'janus_hooks.layout'));"
              "print(json.dumps(heavy))")
    for argv, xml in ((["plain", "prepare", "begin", "-"], domain_xml(name="plain", mode=None)),
                      (["win11", "started", "begin", "-"], domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS)),
                      (["plain", "release", "end", "-"], domain_xml(name="plain", mode=None))):
        code = (f"import sys; sys.argv = ['qemu'] + {argv!r}; sys.path.insert(0, {str(REPO)!r});"
                f"from janus_hooks.hook import main; rc = main(sys.argv[1:], root={str(tmp_path)!r}); {report}")
        out = subprocess.run([sys.executable, "-I", "-S", "-c", code], input=xml, capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == [], argv


def test_real_shim_runs_with_a_clean_environment(tmp_path):
    # Executed through its own #! line, as libvirt does.
    out = subprocess.run([str(SHIM), "plain", "prepare", "begin", "-"],
                         input=domain_xml(name="plain", mode=None), capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "HOME": "/root"}, timeout=30)
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")


def test_ignored_phase_does_not_read_stdin(fake):
    h = fake(hosts.single_nvidia)
    for op, sub in (("start", "begin"), ("started", "begin"), ("stopped", "end"), ("attach", "begin")):
        assert h.hook("win11", op, sub, domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS)) == (0, "")
    assert h.kernel.ops == 0


class _Unreadable:
    def read(self):
        raise AssertionError("the started phase read the domain XML")


def test_the_started_phase_never_reads_stdin_and_clears_only_a_failure_record(fake):
    h = fake(hosts.single_nvidia)
    assert hook.main(["plain", "started", "begin", "-"], root=str(h.root), stdin=_Unreadable()) == 0
    before = h.snapshot()
    assert hook.main(["win11", "started", "begin", "-"], root=str(h.root), stdin=_Unreadable()) == 0
    assert_same_tree(before, h.snapshot())
    failure = h.root / "var/lib/janus-hooks/failures/win11.json"
    assert h.hook("win11", "prepare", "begin", domain_xml(hostdevs=("0000:09:00.0",)))[0] == 1
    assert failure.exists()
    assert hook.main(["win11", "started", "begin", "-"], root=str(h.root), stdin=_Unreadable()) == 0
    assert not failure.exists()


def test_migrate_and_restore_refused_while_switched(fake):
    h = fake(hosts.single_nvidia)
    xml = domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS)
    assert h.hook("win11", "migrate", "begin", xml) == (0, "")
    assert h.hook("win11", "prepare", "begin", xml)[0] == 0
    for op in ("migrate", "restore"):
        assert h.hook("win11", op, "begin", xml) == (
            1, f"janus-hooks: VM 'win11' owns switched host devices; refusing {op}")


def test_reconnect_never_fails_and_changes_nothing(fake):
    h = fake(hosts.single_nvidia)
    xml = domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS)
    assert h.hook("win11", "prepare", "begin", xml)[0] == 0
    during = h.snapshot()
    ops = h.kernel.ops
    assert h.hook("win11", "reconnect", "begin", xml) == (0, "")
    assert h.kernel.ops == ops
    assert_same_tree(during, h.snapshot())
    # Even a broken config must not make libvirt kill a running VM on reconnect.
    (h.root / "etc/janus-hooks/janus.toml").write_text("this is [not toml")
    assert h.hook("win11", "reconnect", "begin", xml) == (0, "")


def test_broken_config_refuses_a_start_but_not_the_release(fake):
    h = fake(hosts.single_nvidia)
    xml = domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS)
    before = h.snapshot()
    assert h.hook("win11", "prepare", "begin", xml)[0] == 0
    (h.root / "etc/janus-hooks/janus.toml").write_text("this is [not toml")
    assert h.hook("win11", "release", "end", xml) == (0, "")
    before.pop("etc/janus-hooks/janus.toml")
    after = h.snapshot()
    after.pop("etc/janus-hooks/janus.toml")
    assert_same_tree(before, after)
    code, err = h.hook("win11", "prepare", "begin", xml)
    assert code == 1 and "janus.toml" in err


def test_vm_names_with_spaces_and_quotes(fake):
    h = fake(hosts.two_identical_gpus)
    name = "Win 11 \"gaming\" 'rig' 100%/x"
    xml = domain_xml(name="NAME", hostdevs=("0000:02:00.0", "0000:02:00.1"), mode="passthrough")
    xml = xml.replace("NAME", name.replace("&", "&amp;").replace('"', "&quot;"))
    before = h.snapshot()
    assert h.hook(name, "prepare", "begin", xml) == (0, "")
    assert h.journal_vms() == [name]
    assert h.hook(name, "release", "end", xml) == (0, "")
    assert_same_tree(before, h.snapshot())


def test_definition_of_another_vm_is_refused(fake):
    h = fake(hosts.single_nvidia)
    code, err = h.hook("other", "prepare", "begin", domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS))
    assert (code, err) == (1, "janus-hooks: VM 'other': hook called for VM 'other' with the definition of VM 'win11'")


def test_release_of_unknown_vm_is_a_no_op(fake):
    h = fake(hosts.single_nvidia)
    assert h.hook("win11", "release", "end", domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS)) == (0, "")
    assert h.kernel.ops == 0


def test_usage_error():
    import io

    from janus_hooks.hook import main

    err = io.StringIO()
    assert main(["only-a-name"], stderr=err) == 2
    assert "usage" in err.getvalue()


def test_unusable_log_dir_never_blocks_a_release(fake):
    h = fake(hosts.single_nvidia)
    xml = domain_xml(hostdevs=hosts.NVIDIA_FUNCTIONS)
    before = h.snapshot()
    assert h.hook("win11", "prepare", "begin", xml)[0] == 0
    (h.root / "var/log/janus-hooks").chmod(0o777)
    assert h.hook("win11", "release", "end", xml) == (0, "")
    (h.root / "var/log/janus-hooks").chmod(0o700)
    assert_same_tree(before, h.snapshot())
