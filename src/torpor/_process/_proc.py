"""Facts about live processes, read from /proc. A process is identified by ``(pid, start
time)``, never by pid alone: pids are reused."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from .._errors import ProcessNotFoundError

CLONE_NEWPID = 0x20000000


@dataclass(frozen=True)
class ProcRef:
    """A process identity: host pid plus its start time in clock ticks since boot."""

    pid: int
    start_time: int

    def alive(self) -> bool:
        """Whether this very process still exists (and is not a zombie)."""
        st = stat_fields(self.pid)
        return st is not None and int(st[19]) == self.start_time and st[0] != "Z"


def stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (``state`` is index 0), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            data = fh.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2 :].split()


def ref(pid: int) -> ProcRef:
    """The identity of the live process ``pid``; :class:`ProcessNotFoundError` if none."""
    st = stat_fields(pid)
    if st is None or st[0] in ("Z", "X"):
        raise ProcessNotFoundError(
            f"no process with pid {pid}", pid=pid, hint="`torpor ps` lists managed processes"
        )
    return ProcRef(pid, int(st[19]))


def host_pid() -> int:
    """Our pid as the host sees it (/proc is the host's mount even inside a PID namespace)."""
    return int(os.readlink("/proc/self"))


def host_ppid() -> int:
    """Our parent's host pid (``getppid()`` is 0 for a PID namespace's init)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("PPid:"):
                return int(line.split()[1])
    return 0


def is_namespace_init() -> bool:
    """Whether we are pid 1 of a PID namespace other than the host's."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("NSpid:"):
                pids = line.split()[1:]
                return len(pids) > 1 and pids[-1] == "1"
    return False


def has_terminal(pid: int) -> bool:
    """Whether the process has a controlling terminal (tty_nr in /proc/PID/stat)."""
    st = stat_fields(pid)
    return st is not None and int(st[4]) != 0


def start_seconds_ago(r: ProcRef) -> float:
    """How long ago the process started, in seconds."""
    ticks = os.sysconf("SC_CLK_TCK")
    with open("/proc/uptime", encoding="ascii") as fh:
        uptime = float(fh.read().split()[0])
    return max(0.0, uptime - r.start_time / ticks)


def unshare(flags: int) -> None:
    """``unshare(2)`` (Python 3.11's os module does not have it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def setns(fd: int, nstype: int) -> None:
    """``setns(2)``."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def owner_uid(pid: int) -> int:
    """The real uid of a process."""
    return os.stat(f"/proc/{pid}").st_uid
