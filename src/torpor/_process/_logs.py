"""Log files of managed processes: where their stdout and stderr go.

``torpor run`` appends an app's output to ``<home>/logs/NAME.log`` (or a ``--log`` the user
chose); each copy ``torpor restore`` brings back appends to its own ``<home>/logs/NAME.log``
(CRIU's ``inherit_fd`` puts the new file where the image had the original's), so copies never
write into the original's log, nor into each other's.

An inherited fd must be in CRIU's own fd table, so it has to be there when ``criu swrk`` starts.
An agent worker starts its CRIU before it knows what it will restore, so it also makes a
:class:`SpareLog` that it gives that CRIU: a file under a name of its own in the logs directory.
The first copy of a restore logs to it, renamed as that copy's log (:meth:`SpareLog.claim`), and
the worker's warm CRIU restores it. An unused spare is removed; one whose worker was killed is
removed by the next worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

from .. import _paths, _safe
from .._errors import TorporError, UnsafePathError
from ._proc import ProcRef, start_time


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


# A spare log's name: its worker's pid and start time (a name left by a killed worker is
# recognised as such and removed).
_SPARE = re.compile(r"\.spare-([0-9]+)-([0-9]+)\.log")
_RENAME_NOREPLACE = 1


class SpareLog:
    """A log file made before anyone knows whose log it will be: created 0600 (``O_EXCL``,
    relative to the logs directory's fd) under a name of its own, ``.spare-PID-START.log``,
    opened write-only and appending. :meth:`claim` renames it to a log's name once one is known;
    :meth:`close` removes it if nobody did.

    A renamed file, not a linked one, because the open file keeps the name it was opened
    under: an unnamed (``O_TMPFILE``) file linked into place shows as ``#INODE (deleted)`` in
    the restored process's ``/proc/PID/fd``, and CRIU then cannot checkpoint that process
    ("Can't create link remap").

    :attr:`fd` is ours to hand on at spawn (``pass_fds``: the child gets it at the same
    number) and ours to close (:meth:`close`).
    """

    def __init__(self, fd: int, logs: Path, name: str, rename: Callable[[int, str, str], None]):
        self.fd = fd
        self.logs = logs  # where it was made: it can only be renamed there
        self._name: str | None = name  # None once claimed: no longer ours to remove
        self._rename = rename

    @classmethod
    def make(cls) -> SpareLog | None:
        """A spare log in ``<home>/logs``, or None if there cannot be one (the logs directory
        unusable, no ``renameat2``): restores then open logs as they go. Spare logs that
        workers killed before they could remove them left behind are removed first."""
        rename = _rename_noreplace()
        me = os.getpid()
        born = start_time(me)
        if rename is None or born is None:
            return None
        name = f".spare-{me}-{born}.log"
        try:
            logs = _paths.logs_dir()
            dir_fd = _safe.open_dir(logs)
            try:
                _safe.check_private(logs, what="logs directory", fd=dir_fd)
                _sweep(dir_fd)
                fd = _safe.create_file(dir_fd, name, source=str(logs))
                try:
                    os.fchmod(fd, 0o600)  # as the umask left it otherwise
                    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
                except BaseException:
                    os.unlink(name, dir_fd=dir_fd)
                    os.close(fd)
                    raise
            finally:
                os.close(dir_fd)
        except (OSError, TorporError):
            return None
        return cls(fd, logs, name, rename)

    def claim(self, path: Path) -> bool:
        """Rename the spare to ``path``, a log in the logs directory it was made in, unless
        something has that name already (``RENAME_NOREPLACE``: nothing there is followed or
        replaced). False if it was claimed already, ``path`` is elsewhere, the name is taken
        or the spare is no longer where it was made: the caller then opens the log with
        :func:`open_log` (which appends to an earlier log of that name, or refuses what was
        planted there)."""
        if self._name is None or self.fd < 0 or path.parent != self.logs:
            return False
        try:
            dir_fd = _safe.open_dir(self.logs)
            try:
                _safe.check_private(self.logs, what="logs directory", fd=dir_fd)
                _safe.check_name(path.name, source=str(self.logs))
                if not _same_file(self.fd, dir_fd, self._name):
                    return False
                self._rename(dir_fd, self._name, path.name)
            finally:
                os.close(dir_fd)
        except (OSError, TorporError):
            return False
        self._name = None
        return True

    def close(self) -> None:
        """Close our fd of it, removing it first if it was never claimed (idempotent)."""
        if self.fd < 0:
            return
        if self._name is not None:
            with contextlib.suppress(OSError):
                dir_fd = _safe.open_dir(self.logs)
                try:
                    if _same_file(self.fd, dir_fd, self._name):
                        os.unlink(self._name, dir_fd=dir_fd)
                finally:
                    os.close(dir_fd)
            self._name = None
        os.close(self.fd)
        self.fd = -1


def _same_file(fd: int, dir_fd: int, name: str) -> bool:
    """Whether ``name`` in ``dir_fd`` is (still) the file open as ``fd``."""
    ours = os.fstat(fd)
    there = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    return (there.st_dev, there.st_ino) == (ours.st_dev, ours.st_ino)


def _sweep(dir_fd: int) -> None:
    """Remove the spare logs of workers that are gone."""
    with os.scandir(dir_fd) as entries:
        names = [e.name for e in entries if _SPARE.fullmatch(e.name)]
    for name in names:
        m = _SPARE.fullmatch(name)
        assert m is not None
        if not ProcRef(int(m[1]), int(m[2])).alive():
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dir_fd)


@functools.cache
def _rename_noreplace() -> Callable[[int, str, str], None] | None:
    """``renameat2(dir_fd, old, dir_fd, new, RENAME_NOREPLACE)``, or None without it (a C
    library older than glibc 2.28)."""
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        fn = libc.renameat2
    except AttributeError:
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def rename(dir_fd: int, old: str, new: str) -> None:
        if fn(dir_fd, os.fsencode(old), dir_fd, os.fsencode(new), _RENAME_NOREPLACE) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), new)

    return rename
