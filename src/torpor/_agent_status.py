"""Whether an agent serves this torpor home, read from its files, and where this installation's
launchers are: what the agent and ``torpor doctor`` both need.

It sits outside the :mod:`torpor._agent` package on purpose: importing anything in that package
runs its ``__init__``, which imports the master and its workers, and the master preloads the
doctor. Here the doctor can ask about the agent without importing it.

Contract: the agent's files in a home are ``agent.sock`` (where it listens), ``agent.pid`` (its
record: JSON ``{"pid", "start_time", "started", "socket"}``, written through
:func:`torpor._paths.write_home_file`) and ``agent.lock`` (held with ``flock`` while it serves).
:func:`status` believes a record only if torpor could have written it and its process (pid and
start time) is alive; it never raises for a missing, stale or malformed record.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import _paths
from ._process._proc import ProcRef


def socket_path(home: Path) -> Path:
    """Where the agent of ``home`` listens."""
    return home / "agent.sock"


def pid_path(home: Path) -> Path:
    """The agent's record: ``{"pid", "start_time", "started", "socket"}``."""
    return home / "agent.pid"


def lock_path(home: Path) -> Path:
    """Held (``flock``) by the serving agent for its whole life."""
    return home / "agent.lock"


def launcher_dir() -> str:
    """The directory holding this installation's ``torpor`` launchers: where the running
    launcher is, else the interpreter's scripts directory."""
    argv0 = sys.argv[0]
    if os.path.basename(argv0) in ("torpor", "torpor-py"):
        return os.path.dirname(os.path.realpath(argv0))
    import sysconfig

    return os.path.realpath(sysconfig.get_path("scripts"))


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
    proc, started = recorded(home)
    if proc is None or not proc.alive():
        return AgentStatus(None, None, socket_path(home), log)
    return AgentStatus(proc.pid, started, socket_path(home), log)


def recorded(home: Path) -> tuple[ProcRef | None, str | None]:
    """The agent's record (``agent.pid``), if there is one torpor could have written (see
    :func:`torpor._paths.read_home_file`)."""
    try:
        raw = _paths.read_home_file(pid_path(home).name, limit=4096)
        if raw is None:
            return None, None
        data = json.loads(raw)
        return ProcRef(int(data["pid"]), int(data["start_time"])), str(data["started"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None
