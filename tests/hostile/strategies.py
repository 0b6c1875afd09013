"""Hypothesis strategies for what janus-hooks parses: near-valid inputs, so mutations reach deep checks."""

from __future__ import annotations

import json

import tomli_w
from hypothesis import strategies as st

NUMBERISH = st.one_of(st.integers(-10, 10**13).map(str), st.sampled_from(["0x1f", "-1", "1e9", "", " 3", "nan",
                                                                           "0-1000000000000", "^1", "1-0", "9" * 50]),
                      st.text(max_size=12))
UNITS = st.sampled_from(["KiB", "MiB", "GiB", "b", "TB", "x", ""])


@st.composite
def domain_xml(draw) -> str:
    name = draw(st.text(max_size=40))
    escaped = name.replace("&", "&amp;").replace("<", "&lt;")
    hostdevs = "".join(
        f"<hostdev mode='subsystem' type='pci'><source><address domain='{draw(NUMBERISH)}' bus='{draw(NUMBERISH)}' "
        f"slot='{draw(NUMBERISH)}' function='{draw(NUMBERISH)}'/></source></hostdev>"
        for _ in range(draw(st.integers(0, 3))))
    memory = f"<memory unit='{draw(UNITS)}'>{draw(NUMBERISH)}</memory>"
    backing = draw(st.sampled_from(["", "<memoryBacking><hugepages/></memoryBacking>",
                                    f"<memoryBacking><hugepages><page size='{draw(NUMBERISH)}'/></hugepages>"
                                    "</memoryBacking>"]))
    numa = draw(st.sampled_from(["", f"<numatune><memory nodeset='{draw(NUMBERISH)}'/></numatune>",
                                 f"<numatune><memnode cellid='{draw(NUMBERISH)}' nodeset='{draw(NUMBERISH)}'/>"
                                 f"</numatune><cpu><numa><cell id='{draw(NUMBERISH)}' memory='{draw(NUMBERISH)}'/>"
                                 "</numa></cpu>"]))
    vcpu = draw(st.sampled_from(["", f"<vcpu cpuset='{draw(NUMBERISH)}'>{draw(NUMBERISH)}</vcpu>"
                                     f"<cputune><vcpupin vcpu='{draw(NUMBERISH)}' cpuset='{draw(NUMBERISH)}'/>"
                                     "</cputune>"]))
    mode = draw(st.sampled_from(["single-gpu", "passthrough", "none", "x"]))
    meta = (f"<metadata><janus:profile xmlns:janus='https://janus-hooks.org/xmlns/profile/1' mode='{mode}' "
            f"isolate='{draw(st.sampled_from(['yes', 'no', 'maybe']))}'/></metadata>")
    return (f"<domain type='kvm'><name>{escaped}</name>{meta}{memory}{backing}{numa}{vcpu}"
            f"<devices>{hostdevs}</devices></domain>")


JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=20)),
                    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=4)),
                    max_leaves=12)
KINDS = ["bind-vfio", "unload-module", "load-module", "stop-unit", "display-commands", "allocate-hugepages",
         "unbind-vtconsole", "detach-framebuffer", "wait-released", "end-session", "move-irqs", "set-governor", "x"]
FIELDS = ["address", "host_driver", "module", "devices", "unit", "stop", "start", "size_kb", "node", "pages",
          "name", "device", "driver", "nodes", "shared_prefixes", "session", "user", "vm", "cores", "governor"]


@st.composite
def journal_bytes(draw) -> bytes:
    begin = {"type": "begin", "vm": "win11", "boot_id": "unknown", "devices": ["0000:01:00.0"], "time": 1.0,
             "pid": 1}
    if draw(st.booleans()):
        begin[draw(st.sampled_from(list(begin)))] = draw(JSON)
    records = [begin]
    for step in range(draw(st.integers(0, 4))):
        action = {"kind": draw(st.sampled_from(KINDS))}
        for key in draw(st.lists(st.sampled_from(FIELDS), max_size=4)):
            action[key] = draw(JSON)
        records.append({"type": draw(st.sampled_from(["intent", "done", "reverted", "complete", "x"])),
                        "step": draw(st.one_of(st.just(step), JSON)), "action": action,
                        "old": draw(JSON), "time": 1.0})
    text = "".join(json.dumps(r, allow_nan=True) + "\n" for r in records)
    cut = draw(st.integers(0, len(text)))
    return text[:cut].encode() if draw(st.booleans()) else text.encode()


TOML_VALUES = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(), st.text(max_size=20),
                        st.lists(st.text(max_size=10), max_size=3))
KEYS = {"display": ["manager", "stop_units", "stop_user_units", "end_sessions", "stop_command", "start_command",
                    "x"], "timeouts": ["unit_stop", "release", "driver", "module", "hugepages", "lock", "y"],
        "cpu": ["isolate", "governor", "irqs", "workqueues"], "": ["log_level", "mode", "stop_units", "isolate"]}


@st.composite
def config_bytes(draw) -> bytes:
    doc: dict = {}
    for table in draw(st.lists(st.sampled_from(list(KEYS)), max_size=4)):
        target = doc if not table else doc.setdefault(table, {}) if draw(st.booleans()) else doc
        if table and target is doc:
            doc[table] = draw(TOML_VALUES)
            continue
        for key in draw(st.lists(st.sampled_from(KEYS[table]), max_size=3)):
            if isinstance(target, dict):
                target[key] = draw(TOML_VALUES)
    try:
        return tomli_w.dumps(doc).encode()
    except (TypeError, ValueError):
        return b""
