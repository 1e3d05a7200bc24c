"""Log files of managed processes: where their stdout and stderr go.

``torpor run`` appends an app's output to ``<home>/logs/NAME.log`` (or a ``--log`` the user
chose); each copy ``torpor restore`` brings back appends to its own ``<home>/logs/NAME.log``
(CRIU's ``inherit_fd`` puts the new file where the image had the original's), so copies never
write into the original's log, nor into each other's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from .. import _paths, _safe
from .._errors import TorporError, UnsafePathError


def open_log(path: Path) -> int:
    """``path`` opened for appending (created 0600), for a managed process's stdout and
    stderr. One in the logs directory is opened relative to it with ``O_NOFOLLOW`` and must be
    a regular file of ours that no one else can write (a log planted there is refused)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
    logs = _paths.logs_dir()
    try:
        if path.parent != logs:  # a --log the user chose: opened as asked
            return os.open(path, flags, 0o600)
        dir_fd = _safe.open_dir(logs)
        try:
            _safe.check_private(logs, what="logs directory", fd=dir_fd)
            _safe.check_name(path.name, source=str(logs))
            try:
                fd = os.open(path.name, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600, dir_fd=dir_fd)
            except OSError as exc:
                # A symlink (ELOOP), a FIFO without a reader (ENXIO), a directory...: say what.
                with contextlib.suppress(OSError):
                    st = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
                    planted = _safe.kind_problem(st.st_mode)
                    if planted == "a symlink":
                        raise _unsafe_log(path, "is a symlink") from exc
                    if planted is not None:
                        raise _unsafe_log(path, f"is {planted}, not a regular file") from exc
                raise
        finally:
            os.close(dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # the disk, not the path, is at fault
            from .._images._incomplete import mount_point, no_space

            raise TorporError(
                f"cannot open log {path}: {no_space(path.parent)}",
                hint=f"free space on {mount_point(path.parent)}",
            ) from exc
        raise TorporError(
            f"cannot open log {path}: {exc.strerror or exc}",
            hint="give --log a file in a directory that exists, or --no-log",
        ) from exc
    try:
        st = os.fstat(fd)
        kind = _safe.kind_problem(st.st_mode)
        problem = f"is {kind}, not a regular file" if kind else _safe.owner_problem(st)
        if problem is None and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            problem = "is writable by group or others"
        if problem is not None:
            raise _unsafe_log(path, problem)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unsafe_log(path: Path, problem: str) -> UnsafePathError:
    return UnsafePathError(
        f"log {path} {problem}; refused", path=path, hint=f"torpor did not make it: remove {path}"
    )
