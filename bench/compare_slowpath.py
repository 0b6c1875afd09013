"""The ``slowpath`` rows for two source trees side by side, in one run: before and after a change.

    .venv/bin/python -m bench.compare_slowpath OTHER_TREE [--runs N] [--instructions]

``OTHER_TREE`` is another checkout of janus-hooks (``git worktree add --detach DIR COMMIT``). Both trees' hooks
run the same prepare begin / release end as the ``slowpath`` rows (bench/slowpath_rows.py: the installed shim,
the same fake host tree and seams played by this process), alternated in a random order each round, so that a
neighbour's load hits both alike. Printed per tree and phase: the median value (wall minus seams, as in the
row) and the median CPU time (user + system) of the hook process.

``--instructions`` also runs each once under ``valgrind --tool=callgrind`` and prints the instructions it
executed: a figure that does not move with the machine's load (valgrind is not a project dependency).
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import tempfile
from pathlib import Path

from bench.common import REPO, VENV_PYTHON, domain_xml
from bench.slowpath_rows import VM, SeamServer, render_launcher, run_hook
from bench.stats import BenchError, median

PHASES = {"prepare": ("prepare", "begin"), "release": ("release", "end")}


def launchers(scratch: Path, root: Path, other: Path) -> dict[str, Path]:
    """This tree's launcher and one for ``other``: the same shim, only JANUS_PATH differs."""
    this = render_launcher(scratch / "this/qemu.d/janus-hooks", root)
    text = this.read_text()
    if text.count(repr(str(REPO))) != 1:
        raise BenchError("the rendered shim does not name this tree exactly once")
    that = scratch / "other/qemu.d/janus-hooks"
    that.parent.mkdir(parents=True)
    that.write_text(text.replace(repr(str(REPO)), repr(str(other))))
    that.chmod(0o755)
    return {"other": that, "this": this}


def instructions(launcher: Path, server: SeamServer, phase: tuple[str, str], xml: bytes, out: Path) -> float:
    """Millions of instructions the hook process executed (callgrind's total)."""
    run_hook(launcher, server, phase, xml, ("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                                            VENV_PYTHON, "-I", "-S"))
    found = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
    if found is None:
        raise BenchError(f"no instruction total in {out}")
    return int(found.group(1)) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, help="another checkout of janus-hooks")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--instructions", action="store_true", help="also count instructions with valgrind")
    args = parser.parse_args()
    if not (args.other / "janus_hooks/hook.py").is_file() or not (args.other / "bench/seam_client.py").is_file():
        parser.error(f"{args.other} is not a janus-hooks checkout with bench/seam_client.py")
    if args.instructions and shutil.which("valgrind") is None:
        parser.error("--instructions needs valgrind")
    from tests.fake import hosts

    scratch = Path(tempfile.mkdtemp(prefix="janus-bench-compare-"))
    try:
        root = hosts.single_nvidia(scratch / "host")
        config = root / "etc/janus-hooks/janus.toml"  # what `janus-hooks install` writes
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text((REPO / "templates/janus.toml").read_text())
        trees = launchers(scratch, root, args.other.resolve())
        xml = domain_xml(VM, mode="single-gpu", hostdevs=hosts.NVIDIA_FUNCTIONS, memory_mib=8192,
                         hugepages=True).encode()
        server = SeamServer(root)
        values: dict[tuple[str, str], list[float]] = {(t, p): [] for t in trees for p in PHASES}
        cpu: dict[tuple[str, str], list[float]] = {key: [] for key in values}
        rng = random.Random(9)
        warmup = 3
        for round_ in range(warmup + args.runs):
            order = list(trees)
            rng.shuffle(order)
            for tree in order:
                for phase, argv in PHASES.items():  # prepare, then its release: the tree is clean again
                    result = run_hook(trees[tree], server, argv, xml)
                    if round_ >= warmup:
                        values[tree, phase].append(result["wall"] - result["seams"] - result["client_import"])
                        cpu[tree, phase].append(result["cpu"])
        print(f"slowpath, {args.runs} rounds, trees alternated: other = {args.other}, this = {REPO}")
        for phase in PHASES:
            for tree in trees:
                line = (f"  {phase:8} {tree:5}  value {median(values[tree, phase]) * 1000:6.1f} ms"
                        f"  cpu {median(cpu[tree, phase]) * 1000:6.1f} ms")
                if args.instructions:
                    if phase == "release":  # a release needs its prepare's journal
                        run_hook(trees[tree], server, PHASES["prepare"], xml)
                    count = instructions(trees[tree], server, PHASES[phase], xml, scratch / "callgrind.out")
                    if phase == "prepare":
                        run_hook(trees[tree], server, PHASES["release"], xml)
                    line += f"  instructions {count:6.1f} M"
                print(line)
    finally:
        shutil.rmtree(scratch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
