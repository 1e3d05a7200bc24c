"""Facts about live processes, read from /proc. A process is identified by ``(pid, start
time)``, never by pid alone: pids are reused."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterator
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


# PF_KTHREAD, in the flags field of /proc/PID/stat (include/linux/sched.h).
_PF_KTHREAD = 0x00200000
# How torpor's own processes are started: the CLI (``python -m torpor``, ``torpor-py``, the
# native launcher ``torpor``), the agent, a self-dump's detached finaliser. Keepers and
# checkpointers are forks of these and keep their command lines.
_OWN_MODULES = ("torpor", "torpor._agent", "torpor._process._selfdump")
_OWN_PROGRAMS = ("torpor", "torpor-py")


def command_name(pid: int) -> str:
    """The kernel's short name of ``pid`` (``/proc/PID/comm``; empty if there is none)."""
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def is_kernel_thread(pid: int) -> bool:
    """Whether ``pid`` is a kernel thread: ``PF_KTHREAD`` in its flags, or a live process
    without an executable (``/proc/PID/exe``)."""
    st = stat_fields(pid)
    if st is None:
        return False
    if int(st[6]) & _PF_KTHREAD:
        return True
    try:
        os.readlink(f"/proc/{pid}/exe")
    except FileNotFoundError:
        return running(pid)  # a zombie has no executable either
    except OSError:
        return False
    return False


def ancestors(pid: int) -> Iterator[int]:
    """The host pids of the parents of ``pid``, nearest first, up to (and with) pid 1."""
    seen = {pid}
    parent = parent_pid(pid)
    while parent and parent not in seen:
        yield parent
        seen.add(parent)
        parent = parent_pid(parent)


def torpor_role(pid: int) -> str | None:
    """What ``pid`` is if it is one of torpor's own processes (``a torpor keeper``, ``a torpor
    process``), else None: it holds the socket of a keeper with its pid, or its command line
    runs torpor's CLI, agent or finaliser."""
    if holds_unix_socket(pid, f"@torpor-keeper-{pid}"):
        return "a torpor keeper"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return None
    return "a torpor process" if argv and _runs_torpor(argv) else None


def _runs_torpor(argv: list[str]) -> bool:
    if os.path.basename(argv[0]) in _OWN_PROGRAMS:
        return True
    args = iter(argv[1:])
    for arg in args:  # an interpreter's options, then a module or a script
        if arg == "-m":
            module = next(args, "")
            return module in _OWN_MODULES
        if arg in ("-c", "-"):
            return False
        if arg in ("-X", "-W", "-Q"):
            next(args, None)
            continue
        if arg.startswith("-"):
            continue
        return os.path.basename(arg) in _OWN_PROGRAMS
    return False


def start_time(pid: int) -> int | None:
    """The start time (clock ticks since boot) of process ``pid``, or None if there is none."""
    st = stat_fields(pid)
    return int(st[19]) if st is not None else None


def running(pid: int) -> bool:
    """Whether ``pid`` exists and has not ended (a zombie has ended)."""
    st = stat_fields(pid)
    return st is not None and st[0] not in ("Z", "X")


def descendants(root: int | str) -> Iterator[int]:
    """Every descendant of ``root`` (a pid, or ``"self"``), parents before their children.

    Read from /proc/PID/task/*/children as the walk goes; processes that end meanwhile are
    skipped.
    """
    todo = [str(root)]
    while todo:
        pid = todo.pop()
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as fh:
                    kids = fh.read().split()
            except OSError:
                continue
            for kid in kids:
                yield int(kid)
                todo.append(kid)


def facts(pid: int) -> tuple[tuple[str, ...], int]:
    """The command line of ``pid`` and the RSS in bytes of the tree rooted at it."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = tuple(a.decode(errors="replace") for a in fh.read().split(b"\0") if a)
    except OSError:
        cmdline = ()
    page = os.sysconf("SC_PAGE_SIZE")
    rss = 0
    for p in (pid, *descendants(pid)):
        try:
            with open(f"/proc/{p}/statm", encoding="ascii") as fh:
                rss += int(fh.read().split()[1]) * page
        except OSError:
            continue
    return cmdline, rss


def host_pid() -> int:
    """Our pid as the host sees it (/proc is the host's mount even inside a PID namespace)."""
    return int(os.readlink("/proc/self"))


def status_field(name: str, pid: int | str = "self") -> list[str]:
    """The values of field ``name`` in /proc/PID/status (empty if absent; ``OSError`` if
    there is no such process)."""
    prefix = f"{name}:"
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
        for line in fh:
            if line.startswith(prefix):
                return line.split()[1:]
    return []


def host_ppid() -> int:
    """Our parent's host pid (``getppid()`` is 0 for a PID namespace's init)."""
    values = status_field("PPid")
    return int(values[0]) if values else 0


def is_namespace_init(pid: int | str = "self") -> bool:
    """Whether ``pid`` (we, by default) is pid 1 of a PID namespace other than the host's."""
    pids = status_field("NSpid", pid)
    return len(pids) > 1 and pids[-1] == "1"


def parent_pid(pid: int) -> int | None:
    """The host pid of the parent of ``pid`` (None if there is no such process)."""
    st = stat_fields(pid)
    return int(st[1]) if st is not None else None


def signal_mask(pid: int, field: str) -> int:
    """A signal set of ``pid`` from /proc/PID/status (``SigCgt`` caught, ``SigIgn`` ignored,
    ``SigBlk`` blocked by its main thread) as a bit mask: bit ``n - 1`` is signal ``n``."""
    values = status_field(field, pid)
    return int(values[0], 16) if values else 0


def holds_unix_socket(pid: int, address: str) -> bool:
    """Whether ``pid`` has open a unix socket bound to ``address`` (a path, or ``@name`` for
    an abstract one, as /proc/net/unix spells it).

    Anyone may bind a free abstract name, but not put the socket among another process's
    fds: this tells a real torpor keeper or agent from a process that only has its pid.
    """
    inodes: set[str] = set()
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as fh:
            next(fh, None)  # the header
            for line in fh:
                # Num RefCount Protocol Flags Type St Inode Path (a path may hold spaces)
                parts = line.rstrip("\n").split(None, 7)
                if len(parts) == 8 and parts[7] == address:
                    inodes.add(parts[6])
    except OSError:
        return False
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            return True
    return False


def start_seconds_ago(r: ProcRef) -> float:
    """How long ago the process started, in seconds."""
    ticks = os.sysconf("SC_CLK_TCK")
    with open("/proc/uptime", encoding="ascii") as fh:
        uptime = float(fh.read().split()[0])
    return max(0.0, uptime - r.start_time / ticks)


def detached(run: Callable[[], object]) -> None:
    """Run ``run`` in a new process that is not our child: double fork + ``setsid``, so init
    adopts it (we never collect it as a zombie, and it is outside our process tree — CRIU
    refuses to run inside a tree it dumps). Returns once the intermediate child has exited;
    ``run`` must not return to its caller in the grandchild (it is ended with ``_exit``)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child side; exercised by the integration tests
        try:
            os.setsid()
            if os.fork() == 0:
                run()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


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
