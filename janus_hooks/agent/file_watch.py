"""Changes to janus-hooks' files through watchdog's inotify observer (never its polling one).

Directories are watched, not files: editors save by writing a new file and renaming it over the old one.
Each change only posts ``FilesChanged(kind)``; the agent coalesces bursts and re-reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from janus_hooks.agent.events import FilesChanged

log = logging.getLogger(__name__)

# Opening or reading a file changes nothing.
IGNORED = ("opened", "closed_no_write")


class _Handler(FileSystemEventHandler):
    def __init__(self, kind: str, post: Callable[[object], None]) -> None:
        self.kind = kind
        self.post = post

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in IGNORED:
            self.post(FilesChanged(self.kind))


class FileWatch:
    def __init__(self, post: Callable[[object], None]) -> None:
        self.post = post
        self._observer = Observer()
        self.watched: dict[str, Path] = {}

    def add(self, kind: str, directory: Path, recursive: bool = False) -> bool:
        """Watch ``directory`` (absent: not watched, and said so)."""
        if not directory.is_dir():
            log.info("files: %s does not exist; %s changes are not followed", directory, kind)
            return False
        self._observer.schedule(_Handler(kind, self.post), str(directory), recursive=recursive)
        self.watched[kind] = directory
        return True

    def start(self) -> None:
        self._observer.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._observer.is_alive():
            self._observer.stop()
            self._observer.join(timeout)
