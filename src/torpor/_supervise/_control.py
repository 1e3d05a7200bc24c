"""Starting, stopping and asking after the supervisor daemon of this torpor home.

Files in ``<home>/supervised/``: ``.daemon.lock`` (``flock``-ed by the daemon for its whole
life: held == a daemon serves; a second one exits at once), ``.daemon.pid`` (JSON: pid, start
time, when), ``.daemon.sock`` (a unix socket the daemon binds and holds: how a command knows
the pid in ``.daemon.pid`` is this home's daemon before it signals it, as the agent's socket
proves the agent) and ``.daemon.log`` (its log). Signals go through a pidfd of the checked
process only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import _paths
from .._errors import AlreadyExistsError, PermissionDeniedError, TorporError
from .._process._daemonize import last_line, start_daemon
from .._process._proc import ProcRef, holds_unix_socket
from .._process._proc import start_time as _start_time

LOCK = ".daemon.lock"
PID = ".daemon.pid"
SOCK = ".daemon.sock"
LOG = ".daemon.log"
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class DaemonStatus:
    """The supervisor of this home: ``pid`` None when none runs."""

    pid: int | None
    started: str | None
    log: Path

    @property
    def running(self) -> bool:
        """Whether a supervisor serves this home."""
        return self.pid is not None


def _dir() -> Path:
    return _paths.supervised_dir()


def status() -> DaemonStatus:
    """The supervisor of this home (a record whose process is gone, or that is not this
    home's daemon, counts as none)."""
    d = _dir()
    proc, started = _recorded(d)
    if proc is None or not proc.alive() or not holds_unix_socket(proc.pid, str(d / SOCK)):
        return DaemonStatus(None, None, d / LOG)
    return DaemonStatus(proc.pid, started, d / LOG)


def _recorded(d: Path) -> tuple[ProcRef | None, str | None]:
    try:
        fd = os.open(d / PID, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None, None
    try:
        from .._safe import private_file_problem

        if private_file_problem(os.fstat(fd)) is not None:
            return None, None
        data = json.loads(os.read(fd, 4096))
        return ProcRef(int(data["pid"]), int(data["start_time"])), str(data["started"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None
    finally:
        os.close(fd)


def _signal(st: DaemonStatus, sig: int) -> bool:
    """Send ``sig`` to the daemon ``st`` names, checked again through its pidfd; whether it
    was sent."""
    if st.pid is None:
        return False
    try:
        pidfd = os.pidfd_open(st.pid)
    except ProcessLookupError:
        return False
    try:
        if not holds_unix_socket(st.pid, str(_dir() / SOCK)):
            return False
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, sig)
        return True
    finally:
        os.close(pidfd)


def reload() -> bool:
    """Ask the running supervisor to re-read the supervision records now; whether one runs."""
    return _signal(status(), signal.SIGHUP)


def ensure() -> tuple[DaemonStatus, bool]:
    """The supervisor of this home, started (detached) unless one runs, which is asked to
    re-read the records; its status and whether this call started it."""
    current = status()
    if current.running and _signal(current, signal.SIGHUP):
        return current, False
    return start()


def start(shutdown_timeout: float | None = None) -> tuple[DaemonStatus, bool]:
    """Start the supervisor detached (double fork + ``setsid``: not our child, in a session
    of its own) and return once it serves, or the one that already does."""
    d = _dir()
    log_path = d / LOG
    argv = [sys.executable, "-P", "-m", "torpor", "supervisor", "run"]
    if shutdown_timeout is not None:
        argv += ["--shutdown-timeout", f"{shutdown_timeout}s"]
    env = {**os.environ, "TORPOR_HOME": str(_paths.home())}
    env.pop("TORPOR_AGENT_TRIED", None)
    ready = start_daemon(argv, env, log_path, timeout=START_TIMEOUT)
    now = status()
    if ready or now.running:
        # Another start may have won the race (this one then exited at once): that one serves.
        if not ready:
            _signal(now, signal.SIGHUP)
        return now, ready
    raise TorporError(
        f"the supervisor did not start: {last_line(log_path)}", hint=f"see {log_path}"
    )


def stop(timeout: float = 120.0) -> DaemonStatus | None:
    """Stop the supervisor (SIGTERM: it checkpoints what it supervises first; the apps keep
    running); the status it had, or None if none ran."""
    current = status()
    if not _signal(current, signal.SIGTERM):
        return None
    assert current.pid is not None
    proc, _ = _recorded(_dir())
    deadline = time.monotonic() + timeout
    while proc is not None and proc.alive():
        if time.monotonic() > deadline:
            raise TorporError(
                f"the supervisor (pid {current.pid}) did not stop within {timeout:.0f}s",
                hint=f"see {current.log}",
            )
        time.sleep(0.02)
    return current


def serve(ready_fd: int | None = None, shutdown_timeout: float = 30.0) -> None:
    """Run the supervisor of this home in the foreground until SIGTERM (``torpor supervisor
    run``); :class:`~torpor.AlreadyExistsError` if one serves already."""
    from .._images._manifest import now_iso
    from ._daemon import Env, Supervisor, log

    d = _dir()
    os.chdir("/")
    lock_fd = os.open(d / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(lock_fd)
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise AlreadyExistsError(
            f"a supervisor already serves {_paths.home()}",
            hint="`torpor supervisor status` shows it",
        ) from exc
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    sup = Supervisor(Env(), shutdown_timeout=shutdown_timeout)

    def on_term(*_: object) -> None:
        sup.stopping = True

    def on_hup(*_: object) -> None:
        sup.reload_wanted = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_hup)
    signal.set_wakeup_fd(wake_w)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(d / SOCK)
    sock.bind(str(d / SOCK))
    pid = os.getpid()
    record = {"pid": pid, "start_time": _start_time(pid), "started": now_iso()}
    from .. import _safe

    dir_fd = _safe.open_dir(d)
    try:
        _safe.replace_file(dir_fd, PID, json.dumps(record).encode(), source="supervision dir")
    finally:
        os.close(dir_fd)
    log("started")
    try:
        if ready_fd is not None:
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)
        sup.run(wake_r)
    finally:
        if status().pid == pid:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(d / PID)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(d / SOCK)
        sock.close()
        log("stopped")
        os.close(lock_fd)


def need_root(what: str) -> None:
    """Supervision restores and checkpoints: root only."""
    if os.geteuid() != 0:
        raise PermissionDeniedError(f"{what} needs root (CRIU)", hint="run as root")
