"""What the keeper records of each lazy copy, and what a command reads of it.

``<home>/lazy/<copy>.json`` (0600, written by the keeper, see ``_restore``): the copy's pid,
the daemon's pid, ``filling`` -> ``resident`` (with the wall-clock time it became so) or
``failed`` (with the one-line error naming image, file and chunk when known), or ``ended``.
A state file is only ever shown, never acted on: one that is not exactly what torpor writes
is not believed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .. import _paths, _safe
from .._errors import TorporError
from .._images._manifest import now_iso

LAZY_DIR = "lazy"
LAZY_POOL_DIR = "lazy-pool"  # in the cache: local parts of pool images restored lazily
_MAX_STATE = 1 << 16

FILLING, RESIDENT, FAILED, ENDED = "filling", "resident", "failed", "ended"


@dataclass(frozen=True)
class LazyState:
    """What the keeper records of one lazy copy (``<home>/lazy/<name>.json``)."""

    name: str
    image: str
    state: str  # filling, resident, failed, ended (the copy ended before its memory had)
    pid: int | None = None
    daemon_pid: int | None = None
    started_at: float | None = None  # wall clock: the restore began
    resumed_at: float | None = None  # the copy runs
    resident_at: float | None = None  # every page has moved
    error: str | None = None
    updated: str | None = None
    # Bytes of pages restored before the resume from a local warm set (``_eager``).
    warm_bytes: int | None = None


def lazy_dir() -> Path:
    """``<home>/lazy``: work dirs and states of lazy restores."""
    return _paths.private_dir(_paths.home() / LAZY_DIR, what="lazy restore directory")


def lazy_pool_dir() -> Path:
    """``<cache>/lazy-pool``: the local parts of pool images being restored lazily."""
    return _paths.private_dir(_paths.cache_dir() / LAZY_POOL_DIR, what="lazy pool directory")


def write_state(st: LazyState) -> None:
    """Record ``st`` (atomically replacing the copy's previous state)."""
    d = lazy_dir()
    data = json.dumps(asdict(replace(st, updated=now_iso()))).encode()
    with _safe.opened_dir(d) as fd:
        _safe.replace_file(fd, _state_file(st.name), data, source=str(d), durable=False)


def read_state(name: str) -> LazyState | None:
    """The recorded state of the lazy copy ``name``, None if there is none (or it is not one
    torpor wrote: it is only ever shown, never acted on)."""
    d = lazy_dir()
    try:
        with _safe.opened_dir(d) as fd:
            raw = _safe.read_regular(fd, _state_file(name), source=str(d), limit=_MAX_STATE)
        data = json.loads(raw)
        return _parse_state(data)
    except (OSError, ValueError, TypeError, TorporError):
        return None


def _state_file(name: str) -> str:
    return _safe.check_name(name, source="lazy state", what="process name") + ".json"


_STATE_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "image": (str,),
    "state": (str,),
    "pid": (int, type(None)),
    "daemon_pid": (int, type(None)),
    "started_at": (float, int, type(None)),
    "resumed_at": (float, int, type(None)),
    "resident_at": (float, int, type(None)),
    "error": (str, type(None)),
    "updated": (str, type(None)),
    "warm_bytes": (int, type(None)),
}
_ADDED = {"warm_bytes"}  # keys a state written by an older keeper lacks


def _parse_state(data: Any) -> LazyState | None:
    if not isinstance(data, dict) or not set(_STATE_TYPES) - _ADDED <= set(data) <= set(
        _STATE_TYPES
    ):
        return None
    for key, types in _STATE_TYPES.items():
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, types):
            return None
    return LazyState(**data)


_OUTCOME_GRACE = 2.0  # seconds a keeper is given to record how a copy's filling ended


def wait_states(names: list[str], *, timeout: float | None) -> dict[str, LazyState]:
    """The recorded states of the lazy copies ``names``, once each is no longer ``filling``
    or ``timeout`` seconds have passed (None: however long it takes; the keeper's watch
    always ends it: resident, failed, or the copy ended)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    gone: dict[str, float] = {}  # when each copy's daemon was first seen gone
    while True:
        states = {n: st for n in names if (st := read_state(n)) is not None}
        now = time.monotonic()
        for n, st in states.items():
            if st.state == FILLING and not _still_filling(st):
                gone.setdefault(n, now)
        if all(_settled(states.get(n), gone.get(n, now), now) for n in names):
            return states
        if deadline is not None and time.monotonic() >= deadline:
            return states
        time.sleep(0.01)


def _settled(st: LazyState | None, gone_since: float, now: float) -> bool:
    """Whether ``st`` is final. Its daemon gone while the record still says filling: the
    keeper reaps the daemon just before it writes the outcome, and is given that moment
    (:data:`_OUTCOME_GRACE` from ``gone_since``); a keeper killed mid-watch leaves ``filling``
    for good."""
    if st is None or _still_filling(st):
        return False
    return st.state != FILLING or now - gone_since >= _OUTCOME_GRACE


def _still_filling(st: LazyState) -> bool:
    """Whether ``st`` may still change: it says filling and its daemon is there (a keeper
    killed mid-watch leaves ``filling`` behind; what it watched ends with it)."""
    if st.state != FILLING:
        return False
    return st.daemon_pid is None or os.path.exists(f"/proc/{st.daemon_pid}")


def restored_tasks(pid: int) -> int:
    """How many processes the restored tree rooted at ``pid`` has (one userfaultfd each)."""
    from .._process._proc import descendants

    return 1 + sum(1 for _ in descendants(pid))


def report_failure(state: LazyState) -> None:
    """A supervised copy's failure goes to its event log (``torpor events``) too."""
    from .._supervise import _events, _spec

    if _spec.load(state.name) is None:
        return
    _events.append(state.name, "restore-failed", error=state.error, image=state.image, lazy=True)
