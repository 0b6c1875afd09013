"""Rules checked on the package's syntax trees (string constants, calls), not by grepping text: no module
runs a shell, and only janus_hooks/host/ spells the kernel's and the system's /sys, /proc and /dev."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "janus_hooks"
SHELLS = re.compile(r"^(/usr)?(/bin/)?(ba|da|z|k|c|tc|fi)?sh$")
KERNEL_PATH = re.compile(r"(^|[^A-Za-z0-9_.-])/?(sys|proc|dev)/[A-Za-z]|^/(sys|proc|dev)$")
SHELL_CALLS = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"), ("subprocess", "getstatusoutput")}


def _modules() -> list[tuple[str, ast.Module]]:
    return [(str(p.relative_to(PACKAGE.parent)), ast.parse(p.read_text(), str(p)))
            for p in sorted(PACKAGE.rglob("*.py"))]


def _docstrings(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _strings(tree: ast.Module) -> list[ast.Constant]:
    skip = _docstrings(tree)
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip]


def test_no_module_runs_a_shell():
    found = []
    for name, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                if any(k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                       for k in node.keywords):
                    found.append(f"{name}:{node.lineno}: shell= argument")
                func = node.func
                if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                        and (func.value.id, func.attr) in SHELL_CALLS):
                    found.append(f"{name}:{node.lineno}: {func.value.id}.{func.attr}()")
        found += [f"{name}:{n.lineno}: shell program {n.value!r}" for n in _strings(tree) if SHELLS.match(n.value)]
    assert found == []


def test_only_the_host_package_spells_kernel_paths():
    found = [f"{name}:{n.lineno}: {n.value[:60]!r}" for name, tree in _modules()
             if not name.startswith("janus_hooks/host/")
             for n in _strings(tree) if KERNEL_PATH.search(n.value)]
    assert found == []


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The rules themselves can fail: a shell call and a kernel path in a module are found."""
    tree = ast.parse('"""Docstrings may say /sys/bus."""\nimport os, subprocess\n'
                     'subprocess.run(["ls"], shell=True)\nos.system("x")\nP = "/sys/bus/pci"\nQ = "/bin/sh"\n')
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert any(k.arg == "shell" for c in calls for k in c.keywords)
    assert [n.value for n in _strings(tree) if KERNEL_PATH.search(n.value)] == ["/sys/bus/pci"]
    assert [n.value for n in _strings(tree) if SHELLS.match(n.value)] == ["/bin/sh"]
