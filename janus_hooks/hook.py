"""libvirt qemu hook entry: ``HOOK <vm> <operation> <sub-operation> <extra>`` with the domain XML on stdin.

Fast path first: an ignored phase or an unmanaged VM costs a few stat() calls and no import beyond the
standard library's ``os``. The hook never imports or calls libvirt: libvirtd is waiting on it.
"""

from __future__ import annotations

import os
import sys

# (operation, sub-operation) pairs janus-hooks acts on; libvirt calls the hook for many more.
PREPARE = ("prepare", "begin")
RELEASE = ("release", "end")
GUARDED = (("migrate", "begin"), ("restore", "begin"))
RECONNECT = ("reconnect", "begin")
STARTED = ("started", "begin")  # QEMU runs: the start succeeded
HANDLED = (PREPARE, RELEASE, RECONNECT, *GUARDED)

PROFILE_MARK = "janus-hooks.org/xmlns/profile/"


def maybe_managed(root: str, vm: str, xml: str) -> bool:
    """Cheap test: a janus profile in the XML or on disk, or an open journal. False means: do nothing."""
    from janus_hooks.layout import journal_file, profile_file

    return PROFILE_MARK in xml or os.path.exists(profile_file(root, vm)) or os.path.exists(journal_file(root, vm))


def main(argv: list[str], root: str = "/", stdin=None, stderr=None, open_janus=None) -> int:
    """Run one hook invocation; returns the exit status. ``open_janus(root)`` is injectable for tests."""
    stdin = stdin if stdin is not None else sys.stdin
    stderr = stderr if stderr is not None else sys.stderr
    if len(argv) < 3:
        print("janus-hooks: usage: qemu-hook VM OPERATION SUB-OPERATION [EXTRA] < domain.xml", file=stderr)
        return 2
    vm, phase = argv[0], (argv[1], argv[2])
    if phase == STARTED:
        _forget_failure(root, vm)
        return 0
    if phase not in HANDLED:
        return 0
    # Bytes: libvirt runs hooks with LC_ALL=C, where text-mode stdin would fail on any non-ASCII byte.
    data = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read()
    xml = data.decode("utf-8", errors="surrogateescape") if isinstance(data, bytes) else data
    if not maybe_managed(root, vm, xml):
        return 0
    return _managed(vm, phase, xml, root, stderr, open_janus or _open_real)


def _open_real(root: str, restoring: bool = False):
    from janus_hooks.host import Host
    from janus_hooks.runtime import Janus

    return Janus.open(Host(root), restoring=restoring)


def _managed(vm: str, phase: tuple[str, str], xml: str, root: str, stderr, open_janus) -> int:
    # Everything below is the slow path: only a managed VM at a phase that matters gets here.
    import logging

    from janus_hooks.errors import ConfigError, JanusError

    # stderr is libvirt's error line: before the log file is set up (or when it cannot be), log records go
    # nowhere rather than to logging's last-resort handler on stderr.
    package_log = logging.getLogger("janus_hooks")
    if not any(isinstance(h, logging.NullHandler) for h in package_log.handlers):
        package_log.addHandler(logging.NullHandler())
    try:
        janus = open_janus(root, restoring=phase in (RELEASE, RECONNECT))
        janus.setup_logging()
        if phase == PREPARE:
            from janus_hooks.domain import parse_domain

            spec = parse_domain(xml)
            if spec.name != vm:
                raise ConfigError(f"hook called for VM {_token(vm)} with the definition of VM {_token(spec.name)}")
            plan, report = janus.prepare(spec)
            # What the start did not do and why (a host-wide setting skipped for this VM, a governor the
            # cores lack): plan shows these; a real start leaves them in the log.
            for note in plan.notes:
                janus_log(f"VM {vm}: note: {note}")
            if report is not None:
                total = sum(s.seconds for s in report.steps)
                janus_log(f"VM {vm}: prepared {len(report.steps)} step(s) in {total * 1000:.0f} ms")
        elif phase == RELEASE:
            report = janus.release(vm)
            janus_log(f"VM {vm}: released, {report.reverted} change(s) reverted")
        elif phase in GUARDED:
            if janus.switched(vm):
                print(f"janus-hooks: VM {_token(vm)} owns switched host devices; refusing {phase[0]}", file=stderr)
                return 1
        elif phase == RECONNECT:
            # libvirtd restarted while the VM runs: its devices stay switched. A non-zero exit here would
            # make libvirt kill the VM, so this phase only records what it found.
            janus_log(f"VM {vm}: libvirt reconnected; journal {'open' if janus.switched(vm) else 'absent'}")
    except JanusError as err:
        line = one_line(f"janus-hooks: VM {_token(vm)}: {err}")
        # The whole message: the line may have been cut to MAX_LINE.
        logging.getLogger("janus_hooks.hook").error("VM %s: %s failed: %s", vm, " ".join(phase), err)
        print(line, file=stderr)
        _remember_failure(root, vm, phase, line)
        return 0 if phase == RECONNECT else 1
    except Exception as err:  # noqa: BLE001 - one line for libvirt, the traceback for the log
        logging.getLogger("janus_hooks.hook").exception("VM %s: %s failed", vm, " ".join(phase))
        # Never the exception's text: it may hold the document libvirt sent (megabytes of XML).
        log_file = os.path.join(root, "var/log/janus-hooks/hook.log")
        line = one_line(f"janus-hooks: VM {_token(vm)}: internal error ({type(err).__name__}); details in {log_file}")
        print(line, file=stderr)
        _remember_failure(root, vm, phase, line)
        return 0 if phase == RECONNECT else 1
    return 0


def _remember_failure(root: str, vm: str, phase: tuple[str, str], line: str) -> None:
    """A refused or failed start, kept for ``status`` and the agent: in single-GPU mode nobody saw libvirt's error."""
    if phase != PREPARE:
        return
    import logging

    from janus_hooks.errors import JanusError
    from janus_hooks.failures import FailureStore
    from janus_hooks.host import Host

    try:
        FailureStore(Host(root).state_dir()).record(vm, line)
    except (OSError, JanusError) as err:  # the start is refused either way; the record is a courtesy
        logging.getLogger("janus_hooks.hook").warning("VM %s: could not record the failed start: %s", vm, err)


def _forget_failure(root: str, vm: str) -> None:
    """The VM started: a failed start recorded before it is history (status and the agent stop showing it).

    One stat() when there is no record, whether the VM is managed or not (it may not be any more); stdin unread.
    """
    from janus_hooks.layout import STATE_DIR, failure_file

    if not os.path.exists(failure_file(root, vm)):
        return
    import logging
    import time
    from pathlib import Path

    from janus_hooks.errors import JanusError
    from janus_hooks.failures import FailureStore

    try:
        FailureStore(Path(root, STATE_DIR)).clear(vm, time.time())
    except (OSError, JanusError) as err:  # the VM runs either way; status keeps showing the old line
        logging.getLogger("janus_hooks.hook").warning("VM %s: could not clear its failed start: %s", vm, err)


# libvirt carries this line in its error and virt-manager shows it in a dialog: one line of at most 300
# characters. Messages are written to fit (input is quoted as tokens of at most 64 characters, the planner's
# refusals name the device, who holds it and one remedy, the rest goes to the log). A longer one (a failure
# and its failed rollback, each with its reason) keeps its head, which names the step and device, and its
# tail, which says what to run; the whole text is in the log file.
MAX_LINE = 300
TAIL = 140
CUT = " ... "


def one_line(text: str) -> str:
    """What libvirt shows: one line of at most MAX_LINE characters."""
    text = " | ".join(text.splitlines())
    if len(text) <= MAX_LINE:
        return text
    return text[: MAX_LINE - TAIL - len(CUT)] + CUT + text[-TAIL:]


def _token(vm: str) -> str:
    from janus_hooks.schema import quote

    return quote(vm)


def janus_log(message: str) -> None:
    import logging

    logging.getLogger("janus_hooks.hook").info("%s", message)
