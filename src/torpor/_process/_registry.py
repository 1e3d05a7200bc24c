"""Records of managed processes (started by ``torpor run`` or ``torpor restore``).

One JSON file per process under ``<home>/procs``, written atomically. The keeper that parents a
process writes its exit status there when it ends.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .. import _paths
from .._errors import AlreadyExistsError, ProcessNotFoundError
from .._images._store import check_name
from ._proc import ProcRef


@dataclass(frozen=True)
class ManagedProcess:
    """A process torpor started (or restored) and keeps a parent (keeper) for."""

    name: str
    pid: int
    start_time: int
    keeper_pid: int
    command: tuple[str, ...]
    started: str
    log_path: str | None = None
    restored_from: str | None = None
    exit_status: int | None = None
    ended: str | None = None
    checkpointed_to: str | None = None

    @property
    def ref(self) -> ProcRef:
        """The process identity."""
        return ProcRef(self.pid, self.start_time)

    @property
    def state(self) -> str:
        """``running``, ``checkpointed`` (killed by a checkpoint), ``exited N`` or ``gone``."""
        if self.ended is None and self.ref.alive():
            return "running"
        if self.checkpointed_to and self.exit_status in (None, -9):
            return "checkpointed"
        if self.exit_status is None:
            return "gone"
        if self.exit_status < 0:
            return f"killed (signal {-self.exit_status})"
        return f"exited {self.exit_status}"

    def evolve(self, **changes: Any) -> ManagedProcess:
        """A copy with ``changes`` applied."""
        return replace(self, **changes)


def _path(name: str) -> Path:
    return _paths.procs_dir() / f"{check_name(name, what='process name')}.json"


def save(rec: ManagedProcess) -> None:
    """Write (or replace) a record atomically."""
    path = _path(rec.name)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(asdict(rec), fh, indent=2, sort_keys=True)
    os.rename(tmp, path)


def reserve(name: str) -> None:
    """Fail if ``name`` belongs to a process that is still running."""
    try:
        rec = load(name)
    except ProcessNotFoundError:
        return
    if rec.state == "running":
        raise AlreadyExistsError(
            f"a managed process named {name!r} is running (pid {rec.pid})",
            hint="choose another --name",
        )


def load(name: str) -> ManagedProcess:
    """The record named ``name``."""
    try:
        data = json.loads(_path(name).read_text())
    except FileNotFoundError as exc:
        raise ProcessNotFoundError(
            f"no managed process named {name!r}", hint="`torpor ps` lists managed processes"
        ) from exc
    data["command"] = tuple(data["command"])
    return ManagedProcess(**data)


def list_all() -> list[ManagedProcess]:
    """Every record, oldest first."""
    out = []
    for p in _paths.procs_dir().glob("*.json"):
        try:
            out.append(load(p.stem))
        except (ProcessNotFoundError, ValueError, TypeError):
            continue
    return sorted(out, key=lambda r: r.started)


def find_by_pid(pid: int) -> ManagedProcess | None:
    """The running managed process with host pid ``pid``, if any."""
    for rec in list_all():
        if rec.pid == pid and rec.state == "running":
            return rec
    return None


def mark_checkpointed(target: ProcRef, image: Path) -> None:
    """Record that the managed process ``target`` (if it is one) ended in a checkpoint."""
    for rec in list_all():
        if rec.ref == target:
            save(rec.evolve(checkpointed_to=str(image)))


def delete(name: str) -> None:
    """Forget a record."""
    _path(name).unlink(missing_ok=True)
