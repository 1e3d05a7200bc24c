"""How a migration server starts (``torpor agent run|start --listen ADDR:PORT``), before it
serves (:func:`._serve.serve`).

**One server per home.** The startup sweep (:func:`._serve_sweep._sweep`) removes what a
killed server of the home left: its journal of service addresses, its network lock, its
images in transit. Run while another server of the same home is restoring, it would take
that one's addresses and lock away mid-restore. So the server first takes the home's lock
(:func:`holding_home`, ``<home>/migrate-server.lock``) and keeps it for its life: a second
server is refused with a line naming the home and the server that runs. Then it binds
(:func:`listening`: an address in use is one line, not a traceback), and only then sweeps.

The lock is a POSIX record lock (``fcntl.lockf``), not ``flock``: it belongs to the server
process alone and is never inherited, so a keeper the server forked (which may outlive it
by days) cannot keep a dead server's home locked. It goes with the process, however it
ends; the file stays (its contents, the holder's pid and start time, only name it in the
refusal).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from .. import _paths
from .._errors import AlreadyExistsError, TorporError, UnsafePathError
from .._process._proc import ProcRef, start_time
from .._safe import open_dir, private_file_problem
from ._channel import Listener, listen

LOCK = "migrate-server.lock"
_MAX_LOCK = 256  # bytes of it read


@contextlib.contextmanager
def holding_home() -> Iterator[None]:
    """Hold this home's server lock (see the module docstring), this process named in it,
    for the ``with`` block (the server's life). :class:`AlreadyExistsError` if another
    server of the home holds it."""
    fd = _lock(write=True)
    try:
        yield
    finally:
        os.close(fd)


def check_home_free() -> None:
    """:class:`AlreadyExistsError` if a server of this home runs (for ``agent start``, whose
    server would only say so in its log); the lock is let go at once."""
    os.close(_lock(write=False))


def _lock(*, write: bool) -> int:
    home = _paths.home()
    path = home / LOCK
    home_fd = open_dir(home)
    try:
        # Non-blocking: a FIFO planted under the name must not hang the open (fstat refuses it).
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        fd = os.open(LOCK, flags, 0o600, dir_fd=home_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(
                f"{path} is a symlink", path=path, hint="remove it (the server makes its own)"
            ) from exc
        raise TorporError(f"cannot open {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(home_fd)
    try:
        problem = private_file_problem(os.fstat(fd))
        if problem is not None:
            raise UnsafePathError(
                f"{path} {problem}", path=path, hint="remove it (the server makes its own)"
            )
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise TorporError(f"cannot lock {path}: {exc.strerror or exc}") from exc
            holder = _holder(fd)
            who = f" (pid {holder})" if holder is not None else ""
            stop = f"stop it first (kill {holder})" if holder is not None else "stop it first"
            raise AlreadyExistsError(
                f"a migration server{who} already serves {home}",
                hint=f"{stop}, or give this one a home of its own (TORPOR_HOME)",
            ) from exc
        if write:
            me = os.getpid()
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps([me, start_time(me)]).encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _holder(fd: int) -> int | None:
    """The pid the lock file names, if that process (pid and start time) still runs."""
    try:
        owner = json.loads(os.pread(fd, _MAX_LOCK, 0))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(owner, list) or len(owner) != 2:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in owner):
        return None
    pid, start = owner
    return pid if 0 < pid < 1 << 31 and ProcRef(pid, start).alive() else None


@contextlib.contextmanager
def listening(addr: str, port: int) -> Iterator[Listener]:
    """:func:`._channel.listen` on ``addr:port``, a failure to bind as one line."""
    where = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
    try:
        lst = listen(addr, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise TorporError(
                f"cannot listen on {where}: the address is in use",
                hint=f"another program or migration server has it: `ss -ltnp 'sport = :{port}'`",
            ) from exc
        raise TorporError(
            f"cannot listen on {where}: {exc.strerror or exc}",
            hint="give an address of this host (`ip addr`) and a free port",
        ) from exc
    with lst:
        yield lst


def start_detached(listen_at: str, *, timeout: float = 15.0) -> tuple[int, str]:
    """``torpor agent start --listen ADDR:PORT``: start :func:`._serve.main` in a session of its own
    (stderr appended to ``<home>/logs/migrate-server.log``); its pid and address once it
    listens. A server that does not start is an error naming why (its last line)."""
    check_home_free()
    log_path = _paths.logs_dir() / "migrate-server.log"
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        began = os.lseek(log_fd, 0, os.SEEK_END)
        proc = subprocess.Popen(
            [sys.executable, "-m", "torpor", "agent", "run", "--listen", listen_at],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_fd,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
    finally:
        os.close(log_fd)
    assert proc.stdout is not None
    with proc.stdout:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline().decode(errors="replace") if ready else ""
    if not line.startswith("listening on "):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        why = _last_error(log_path, began)
        raise TorporError(
            f"the migration server did not start listening on {listen_at}"
            + (f": {why}" if why else ""),
            hint=f"see {log_path}",
        )
    return proc.pid, line.removeprefix("listening on ").strip()


def _last_error(log_path: Path, began: int) -> str | None:
    """The error line the server that just failed appended to its log after ``began``."""
    with contextlib.suppress(OSError):
        with open(log_path, "rb") as fh:
            fh.seek(began)
            lines = fh.read(1 << 14).decode(errors="replace").splitlines()
        errors = [ln for ln in lines if ln.startswith("torpor: error: ")]
        if errors:
            return errors[-1].removeprefix("torpor: error: ")
    return None
