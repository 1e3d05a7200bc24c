"""Checkpointing a process from outside (``torpor checkpoint PID`` without coordination)."""

from __future__ import annotations

import os
from pathlib import Path

from .._engine import CriuEngine, DumpOptions
from .._errors import DumpError, PermissionDeniedError
from .._images._image import Image
from ._checkpointer import Job, Outcome, run
from ._proc import ref


def terminal_fds(pid: int) -> list[str]:
    """``fd N -> /dev/pts/M`` for each terminal the process has open."""
    out: list[str] = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in sorted(fds, key=int):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(("/dev/pts/", "/dev/tty", "/dev/console", "/dev/ptmx")):
            out.append(f"fd {fd} -> {target}")
    return out


def checkpoint_pid(
    pid: int,
    dest: Path,
    options: DumpOptions,
    *,
    name: str,
    engine: CriuEngine | None = None,
) -> Image:
    """Dump the tree rooted at ``pid`` into a new image directory ``dest``.

    The dump and the commit run in a detached checkpointer (``_checkpointer``): the image is
    committed however the caller ends, once CRIU may have killed the process. A failed or
    aborted dump (a ``KeyboardInterrupt`` while CRIU writes) leaves the process running and no
    image behind; an image that could not be finished after the process was stopped is kept
    (:class:`~torpor._images._incomplete.IncompleteImageError` names it).
    """
    return checkpoint(pid, dest, options, name=name, engine=engine).image


def checkpoint(
    pid: int,
    dest: Path,
    options: DumpOptions,
    *,
    name: str,
    engine: CriuEngine | None = None,
) -> Outcome:
    """:func:`checkpoint_pid`, saying also whether an interruption came too late to abort."""
    if os.geteuid() != 0:
        raise PermissionDeniedError("checkpointing needs root (CRIU)", hint="run as root")
    target = ref(pid)
    ttys = terminal_fds(pid)
    if ttys and not options.shell_job:
        raise DumpError(
            f"pid {pid} holds a terminal ({ttys[0]}); a terminal cannot be restored elsewhere "
            "(nothing was done)",
            pid=pid,
            hint="start it with `torpor run` (stdio to a log file), or pass --shell-job to "
            "dump and restore it as a shell job",
        )
    return run(Job(target, Path(dest).absolute(), options, name), engine=engine)
