"""What the supervisor acts on (:class:`Env`): records, events, pools, leases, CLI commands,
the clock. The daemon's loop (:mod:`._daemon`) sees the world only through it, so that its unit
tests give it a fake one."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

from .._errors import TorporError
from ._spec import Spec
from ._state import State
from ._watch import Job

LEASE_DURATION = 15.0  # seconds; renewed every third of it


def log(message: str) -> None:
    """A line in the daemon's log (its stdout)."""
    from .._images._manifest import now_iso

    print(f"{now_iso()} supervisor {os.getpid()}: {message}", flush=True)


class Env:
    """What the supervisor acts through: the real torpor (its records, the CLI, pools). Unit
    tests pass a fake."""

    def __init__(self) -> None:
        from ._watch import cli_argv

        self.cli = cli_argv()
        self._pools: dict[str, Any] = {}
        self.holder = f"{socket.gethostname()} {_home()} pid {os.getpid()}"

    def now(self) -> float:
        return time.monotonic()

    def states(self) -> list[State]:
        from . import _state

        skipped: list[TorporError] = []
        out = _state.list_all(skipped)
        for problem in skipped:
            log(f"skipped a supervision record: {problem}")
        return out

    def state(self, name: str) -> State | None:
        from . import _state

        return _state.read(name)

    def update(self, name: str, fn: Callable[[State], State]) -> None:
        from .._errors import NotFoundError
        from . import _state

        try:
            _state.update(name, fn)
        except NotFoundError:
            # Unsupervised meanwhile (its record removed) while a job of it ran: nothing to
            # record; the next reload lets go of it.
            log(f"{name}: no longer supervised (record removed)")

    def event(self, name: str, kind: str, **fields: Any) -> None:
        from . import _events

        try:
            _events.append(name, kind, **fields)
        except (OSError, TorporError) as exc:
            log(f"cannot record event {kind} of {name}: {exc}")

    def record(self, name: str) -> Any:
        from .._process import _registry

        return _registry.load(name)

    def open_checked(self, rec: Any) -> int:
        from .._process import _registry

        return _registry.open_checked(rec)

    def keeper_alive(self, rec: Any) -> bool:
        from .._process import _registry

        return _registry.keeper_alive(rec)

    def pool(self, name: str) -> Any:
        pool = self._pools.get(name)
        if pool is None:
            from .._pools import open_pool

            pool = self._pools[name] = open_pool(name)
        return pool

    def local_copy(self, image: str) -> Any:
        from ._series import local_copy

        return local_copy(image)

    def checkpoints(self, spec: Spec) -> list[str]:
        from . import _series

        return [m.name for m in _series.members(self.pool(spec.pool), spec.name)]

    def next_image(self, spec: Spec) -> str:
        from . import _series

        return _series.series_name(spec.name, _series.next_seq(self.pool(spec.pool), spec.name))

    def job(self, args: list[str], what: str) -> Job:
        return Job([*self.cli, *args], what=what)

    def task(self, args: list[str], what: str) -> Job:
        import sys

        return Job([sys.executable, "-P", "-m", "torpor._supervise._tasks", *args], what=what)

    def lease(self, spec: Spec) -> Any:
        try:
            from . import _lease
        except ImportError:  # pragma: no cover - until the lease module lands
            return None
        return _lease.acquire(
            self.pool(spec.pool), spec.name, holder=self.holder, duration=LEASE_DURATION
        )

    def keeper_fence(self, rec: Any, seconds: float | None) -> None:
        """Tell the keeper of ``rec`` to kill it ``seconds`` from now unless told again (None:
        never); OSError or TorporError if it was not told."""
        from .._errors import ProcessNotFoundError
        from .._process import _keeper_fence, _registry

        if not _registry.keeper_alive(rec):
            raise ProcessNotFoundError(f"the keeper of {rec.name} is gone", pid=rec.keeper_pid)
        _keeper_fence.tell(rec.keeper_pid, seconds)

    def holder_is_ours(self, holder: str) -> bool:
        """Whether a lease ``holder`` is a supervisor of this home on this host (a former
        one: only one serves a home at a time)."""
        return holder.startswith(f"{socket.gethostname()} {_home()} pid ")

    def watch_dir(self) -> Any:
        from .. import _paths
        from ._watch import DirWatch

        return DirWatch(_paths.procs_dir())


def _home() -> str:
    from .. import _paths

    return str(_paths.home())
