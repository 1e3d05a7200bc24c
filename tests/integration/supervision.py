"""Helpers of the supervision tests (``test_supervise*_real.py``): the home's supervisor, the
managed process of a name, its events and checkpoints, and a ``home`` fixture that kills the
supervisor first at the end (it would restore the apps the test's teardown kills)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor._pools import open_pool
from torpor._process import _registry
from torpor._process._proc import ProcRef
from torpor._supervise import _events, _series

from .helpers import APPS, PYTHON, wait_for

COUNTER = [PYTHON, str(APPS / "counter.py")]


def daemon(home: Path) -> ProcRef | None:
    """The home's supervisor, as its pid file names it (None if it has none)."""
    try:
        data = json.loads((home / "supervised" / ".daemon.pid").read_text())
    except (OSError, ValueError):
        return None
    return ProcRef(data["pid"], data["start_time"])


def kill(ref: ProcRef | None) -> None:
    """SIGKILL a process the test started (by pid and start time) and wait for its end."""
    if ref is None or not ref.alive():
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(ref.pid, signal.SIGKILL)
    wait_for(lambda: not ref.alive(), what=f"pid {ref.pid} to die")


def running(name: str, other_than: int | None = None) -> _registry.ManagedProcess | None:
    """The running process ``name`` (not the one of pid ``other_than``), or None."""
    with contextlib.suppress(Exception):
        rec = _registry.load(name)
        if rec.state == "running" and rec.pid != other_than:
            return rec
    return None


def kinds(name: str, kind: str | None = None) -> list[_events.Event]:
    """The events of ``name`` (of ``kind`` only, when given), oldest first."""
    return [e for e in _events.read(name) if kind is None or e.kind == kind]


def members(name: str) -> list[str]:
    """The checkpoints of ``name`` in the ``default`` pool, newest first."""
    with open_pool("default") as pool:
        return [m.name for m in _series.members(pool, name)]


@pytest.fixture
def supervised_home(torpor_home: Path) -> Iterator[Path]:
    """A torpor home whose supervisor is killed first at the end; its log and the event logs
    are printed (seen on failure)."""
    yield torpor_home
    kill(daemon(torpor_home))
    log = torpor_home / "supervised" / ".daemon.log"
    if log.exists():
        print(log.read_text())
    for events in sorted((torpor_home / "events").glob("*.jsonl")):
        print(events.read_text())
