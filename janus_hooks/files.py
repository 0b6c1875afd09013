"""Safe handling of janus-hooks' own files: private directories, trusted inputs, atomic writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from janus_hooks.errors import UnsafeStateError


def trusted_owner(uid: int) -> bool:
    """root in production; the user running the tests on a temporary host tree."""
    return uid in (0, os.geteuid())


def check_trusted(path: Path) -> None:
    """Refuse a file or directory that someone other than its owner (root) could change."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeStateError(f"{path} is a symbolic link; refusing to follow it")
    if not trusted_owner(st.st_uid):
        raise UnsafeStateError(f"{path} is owned by uid {st.st_uid}, not root; refusing to use it")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeStateError(
            f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); refusing to use it"
        )


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` as a 0700 directory, or check that the existing one is private and ours."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeStateError(f"{path} is a symbolic link; refusing to keep state where it points")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeStateError(f"{path} is not a directory; refusing to keep state there")
    if not trusted_owner(st.st_uid):
        raise UnsafeStateError(f"{path} is owned by uid {st.st_uid}, not root; refusing to keep state there")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise UnsafeStateError(
            f"{path} has mode {stat.S_IMODE(st.st_mode):o}, others can read or change it; expected 700"
        )
    return path


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a whole file or nothing: temp file in the same directory, fsync, rename, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.janus-new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
