"""Starting, stopping and asking after the agent of this torpor home."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import _paths
from .._errors import TorporError
from .._process._proc import ProcRef, detached
from ._master import agent_argv, pid_path, socket_path
from ._worker import launcher_dir

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class AgentStatus:
    """The agent of a torpor home: ``pid`` is None when none runs."""

    pid: int | None
    started: str | None
    socket: Path
    log: Path

    @property
    def running(self) -> bool:
        """Whether an agent serves this home."""
        return self.pid is not None


def status() -> AgentStatus:
    """The agent of this torpor home (a record whose process is gone counts as none)."""
    home = _paths.home()
    log = _paths.logs_dir() / "agent.log"
    proc, started = _recorded(home)
    if proc is None or not proc.alive():
        return AgentStatus(None, None, socket_path(home), log)
    return AgentStatus(proc.pid, started, socket_path(home), log)


def _recorded(home: Path) -> tuple[ProcRef | None, str | None]:
    try:
        data = json.loads(pid_path(home).read_text())
        return ProcRef(int(data["pid"]), int(data["start_time"])), str(data["started"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def start() -> tuple[AgentStatus, bool]:
    """Start the agent of this torpor home in the background, unless one runs; its status and
    whether this call started it. Returns once it serves commands."""
    current = status()
    if current.running:
        return current, False
    home = _paths.home()
    ready_r, ready_w = os.pipe()
    log_fd = os.open(current.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    argv = [*agent_argv(launcher_dir()), "--ready-fd", str(ready_w)]
    env = {**os.environ, "TORPOR_HOME": str(home)}

    def agent() -> None:  # pragma: no cover - the agent's side
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        # Nothing else the caller holds (a test runner's pipe, say) may stay open in a daemon.
        os.closerange(3, ready_w)
        os.closerange(ready_w + 1, 1 << 16)
        os.set_inheritable(ready_w, True)
        os.execve(sys.executable, argv, env)

    try:
        # Detached (not our child, its own session): it outlives us and never becomes a
        # zombie of a long-lived caller.
        detached(agent)
    finally:
        os.close(ready_w)
        os.close(log_fd)
    try:
        readable, _, _ = select.select([ready_r], [], [], START_TIMEOUT)
        ready = os.read(ready_r, 64) if readable else b""
    finally:
        os.close(ready_r)
    if ready != b"ready\n":
        now = status()
        if now.running:  # another `agent start` won the race: that agent serves
            return now, False
        raise TorporError(
            "the agent did not start: " + _last_line(current.log),
            hint=f"see {current.log}",
        )
    return status(), True


def stop() -> AgentStatus | None:
    """Stop the agent of this torpor home (its workers' managed processes and their keepers go
    on); the status it had, or None if none ran."""
    current = status()
    if current.pid is None:
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(current.pid, signal.SIGTERM)
    proc, _ = _recorded(_paths.home())
    deadline = time.monotonic() + STOP_TIMEOUT
    while proc is not None and proc.alive():
        if time.monotonic() > deadline:
            raise TorporError(
                f"the agent (pid {current.pid}) did not stop within {STOP_TIMEOUT:.0f}s",
                hint=f"see {current.log}",
            )
        time.sleep(0.01)
    return current


def _last_line(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    return lines[-1] if lines else "no detail"
