"""Dumps of processes sharing a working directory, one at a time.

CRIU's parasite, dumping a task whose /proc is not its own PID namespace's (every app
``torpor run`` starts: pid 1 of its own namespace), mounts a /proc for it at ``proc.crtools``
*relative to the task's working directory* (pie/parasite.c, ``get_proc_fd``: mkdir, mount,
detach, rmdir). Two dumps at once of processes with the same working directory collide there:
the second fails with ``Can't create a directory (-17)``. :func:`held` takes an exclusive
``flock`` per working directory of the tree, in ``/run/torpor/dump-locks`` (shared by every
torpor home of the host: the directory is the host's), sorted so two dumps never deadlock.
Under each lock, an empty ``proc.crtools`` there (left by a CRIU killed mid-dump) is removed.

The lock is an optimisation of safety, not a boundary: where the lock directory cannot be had
safely (not root, or it is not a root-owned 0700 directory) the dump goes on without it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

LOCK_DIR = Path("/run/torpor/dump-locks")
_MAX_TASKS = 4096  # processes of one tree looked at


PARASITE_PROC = "proc.crtools"  # where CRIU's parasite mounts a /proc (see the docstring)


def tree_cwds(root: int) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of the working directory of every process of the tree at ``root``
    (those that can be read: a process that ended meanwhile is skipped)."""
    return set(_tree_cwds(root))


def _tree_cwds(root: int) -> dict[tuple[int, int], int]:
    """:func:`tree_cwds`, each with a process of the tree working in it."""
    seen: set[int] = set()
    todo = [root]
    out: dict[tuple[int, int], int] = {}
    while todo and len(seen) < _MAX_TASKS:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        with contextlib.suppress(OSError):
            st = os.stat(f"/proc/{pid}/cwd")
            out.setdefault((st.st_dev, st.st_ino), pid)
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                    todo.extend(int(c) for c in f.read().split())
    return out


def _lock_dir() -> int | None:
    """An fd of the lock directory, made if missing; None where it cannot be had safely."""
    if os.geteuid() != 0:
        return None
    with contextlib.suppress(FileExistsError, OSError):
        os.makedirs(LOCK_DIR.parent, mode=0o755, exist_ok=True)
        os.mkdir(LOCK_DIR, 0o700)
    try:
        fd = os.open(LOCK_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    st = os.fstat(fd)
    if st.st_uid != 0 or stat.S_IMODE(st.st_mode) & 0o077:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def held(root: int) -> Iterator[int]:
    """Hold the dump locks of the working directories of ``root``'s tree; how many."""
    cwds = _tree_cwds(root)
    keys = sorted(cwds)
    dir_fd = _lock_dir() if keys else None
    fds: list[int] = []
    try:
        if dir_fd is not None:
            for dev, ino in keys:
                name = f"cwd-{dev}-{ino}"
                flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                try:
                    fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
                except OSError:
                    continue
                fds.append(fd)
                fcntl.flock(fd, fcntl.LOCK_EX)
                _drop_leftover(cwds[(dev, ino)], (dev, ino))
        yield len(fds)
    finally:
        for fd in fds:
            os.close(fd)  # the lock goes with it
        if dir_fd is not None:
            os.close(dir_fd)


def _drop_leftover(pid: int, key: tuple[int, int]) -> None:
    """Remove an empty ``proc.crtools`` from the working directory ``key`` of ``pid``, left
    by a CRIU killed between its parasite's mkdir and rmdir: every later dump of a process
    working there would fail (``Can't create a directory (-17)``). Only with that directory's
    lock held (no dump of ours is using it), only an empty directory (rmdir: never a
    symlink, a mount point or anything with content), and only the directory the process
    still works in."""
    with contextlib.suppress(OSError):
        fd = os.open(f"/proc/{pid}/cwd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == key:
                os.rmdir(PARASITE_PROC, dir_fd=fd)
        finally:
            os.close(fd)
