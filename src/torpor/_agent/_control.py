"""Starting and stopping the agent of this torpor home (asking after it:
:mod:`torpor._agent_status`)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from .. import _paths
from .._agent_status import (
    AgentStatus,
    launcher_dir,
    lock_path,
    pid_path,
    recorded,
    socket_path,
    status,
)
from .._errors import PermissionDeniedError, TorporError
from .._process._daemonize import last_line, start_daemon
from .._process._proc import ProcRef, holds_unix_socket
from ._master import agent_argv

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
# How long `stop` waits for an agent that holds agent.lock to listen again: while it re-executes
# (new code) its listener is closed for a moment.
RELISTEN_TIMEOUT = 2.0


def start() -> tuple[AgentStatus, bool]:
    """Start the agent of this torpor home in the background, unless one runs; its status and
    whether this call started it. Returns once it serves commands."""
    current = status()
    if current.running:
        return current, False
    home = _paths.home()
    env = {**os.environ, "TORPOR_HOME": str(home)}
    ready = start_daemon(agent_argv(launcher_dir()), env, current.log, timeout=START_TIMEOUT)
    if not ready:
        now = status()
        if now.running:  # another `agent start` won the race: that agent serves
            return now, False
        raise TorporError(
            "the agent did not start: " + last_line(current.log),
            hint=f"see {current.log}",
        )
    return status(), True


def stop() -> AgentStatus | None:
    """Stop the agent of this torpor home (its workers' managed processes and their keepers go
    on); the status it had, or None if none ran.

    Only a process that is this home's agent is signalled: the recorded pid and start time,
    and it holds the socket bound at ``agent.sock`` (a stale or planted ``agent.pid`` naming
    another process is refused). One that holds ``agent.lock`` but not the socket is the agent
    re-executing: it is given :data:`RELISTEN_TIMEOUT` to listen again."""
    home = _paths.home()
    current = status()
    proc, _ = recorded(home)
    if current.pid is None or proc is None:
        return None
    try:
        pidfd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        return None
    try:
        if not proc.alive():
            return None
        if not _serves(proc, home):
            if not proc.alive():  # it ended while we waited for it to listen
                return None
            raise PermissionDeniedError(
                f"{pid_path(home)} names pid {proc.pid}, which is not this home's agent (it "
                f"does not serve {socket_path(home)}); nothing signalled",
                hint=f"the record is stale or planted: remove {pid_path(home)}",
            )
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
    finally:
        os.close(pidfd)
    deadline = time.monotonic() + STOP_TIMEOUT
    while proc.alive():
        if time.monotonic() > deadline:
            raise TorporError(
                f"the agent (pid {current.pid}) did not stop within {STOP_TIMEOUT:.0f}s",
                hint=f"see {current.log}",
            )
        time.sleep(0.01)
    return current


def _serves(proc: ProcRef, home: Path) -> bool:
    """Whether ``proc`` holds the socket bound at ``agent.sock``, waiting up to
    :data:`RELISTEN_TIMEOUT` if it holds ``agent.lock`` (the agent re-executing)."""
    address = str(socket_path(home))
    deadline = time.monotonic() + RELISTEN_TIMEOUT
    while not holds_unix_socket(proc.pid, address):
        if time.monotonic() > deadline or not proc.alive() or not holds_flock(proc.pid, home):
            return False
        time.sleep(0.02)
    return True


def holds_flock(pid: int, home: Path) -> bool:
    """Whether ``pid`` has open ``agent.lock`` of ``home`` with the ``flock`` on it (the serving
    agent holds it for its whole life, across its re-executions). Only that open file shows
    the lock in ``/proc/PID/fdinfo``: a process that opened the file without the lock, or has
    only its pid, does not count."""
    try:
        lock = os.stat(lock_path(home), follow_symlinks=False)
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
            if (st.st_dev, st.st_ino) != (lock.st_dev, lock.st_ino):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii", errors="replace") as fh:
                info = fh.read()
        except OSError:
            continue
        for line in info.splitlines():
            # lock:\t1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF
            parts = line.split()
            if parts[:1] == ["lock:"] and parts[2:3] == ["FLOCK"] and parts[4:5] == ["WRITE"]:
                return True
    return False
