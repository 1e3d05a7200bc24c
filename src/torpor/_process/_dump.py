"""Checkpointing a process from outside (``torpor checkpoint PID`` without coordination)."""

from __future__ import annotations

import os
from pathlib import Path

from .._engine import CriuEngine, DumpOptions, criu_version
from .._errors import DumpError, PermissionDeniedError
from .._images import _manifest
from .._images._image import GrowingHasher, Image, staging
from . import _registry
from ._proc import facts, ref


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

    The image is staged and renamed into place only when complete. A failed dump leaves the
    process running and no image behind.
    """
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
    engine = engine or CriuEngine()
    cmdline, rss = facts(pid)
    version = criu_version()
    with staging(dest) as st:
        # The pages are hashed on the other core while CRIU writes them, not after.
        with GrowingHasher(st.path) as pages:
            engine.dump(pid, st.path, options)
            hashed = pages.entries()
        image = st.commit(
            lambda files: _manifest.build(
                name=name,
                pid=pid,
                files=files,
                criu_version=version,
                cmdline=cmdline,
                rss_bytes=rss,
                tcp_established=options.tcp_established,
                shell_job=options.shell_job,
            ),
            hashed,
        )
    if not options.leave_running:
        _registry.mark_checkpointed(target, image.path)
    return image
