"""Starting and stopping the agent of this torpor home (asking after it:
:mod:`torpor._agent_status`)."""

from __future__ import annotations

import contextlib
import os
import signal
import time

from .. import _paths
from .._agent_status import AgentStatus, launcher_dir, pid_path, recorded, socket_path, status
from .._errors import PermissionDeniedError, TorporError
from .._process._daemonize import last_line, start_daemon
from .._process._proc import holds_unix_socket
from ._master import agent_argv

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


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
    another process is refused)."""
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
        if not holds_unix_socket(proc.pid, str(socket_path(home))):
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
