"""The hook's log file: appended to, bounded in size, rotated the way logging.handlers rotates.

Not ``logging.handlers.RotatingFileHandler`` itself: importing ``logging.handlers`` loads socket, pickle,
queue and struct, which every managed start and release would pay for one small class.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from janus_hooks.schema import Schema, pattern

LOG_LEVELS = ("debug", "info", "warning", "error")
# janus.toml's top-level keys: the level of this log (janus_hooks.config collects them; the value is read
# lower-cased).
TOP_LEVEL_KEYS: Schema = {"log_level": pattern("|".join(LOG_LEVELS), "one of " + ", ".join(LOG_LEVELS))}


class RotatingLog(logging.FileHandler):
    """Appends to ``path``; a line that would take it to ``max_bytes`` first renames ``path`` to
    ``path.1`` (``path.1`` to ``path.2``, ..., dropping ``path.<backups>``) and starts a new file."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        super().__init__(path, mode="a")
        self.max_bytes = max_bytes
        self.backups = backups

    def _open(self):  # noqa: ANN202 - logging.FileHandler's own hook
        # O_NOFOLLOW: a symbolic link put in place of the log never sends root's lines elsewhere; 0600.
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self._full(record):
                self._rotate()
        except Exception:  # noqa: BLE001 - logging's own policy: a log failure never reaches the caller
            self.handleError(record)
            return
        super().emit(record)

    def _full(self, record: logging.LogRecord) -> bool:
        if self.stream is None:
            self.stream = self._open()
        self.stream.seek(0, os.SEEK_END)
        return self.stream.tell() + len(self.format(record)) + 1 >= self.max_bytes

    def _rotate(self) -> None:
        self.stream.close()
        self.stream = None
        for n in range(self.backups - 1, 0, -1):
            older = f"{self.baseFilename}.{n}"
            if os.path.exists(older):
                os.replace(older, f"{self.baseFilename}.{n + 1}")
        if self.backups > 0:
            os.replace(self.baseFilename, f"{self.baseFilename}.1")
        else:
            os.truncate(self.baseFilename, 0)
        self.stream = self._open()
