"""Shared fixtures: fake hosts wired to janus-hooks through the same entry points production uses."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from janus_hooks import hook
from janus_hooks.host import Host
from janus_hooks.runtime import Janus
from tests.fake.kernel import FakeKernel
from tests.fake.services import FakeRunner, FakeServices
from tests.fake.world import snapshot_tree

PROFILE_NS = "https://janus-hooks.org/xmlns/profile/1"


def domain_xml(name: str = "win11", hostdevs: tuple[str, ...] = (), mode: str | None = "single-gpu",
               memory_mib: int = 4096, hugepages: bool = False, page_kb: int | None = None,
               nodeset: str | None = None, cells: tuple[tuple[int, int, str], ...] = (),
               managed: str = "yes", vcpu: str = "", cputune: str = "", isolate: str | None = None) -> str:
    """A libvirt domain definition as virt-manager would write it (``cells``: (id, MiB, host nodeset);
    ``vcpu`` and ``cputune``: those elements as written, ``isolate``: the profile's attribute)."""
    devs = []
    for address in hostdevs:
        dom, bus, rest = address.split(":")
        slot, fn = rest.split(".")
        devs.append(
            f"<hostdev mode='subsystem' type='pci' managed='{managed}'><source>"
            f"<address domain='0x{dom}' bus='0x{bus}' slot='0x{slot}' function='0x{fn}'/></source></hostdev>"
        )
    extra = f" isolate='{isolate}'" if isolate else ""
    meta = f"<metadata><janus:profile xmlns:janus='{PROFILE_NS}' mode='{mode}'{extra}/></metadata>" if mode else ""
    backing = ""
    if hugepages:
        page = f"<page size='{page_kb}' unit='KiB'/>" if page_kb else ""
        backing = f"<memoryBacking><hugepages>{page}</hugepages></memoryBacking>"
    numatune = ""
    cpu = ""
    if cells:
        cpu = "<cpu><numa>" + "".join(
            f"<cell id='{i}' cpus='{i}' memory='{mib}' unit='MiB'/>" for i, mib, _ in cells) + "</numa></cpu>"
        numatune = "<numatune>" + "".join(
            f"<memnode cellid='{i}' mode='strict' nodeset='{ns}'/>" for i, _, ns in cells) + "</numatune>"
    elif nodeset:
        numatune = f"<numatune><memory mode='strict' nodeset='{nodeset}'/></numatune>"
    return (
        f"<domain type='kvm'><name>{name}</name><uuid>3f1a6c2e-0000-4000-8000-000000000001</uuid>{meta}"
        f"<memory unit='KiB'>{memory_mib * 1024}</memory>{vcpu}{cputune}{backing}{numatune}{cpu}"
        f"<os><type arch='x86_64' machine='q35'>hvm</type></os><devices>{''.join(devs)}</devices></domain>"
    )


FAST_TIMEOUTS = """
[timeouts]
unit_stop = 0.3
release = 0.3
driver = 0.3
module = 0.3
hugepages = 0.3
lock = 2
"""


class FakeHost:
    """A fake host tree plus the collaborators that animate it; runs the real hook entry against it."""

    def __init__(self, root: Path, fail_at: int | None = None) -> None:
        self.root = root
        self.kernel = FakeKernel(root, fail_at=fail_at)
        self.services = FakeServices(root)
        self.runner = FakeRunner(root)

    def janus(self, root: str | None = None, observer=None, restoring: bool = False, host: Host | None = None) -> Janus:
        """The hook's ``open_janus(root, restoring=...)``: ``root`` is always this fake host's own; ``host``:
        a Host on it that the caller made (the CLI's)."""
        kwargs = {"observer": observer} if observer else {}
        return Janus.open(host or Host(self.root, self.kernel), services=self.services, runner=self.runner,
                          restoring=restoring, **kwargs)

    def config(self, text: str) -> None:
        """Write etc/janus-hooks/janus.toml as the person would."""
        path = self.root / "etc/janus-hooks/janus.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def journal_vms(self) -> list[str]:
        return self.janus().store.vms()

    def hook(self, vm: str, op: str, sub: str, xml: str) -> tuple[int, str]:
        err = io.StringIO()
        code = hook.main([vm, op, sub, "-"], root=str(self.root), stdin=io.StringIO(xml), stderr=err,
                         open_janus=self.janus)
        return code, err.getvalue().strip()

    def snapshot(self) -> dict[str, tuple[str, str]]:
        return snapshot_tree(self.root)

    def read(self, rel: str) -> str:
        return (self.root / rel).read_text().strip()

    def driver(self, address: str) -> str | None:
        link = self.root / "sys/bus/pci/devices" / address / "driver"
        return link.readlink().name if link.is_symlink() else None


@pytest.fixture
def fake(tmp_path: Path):
    """Factory: ``fake(builder_function, **kwargs)`` -> FakeHost on a fresh tree."""

    def make(build, fail_at: int | None = None, **kwargs) -> FakeHost:
        root = tmp_path / "host"
        build(root, **kwargs)
        host = FakeHost(root, fail_at=fail_at)
        # Short timeouts: a step that cannot succeed on the fake host fails in a fraction of a second.
        host.config(FAST_TIMEOUTS)
        return host

    return make
