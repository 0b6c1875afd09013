"""One small class per kind of change.

Each kind's module is imported when a name from it is first used (PEP 562 ``__getattr__``), and a journal
record loads only the module of its kind (``base.KIND_MODULES``): a hook process pays for the dataclasses of
the changes it makes, not for those of CPU isolation or shared GPUs when the VM has none.
"""

from janus_hooks.actions.base import Action, Context, action_from_json, action_kinds, old_from_json, wait_until

# Every public name of the action modules, and the module that defines it.
_LAZY = {
    "DetachFramebuffer": "console",
    "UnbindVtconsole": "console",
    "MoveIrqs": "cpu",
    "RestrictCgroupCpus": "cpu",
    "RestrictDefaultIrqAffinity": "cpu",
    "RestrictUnitCpus": "cpu",
    "RestrictWorkqueues": "cpu",
    "SetGovernor": "cpu",
    "SharedCpuStep": "cpu",
    "StopIrqbalance": "cpu",
    "EndSession": "display",
    "RunDisplayCommands": "display",
    "StopUnit": "display",
    "StopUserUnit": "display",
    "StopUserUnits": "display",
    "WaitReleased": "display",
    "VFIO_DRIVER": "driver",
    "BindVfio": "driver",
    "LoadModule": "driver",
    "UnloadModule": "driver",
    "AllocateHugepages": "memory",
    "SetResetMethod": "reset",
    "CreateMdev": "shared",
    "EnableVfs": "shared",
}


def _submodule(module: str) -> object:
    # __import__ rather than importlib.import_module: -X importtime (the bench's import breakdown) only
    # reports imports that go through the interpreter's own import statement.
    return __import__(f"{__name__}.{module}", fromlist=["__name__"])


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_submodule(module), name)
    globals()[name] = value  # later lookups find it without coming back here
    return value


__all__ = [
    "Action",
    "Context",
    "action_from_json",
    "action_kinds",
    "old_from_json",
    "wait_until",
    *_LAZY,
]
