"""A prune let finish after its name's supervision ended (:class:`Lingering`).

A prune runs after each checkpoint. When the name's supervision ends normally while one is
in flight (``torpor stop``, the app exited, the supervisor gave up), stopping it would leave
a checkpoint more than ``--keep`` in the series for good: nothing prunes a name that is no
longer supervised. So it is let finish, with the name's lease kept until it ends and then
released. The lease is no longer renewed meanwhile: if the prune has not ended by the
deadline the name's watch had (:func:`._fence.deadline`, 80 % of the lease after its last
renewal, before another home may take the name over), it is stopped and the lease left to
lapse, as a fence does. A fence (the lease lost or past its deadline) stops the prune at
once, never lets it linger.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._errors import TorporError
from ._env import log

if TYPE_CHECKING:
    from ._daemon import Supervisor
    from ._watch import Job


@dataclass
class _Left:
    name: str
    job: Job
    lease: Any
    deadline: float


class Lingering:
    """The prunes let finish, each with the lease it holds, in the supervisor's loop."""

    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup
        self._left: dict[int, _Left] = {}

    def add(self, name: str, job: Job, lease: Any, deadline: float) -> None:
        """Let ``job`` (the prune of ``name``, whose watch is let go) finish, holding ``lease``
        until it ends or ``deadline`` passes."""
        left = _Left(name, job, lease, deadline)
        self._sup._drop(job.fd)  # the watch's own handler
        self._left[job.fd] = left
        self._sup._add(job.fd, lambda: self._ended(left))

    def _ended(self, left: _Left) -> None:
        self._sup._drop(left.job.fd)
        self._left.pop(left.job.fd, None)
        code = left.job.finish()
        if code != 0:
            log(f"{left.name}: prune failed: {left.job.error_line()}")
        else:
            with contextlib.suppress(ValueError, KeyError, TypeError, TorporError, OSError):
                kept = int(json.loads(left.job.stdout)["kept"])
                self._sup.env.update(left.name, lambda s: s.evolve(kept=kept))
        with contextlib.suppress(TorporError, OSError):
            left.lease.release()

    def next(self) -> float | None:
        """The earliest deadline of a prune let finish, if any."""
        return min((left.deadline for left in self._left.values()), default=None)

    def due(self, now: float) -> None:
        """Stop the prunes past their deadline; their leases lapse."""
        for fd, left in list(self._left.items()):
            if now >= left.deadline:
                del self._left[fd]
                log(f"{left.name}: prune stopped: not done by its lease's deadline")
                self._sup._abandon(left.job, None)

    def stop_all(self) -> None:
        """At shutdown: stop every prune let finish (their leases lapse)."""
        for left in list(self._left.values()):
            left.job.terminate()
            self._sup._drop(left.job.fd)
            left.job.finish()  # reaped, as the shutdown reaps the commands it stops
        self._left.clear()
