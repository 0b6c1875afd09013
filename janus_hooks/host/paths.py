"""Paths that root acts on, resolved one component at a time so that no one else can redirect them.

janus-hooks keeps journals, logs, the hook shim, units and rules below a host root (``/`` on a real host, a
staging tree in tests). A symbolic link on the way there is followed only when root owns it and it stays
below the root: ``/opt -> var/opt`` on an image-based distribution keeps working, ``var/lib -> /elsewhere``
in a staging tree, a ``..`` escape or a link a user planted does not. The same walk tells whether the code
root runs (interpreter, package) could be changed by someone else.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from janus_hooks.errors import UnsafeStateError
from janus_hooks.files import trusted_owner

# Linux gives up after 40 links in one lookup (ELOOP); so do we.
MAX_LINKS = 40


class _Escape(Exception):
    """A link that leads outside the root: (link, target)."""


def _walk(root: Path, rel: str, visit: Callable[[Path, os.stat_result], None]) -> Path:
    """``root/rel`` with every symbolic link resolved as the kernel would, never above ``root``.

    ``visit(path, lstat)`` sees each existing component before it is followed (and may raise). Components
    that do not exist (yet) are kept as they are: nothing below them can be a link.
    """
    real_root = PurePosixPath(os.path.realpath(root))
    roots = [r.parts for r in {real_root, PurePosixPath(os.path.abspath(root))}]
    top_is_root = real_root == PurePosixPath("/")
    todo = list(reversed(PurePosixPath(rel).parts))
    done: list[str] = []
    links = 0
    link: tuple[Path, str] | None = None
    while todo:
        part = todo.pop()
        if part in ("/", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            elif not top_is_root:  # the kernel stops at "/"; a staging root is no such stop
                raise _Escape(*(link or (root, rel)))
            continue
        path = root.joinpath(*done, part)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            done.append(part)
            continue
        visit(path, st)
        if not stat.S_ISLNK(st.st_mode):
            done.append(part)
            continue
        links += 1
        target = os.readlink(path)
        if links > MAX_LINKS:
            raise UnsafeStateError(f"{path}: more than {MAX_LINKS} symbolic links on the way; refusing to follow")
        link = (path, target)
        parts = PurePosixPath(target).parts
        if parts[:1] == ("/",):
            inside = next((parts[len(r):] for r in roots if parts[: len(r)] == r), None)
            if inside is None:
                raise _Escape(path, target)
            done, parts = [], inside
        todo.extend(reversed(parts))
    return root.joinpath(*done)


def resolve_beneath(root: str | os.PathLike[str], rel: str) -> Path:
    """``root/rel`` resolved: only root-owned links that stay below ``root`` are followed; anything else
    raises ``UnsafeStateError`` naming the path and the link."""
    root = Path(root)
    wanted = root / rel

    def visit(path: Path, st: os.stat_result) -> None:
        if stat.S_ISLNK(st.st_mode) and not trusted_owner(st.st_uid):
            raise UnsafeStateError(f"{wanted}: {path} is a symbolic link owned by uid {st.st_uid}, not root; "
                                   "refusing to follow it")

    try:
        return _walk(root, rel, visit)
    except _Escape as esc:
        link, target = esc.args
        raise UnsafeStateError(f"{wanted}: {link} is a symbolic link to {target}, which leads outside {root}; "
                               "refusing to follow it") from None


def others_can_change(path: str | os.PathLike[str]) -> str | None:
    """Why someone other than root could change what ``path`` is (None: only root can).

    Checks ``/`` and every component on the way, through every link: owned by root, and writable by neither
    group nor others, except a sticky directory (``/tmp``), where others cannot replace root's entries."""
    problem: list[str] = []

    def visit(entry: Path, st: os.stat_result) -> None:
        found = None if problem else _entry_problem(entry, st)
        if found:
            problem.append(found)

    visit(Path("/"), os.lstat("/"))
    _walk(Path("/"), os.path.abspath(path), visit)
    return problem[0] if problem else None


def tree_others_can_change(top: str | os.PathLike[str]) -> str | None:
    """``others_can_change`` for ``top`` and for everything below it (a package: any of its files)."""
    found = others_can_change(top)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in sorted(dirnames + filenames):
            if found:
                return found
            entry = Path(dirpath, name)
            st = entry.lstat()
            found = others_can_change(entry) if stat.S_ISLNK(st.st_mode) else _entry_problem(entry, st)
    return found


def _entry_problem(entry: Path, st: os.stat_result) -> str | None:
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != 0:
        return f"{entry} is owned by uid {st.st_uid}, not root"
    if stat.S_ISLNK(st.st_mode):
        return None  # a link's own mode means nothing; who may replace it is its directory's business
    if mode & (stat.S_IWGRP | stat.S_IWOTH) and not (stat.S_ISDIR(st.st_mode) and mode & stat.S_ISVTX):
        return f"{entry} is writable by {'others' if mode & stat.S_IWOTH else 'its group'} (mode {mode:o})"
    return None
