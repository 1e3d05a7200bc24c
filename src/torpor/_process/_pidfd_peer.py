"""The process at the other end of a unix socket, held by a pidfd: read ``/proc/PID``, then verify.

``SO_PEERCRED``'s pid is a number taken when the peer connected (or listened). The peer may
exit since, be reaped, and its number be handed to another process (a root one, or one in
other namespaces) before root reads ``/proc/PID``: what is read is then that process's. Its
uid and gid are sound (the kernel took them with the pid); anything read from ``/proc`` is not.

:class:`PeerProcess` holds the peer by ``SO_PEERPIDFD`` (Linux 6.5), which names the very
process the socket's credentials were taken from. Its pid is the one that pidfd has in the
pid namespace of our ``/proc`` (the one ``/proc/PID`` paths are read in). Whatever is read
about it from ``/proc/PID`` is trusted only once :meth:`PeerProcess.verified` has seen the
pidfd still name a process that is not reaped: a pid is handed out again only after its
process is reaped, so while the peer is not, ``/proc/PID`` was the peer's when it was read.

Before Linux 6.5 there is no ``SO_PEERPIDFD`` and nothing here works: every caller refuses the
peer (fails closed) with a one-line error saying so; a pid alone cannot be made sound.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

T = TypeVar("T")

# Linux's SO_PEERPIDFD (6.5; Python 3.11 has no constant for it).
SO_PEERPIDFD = 77


class PeerGone(Exception):
    """The peer cannot be held by a pidfd, or was reaped before what was read of it was
    verified (the default error; callers pass their own)."""


class PeerProcess:
    """The process at the other end of ``conn``, held by a pidfd (``SO_PEERPIDFD``).

    ``what`` names the peer in errors ("the client process"); ``error`` makes the exception
    raised (from the ``OSError``/``ValueError`` behind it) when the peer cannot be held, is not
    in our pid namespace, or has exited. A context manager: the pidfd is closed at the end.
    """

    def __init__(
        self,
        conn: socket.socket,
        *,
        what: str = "the peer process",
        error: Callable[[str], Exception] = PeerGone,
    ) -> None:
        self._what = what
        self._error = error
        try:
            self.pidfd: int = conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
        except OSError as exc:  # ENOPROTOOPT before Linux 6.5; ESRCH: the peer is gone
            raise error(f"cannot hold {what} (SO_PEERPIDFD, Linux 6.5): {exc}") from exc
        try:
            os.set_inheritable(self.pidfd, False)
            self.pid: int = pidfd_pid(self.pidfd)
        except (OSError, ValueError) as exc:
            os.close(self.pidfd)
            raise error(f"cannot identify {what}: {exc}") from exc

    def verified(self, value: T) -> T:
        """``value`` (read from ``/proc/PID`` before this call) if the peer is not reaped yet:
        then that pid was the peer's when it was read. Else the error."""
        try:
            signal.pidfd_send_signal(self.pidfd, 0)
        except OSError as exc:
            raise self._error(f"{self._what} exited before it could be checked: {exc}") from exc
        return value

    def close(self) -> None:
        """Let the process go (idempotent)."""
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def pidfd_pid(pidfd: int) -> int:
    """The pid (in our ``/proc``'s pid namespace) of the process ``pidfd`` names; ValueError if
    it has been reaped (-1) or is not visible here (0)."""
    with open(f"/proc/self/fdinfo/{pidfd}", encoding="ascii") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key == "Pid":
                pid = int(value)
                if pid <= 0:
                    raise ValueError("it has exited" if pid < 0 else "not in our pid namespace")
                return pid
    raise ValueError("no Pid in the pidfd's fdinfo")
