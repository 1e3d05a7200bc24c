"""Starting a daemon of this torpor home (the agent, the supervisor): a detached process (not
our child, in a session of its own, so it outlives the command and never becomes a zombie of a
long-lived caller) running ``argv`` with ``--ready-fd N`` added, its stdin ``/dev/null``, its
stdout and stderr appended to a log, no other file of the caller's open, and a umask that keeps
what it creates in the home its owner's only. It is ready when it writes ``ready\\n`` to that fd.
"""

from __future__ import annotations

import os
import select
import sys
from collections.abc import Mapping
from pathlib import Path

from ._proc import detached

READY = b"ready\n"


def start_daemon(argv: list[str], env: Mapping[str, str], log: Path, *, timeout: float) -> bool:
    """Start ``argv`` (run by this Python: ``argv[0]`` is its name) as a daemon, see the module
    docstring; whether it said it was ready within ``timeout`` seconds (if not, it failed or
    is still starting: its log says which)."""
    ready_r, ready_w = os.pipe()
    log_fd = os.open(
        log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    full = [*argv, "--ready-fd", str(ready_w)]
    environ = dict(env)

    def daemon() -> None:  # pragma: no cover - the daemon's side
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        # Nothing else the caller holds (a test runner's pipe, say) may stay open in a daemon.
        os.closerange(3, ready_w)
        os.closerange(ready_w + 1, 1 << 16)
        os.set_inheritable(ready_w, True)
        os.umask(0o077)
        os.execve(sys.executable, full, environ)

    try:
        detached(daemon)
    finally:
        os.close(ready_w)
        os.close(log_fd)
    try:
        readable, _, _ = select.select([ready_r], [], [], timeout)
        said = os.read(ready_r, 64) if readable else b""
    finally:
        os.close(ready_r)
    return said == READY


def last_line(log: Path) -> str:
    """The last non-blank line of the daemon's ``log`` (what it said before it failed), or
    ``no detail``."""
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    return lines[-1] if lines else "no detail"
