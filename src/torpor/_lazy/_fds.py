"""Another process's fds, as the lazy-pages code looks at them (``_daemon``, ``_sweep``): the
walk of ``/proc/<pid>/fd``, what a userfaultfd and a socket look like there, and
``pidfd_getfd(2)``."""

from __future__ import annotations

import contextlib
import ctypes
import os

UFFD_LINK = "anon_inode:[userfaultfd]"
SOCKET_LINK = "socket:["  # how a socket's fd link begins
_SYS_PIDFD_GETFD = 438  # x86_64 and the generic table alike


def links(pid: int) -> dict[int, str]:
    """Each fd of ``pid`` and what its link says (one closed meanwhile is left out); OSError
    if the fd table cannot be read."""
    base = f"/proc/{pid}/fd"
    found = {}
    for name in os.listdir(base):
        try:
            found[int(name)] = os.readlink(f"{base}/{name}")
        except FileNotFoundError:
            continue  # closed meanwhile
    return found


def uffds(pid: int) -> set[int]:
    """The fd numbers of ``pid`` that are userfaultfds (none if they cannot be read)."""
    with contextlib.suppress(OSError):
        return {fd for fd, link in links(pid).items() if link == UFFD_LINK}
    return set()


_libc = ctypes.CDLL(None, use_errno=True)


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """``pidfd_getfd(2)`` (Python 3.11 has no wrapper): a duplicate of another process's fd."""
    got = int(_libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0))
    if got < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    os.set_inheritable(got, False)
    return got
