"""Row 1: the hook's fast path (unmanaged VM, ignored phase) as libvirt runs it, vs the interpreter's floor
and vs the bash dispatcher guides have people install."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from bench.common import FLOOR_ARGV, HOOK_ENV, REPO, SPAWN_TIMEOUT, VENV_PYTHON, domain_xml, render_shim, timed_spawn
from bench.stats import BenchError, Row, interleave, ratio_row

GROUP = "hook"
VM = "win11-unmanaged"
# Imports that would mean the fast path is not fast (issue 2: never on an unmanaged VM or ignored phase).
HEAVY = ("click", "libvirt", "pyudev", "watchdog")


def _layout(scratch: Path) -> dict[str, Path]:
    """A hooks directory as on a host that has both: the guide's dispatcher and janus-hooks' drop-in."""
    hooks = scratch / "hook-row/etc/libvirt/hooks"
    host = scratch / "hook-row"
    for d in ("etc/janus-hooks/vms", "var/lib/janus-hooks/journal", "var/log/janus-hooks"):
        (host / d).mkdir(parents=True, exist_ok=True)
    dispatcher = hooks / "qemu"
    dispatcher.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO / "bench/guide-dispatcher.sh", dispatcher)
    dispatcher.chmod(0o755)
    # Another VM's guide scripts: the tree the dispatcher walks is not empty, just not for this VM.
    other = hooks / "qemu.d/gaming-vm/prepare/begin/10-vfio-startup.sh"
    other.parent.mkdir(parents=True, exist_ok=True)
    other.write_text("#!/bin/bash\nexit 1\n")
    other.chmod(0o755)
    shim = render_shim(hooks / "qemu.d/janus-hooks", root=str(host))
    return {"dispatcher": dispatcher, "shim": shim, "host": host}


def _imports(argv: list[str], stdin: bytes) -> set[str]:
    """Modules a run imports, from ``-X importtime`` (the interpreter's own list, nothing guessed)."""
    proc = subprocess.run(argv, input=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,  # noqa: S603
                          env=HOOK_ENV, timeout=SPAWN_TIMEOUT, check=False)
    mods = set()
    for line in proc.stderr.decode(errors="replace").splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                mods.add(name)
    return mods


def measure(scratch: Path, runs: int, warmup: int) -> list[Row]:
    paths = _layout(scratch)
    xml = domain_xml(VM).encode()
    shim, dispatcher = str(paths["shim"]), str(paths["dispatcher"])

    def spawn(argv: list[str] | tuple[str, ...]):
        return lambda: timed_spawn(argv, xml)

    variants = {
        "floor": spawn(FLOOR_ARGV),
        "janus-prepare": spawn([shim, VM, "prepare", "begin", "-"]),
        "janus-ignored": spawn([shim, VM, "started", "begin", "-"]),
        "bash-prepare": spawn([dispatcher, VM, "prepare", "begin", "-"]),
        "bash-ignored": spawn([dispatcher, VM, "started", "begin", "-"]),
    }
    samples = interleave(variants, runs, warmup)

    floor_mods = _imports([*FLOOR_ARGV[:3], "-X", "importtime", "-c", "pass"], xml)
    hook_mods = _imports([VENV_PYTHON, "-I", "-S", "-X", "importtime", shim, VM, "prepare", "begin", "-"], xml)
    extra = sorted(hook_mods - floor_mods)
    heavy = [m for m in extra if m.split(".")[0] in HEAVY]
    if not any(m.startswith("janus_hooks") for m in hook_mods):
        raise BenchError("the rendered shim never imported janus_hooks: it is not running the product")
    own = [m for m in extra if m.startswith("janus_hooks")]
    stdlib = [m for m in extra if not m.startswith("janus_hooks")]
    imports = (f"fast path imports beyond the floor's: {', '.join(own) or 'none'} "
               f"+ stdlib {', '.join(stdlib) or 'none'} (from -X importtime)")
    if heavy:
        imports += f"; HEAVY IMPORTS ON THE FAST PATH: {', '.join(heavy)}"
    floor_label = "python3 -I -S -c pass"
    bash_label = "bash dispatcher (bench/guide-dispatcher.sh)"
    how = (f"spawn-to-exit wall time of the rendered shim (#!{VENV_PYTHON} -IS), {len(xml)} B domain XML "
           "through a pipe, libvirt's 3-variable environment; all variants interleaved in random order")
    rows = [
        ratio_row(GROUP, "hook: prepare begin, unmanaged VM vs interpreter floor", samples["janus-prepare"],
                  samples["floor"], goal_ratio=1.5, baseline_label=floor_label, note=f"{how}; {imports}"),
        ratio_row(GROUP, "hook: started begin (ignored phase) vs interpreter floor", samples["janus-ignored"],
                  samples["floor"], goal_ratio=1.5, baseline_label=floor_label,
                  note="same method; the ignored phase returns before reading stdin"),
        ratio_row(GROUP, "hook: prepare begin, unmanaged VM vs bash dispatcher", samples["janus-prepare"],
                  samples["bash-prepare"], baseline_label=bash_label,
                  note="dispatcher walks qemu.d/<vm>/prepare/begin (absent for this VM); bash builtins only"),
        ratio_row(GROUP, "hook: started begin (ignored phase) vs bash dispatcher", samples["janus-ignored"],
                  samples["bash-ignored"], baseline_label=bash_label, note="same dispatcher, started begin"),
    ]
    rows[0].extra = {"fast_path_imports": extra, "heavy_imports": heavy}
    return rows
