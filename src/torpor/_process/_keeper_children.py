"""What a keeper does to its child processes that needs none of its state.

Its children are the apps it started (``run``: pid 1 of a new PID namespace, exec'd by
:func:`exec_app` in the forked child) and the copies CRIU restored as its children
(``restore``, ``rst_sibling``): their start times (read before they are reaped, so a zombie
still has one), continuing a tree restored stopped, killing one.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Sequence

from .._errors import TorporError
from . import _proc


def continue_tree(root: int) -> None:
    """SIGCONT every process of the tree rooted at ``root`` (it was restored stopped).

    SIGCONT resumes even a PID namespace's init, which ignores most signals from outside.
    """
    for pid in (root, *_proc.descendants(root)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def kill(pid: int) -> None:
    """SIGKILL our child ``pid`` (not yet reaped, so its pid is not reused), if it runs."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def own_children() -> set[int]:
    """The pids of this process's children (those of any of its threads)."""
    kids: set[int] = set()
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:  # pragma: no cover - /proc is mounted wherever torpor runs
        return kids
    for tid in tids:
        with (
            contextlib.suppress(OSError, ValueError),
            open(f"/proc/self/task/{tid}/children", encoding="ascii") as fh,
        ):
            kids.update(int(k) for k in fh.read().split())
    return kids


def in_other_pid_ns(pid: int) -> bool:
    """Whether ``pid`` (our child) lives in another PID namespace than ours: an app tree
    (each is pid 1 of a namespace of its own), not a CRIU or helper process of ours."""
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino != os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return False


def kill_unadopted(pid: int) -> None:
    """SIGKILL and reap ``pid`` if it is a child of ours nobody reaps (a copy CRIU restored
    but did not finish): as our unreaped child its pid cannot have been reused."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return
    if ppid != os.getpid():
        return
    kill(pid)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, 0)


def child_start_time(pid: int) -> int:
    """The start time of our child ``pid``, which may have ended already (then a zombie
    until reaped: its start time is still there)."""
    born = _proc.start_time(pid)
    if born is None:  # pragma: no cover - our unreaped child always has one
        raise TorporError(f"child {pid} vanished before it was reaped")
    return born


def exec_app(command: Sequence[str], name: str, log_fd: int | None, err_w: int) -> None:
    """In the forked app (pid 1 of its namespace): session, stdio, clean fds, exec."""
    try:
        os.setsid()
        # The app gets default dispositions, however the keeper was started: keepers ignore
        # SIGINT and SIGHUP, and Python ignores SIGPIPE and SIGXFSZ (as subprocess resets).
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDWR)
        out = log_fd if log_fd is not None else devnull
        os.dup2(devnull, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        keep = err_w
        os.closerange(3, keep)
        os.closerange(keep + 1, 1 << 16)
        env = dict(os.environ)
        env["TORPOR_MANAGED"] = name
        os.execvpe(command[0], list(command), env)
    except OSError as exc:
        os.write(err_w, f"cannot start {command[0]!r}: {exc.strerror}".encode())
    finally:
        os._exit(127)
