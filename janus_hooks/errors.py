"""One exception family: every message names the device, path, unit or VM it is about."""


class JanusError(Exception):
    """Base of every error janus-hooks reports to a person."""


class ConfigError(JanusError):
    """A config file, profile or domain XML that cannot be used as it is."""


class UnsafeStateError(JanusError):
    """A state directory, journal or config that someone other than root could change."""


class PlanRefused(JanusError):
    """The planner will not switch this VM's devices; the message says why."""


class StepFailed(JanusError):
    """One action could not be applied or verified."""


class KernelError(StepFailed):
    """A sysfs write or a module operation that the kernel refused; ``errno`` says how, when known."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class KernelTimeout(KernelError):
    """A kernel write (or modprobe) that did not finish by its deadline and cannot be cancelled: it goes on in
    process ``pid`` and completes when whatever it waits for (an open device file) lets go."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


class CommandFailed(StepFailed):
    """An external command (systemctl, modprobe, loginctl) failed or timed out."""


class CommandStuck(CommandFailed):
    """A command past its deadline that even SIGKILL did not end (it sleeps in the kernel): still ``pid``."""

    def __init__(self, message: str, pid: int) -> None:
        super().__init__(message)
        self.pid = pid


class JournalError(JanusError):
    """A journal that cannot be read, written or locked."""


class LockBusy(JournalError):
    """Another transition (a hook, a rollback) holds the host-wide lock."""
