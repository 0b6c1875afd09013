"""One small class per kind of change. Importing this package registers every kind for the journal."""

from janus_hooks.actions.base import Action, Context, action_from_json, action_kinds, old_from_json, wait_until
from janus_hooks.actions.console import DetachFramebuffer, UnbindVtconsole
from janus_hooks.actions.cpu import (
    MoveIrqs,
    RestrictCgroupCpus,
    RestrictDefaultIrqAffinity,
    RestrictUnitCpus,
    RestrictWorkqueues,
    SetGovernor,
    SharedCpuStep,
    StopIrqbalance,
)
from janus_hooks.actions.display import EndSession, RunDisplayCommands, StopUnit, StopUserUnit, WaitReleased
from janus_hooks.actions.driver import VFIO_DRIVER, BindVfio, LoadModule, UnloadModule
from janus_hooks.actions.memory import AllocateHugepages
from janus_hooks.actions.shared import CreateMdev, EnableVfs

__all__ = [
    "VFIO_DRIVER",
    "Action",
    "AllocateHugepages",
    "BindVfio",
    "Context",
    "CreateMdev",
    "DetachFramebuffer",
    "EnableVfs",
    "EndSession",
    "LoadModule",
    "MoveIrqs",
    "RestrictCgroupCpus",
    "RestrictDefaultIrqAffinity",
    "RestrictUnitCpus",
    "RestrictWorkqueues",
    "RunDisplayCommands",
    "SetGovernor",
    "SharedCpuStep",
    "StopIrqbalance",
    "StopUnit",
    "StopUserUnit",
    "UnbindVtconsole",
    "UnloadModule",
    "WaitReleased",
    "action_from_json",
    "action_kinds",
    "old_from_json",
    "wait_until",
]
