"""What the supervisor does when a supervised process ends: pure decisions, no I/O.

The daemon (:mod:`torpor._supervise._daemon`) feeds :func:`decide` the spec, how the process
ended (:class:`Exit`), the checkpoints of its series (newest first) and its :class:`History`,
and acts on the answer:

- :class:`Leave`: the process ended as intended (an exit code in ``success_exit_codes`` with
  restart ``on-failure``): not restored, its status becomes ``stopped``;
- :class:`GiveUp`: not restored, with the reason recorded (status ``given-up``): restart ``no``;
  ``max_restarts`` restores already made within ``restart_window``; no checkpoint left to try;
- :class:`Restore`: try ``candidates`` in order (newest first); one that fails to restore
  (corrupted, missing) is skipped to the next (:func:`after_failed_restore`).

The crash-loop rules (issue 8, point 2):

- a killing signal (any), a non-zero exit not listed as a success, or an unknown end (its
  keeper died too, so nobody recorded how it ended) is a failure;
- a copy restored by the supervisor that fails within ``min_uptime`` of its restore makes the
  next attempt use the checkpoint *before* the one it was restored from: checkpoints taken from
  that short-lived copy are as suspect as the one it came from, so every checkpoint newer than
  the one last used is passed over too. A copy that ran at least ``min_uptime`` is restored
  from the newest checkpoint;
- a checkpoint that once failed to restore is never tried again by this supervisor;
- a process with no checkpoint (it ended before its first one) is not started afresh: that
  would silently throw its state away and start counting again from zero, which supervision
  promises never to do. The reason says how to start it again (``torpor run --resume``).

- a copy *killed* from outside (SIGKILL, SIGTERM, SIGINT, SIGHUP: an operator, the OOM
  killer, a test) after it ran at least ``min_uptime`` is restored from the newest checkpoint
  and that restore does not count towards ``max_restarts``: nothing says its state is at fault,
  and a process killed now and then must come back every time. Killed sooner it counts (an
  out-of-memory loop right after each restore is a crash loop too) and falls back as above.

Restores that fail do not count towards ``max_restarts`` (none ran), but each failed one
removes a candidate, so the attempts after one crash are bounded by the checkpoints there are.
Never a runaway loop.

Retention (:func:`to_prune`) serves the fallback: a series is pruned to its newest ``keep``,
but while a restored copy is on probation (restored less than ``min_uptime`` ago,
:func:`probation_floor`) the checkpoint it came from and the ``keep - 1`` before it are kept
too. Pruning by sequence number alone deleted them as the suspect copy checkpointed, and its
crash then found only its own suspect checkpoints (review finding 5).
"""

from __future__ import annotations

import signal as _signal
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._spec import Spec


@dataclass(frozen=True)
class Exit:
    """How a process ended: killed by ``signal``, or exited with ``code``; both None when
    nobody recorded it (its keeper died too)."""

    signal: int | None = None
    code: int | None = None

    @classmethod
    def from_status(cls, status: int | None) -> Exit:
        """From a registry record's ``exit_status`` (negative: the signal that killed it)."""
        if status is None:
            return cls()
        if status < 0:
            return cls(signal=-status)
        return cls(code=status)

    @property
    def known(self) -> bool:
        """Whether anyone recorded how it ended."""
        return self.signal is not None or self.code is not None

    def describe(self) -> str:
        """``killed by SIGKILL``, ``exited 3``, ``ended (exit status unknown)``."""
        if self.signal is not None:
            try:
                name = _signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"killed by {name}"
        if self.code is not None:
            return f"exited {self.code}"
        return "ended (exit status unknown: its keeper is gone too)"


@dataclass(frozen=True)
class History:
    """What the supervisor did for one name: when it restored it (clock times, oldest first),
    from which checkpoint it restored the copy that runs now (None: the process it runs was
    not restored by it) and when that copy started, and the checkpoints that failed to
    restore."""

    restores: tuple[float, ...] = ()
    last_image: str | None = None
    running_since: float | None = None
    bad: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Restore:
    """Restore from the first of ``candidates`` that works (newest first)."""

    candidates: tuple[str, ...]
    reason: str
    counts: bool = True  # towards ``max_restarts`` (see :func:`after_restore`)


@dataclass(frozen=True)
class GiveUp:
    """Do not restore; ``reason`` is recorded and shown (``torpor ps``, ``torpor events``)."""

    reason: str


@dataclass(frozen=True)
class Leave:
    """The process ended as intended: nothing to do but record it."""

    reason: str


Decision = Restore | GiveUp | Leave


# Signals that come from outside the process (its own faults are SIGSEGV, SIGABRT, SIGBUS...).
_KILLS = frozenset({_signal.SIGKILL, _signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP})


def is_failure(spec: Spec, end: Exit) -> bool:
    """Whether ``end`` is a failure under ``spec`` (see the module docstring)."""
    if end.code is not None:
        return end.code not in spec.success_exit_codes
    return True  # a signal, or nobody knows


def decide(
    spec: Spec, end: Exit, checkpoints: Sequence[str], history: History, now: float
) -> Decision:
    """What to do now (``now``, on the clock of ``history``) that the process of ``spec`` has
    ended as ``end``; ``checkpoints`` are its series' images, newest first."""
    failed = is_failure(spec, end)
    how = end.describe()
    if spec.restart == "no":
        if not failed:
            return Leave(f"{how} (a success exit code)")
        return GiveUp(f"{how}; restart policy is 'no'")
    if spec.restart == "on-failure" and not failed:
        return Leave(f"{how} (a success exit code; restart policy is 'on-failure')")
    quick = history.running_since is not None and now - history.running_since < spec.min_uptime
    counts = quick or end.signal not in _KILLS
    recent = [t for t in history.restores if now - t < spec.restart_window]
    if counts and len(recent) >= spec.max_restarts:
        return GiveUp(
            f"{how}; already restored {len(recent)} times within "
            f"{_seconds(spec.restart_window)} (--max-restarts {spec.max_restarts})"
        )
    usable = [c for c in checkpoints if c not in history.bad]
    reason = f"{how}; restoring the newest checkpoint"
    loop = history.last_image is not None and quick
    if loop:
        assert history.last_image is not None
        older = _older_than(checkpoints, history.last_image)
        usable = [c for c in usable if c in older]
        uptime = now - (history.running_since or now)
        reason = (
            f"{how} {uptime:.1f}s after its restore from {history.last_image} (within "
            f"--min-uptime {_seconds(spec.min_uptime)}); falling back to an older checkpoint"
        )
    if not usable:
        if loop:
            return GiveUp(
                f"{how} within --min-uptime of its restore from {history.last_image}, and no "
                "older checkpoint is left to fall back to"
            )
        if checkpoints:
            return GiveUp(f"{how}; every checkpoint of {spec.name} failed to restore")
        return GiveUp(
            f"{how} before its first checkpoint: nothing to restore (start it again with "
            f"`torpor run --resume --name {spec.name} -- CMD`)"
        )
    return Restore(tuple(usable), reason, counts)


# A prune judges probation on a clock of its own, a little after the supervisor (the restore's
# event is written once the restore is done; the prune runs after a checkpoint), and may run
# while the supervisor judges a crash: the floor is kept this many seconds longer.
PROBATION_SLACK = 5.0


def probation_floor(spec: Spec, history: History, now: float) -> str | None:
    """The checkpoint the copy that runs was restored from while that copy is on probation
    (restored by the supervisor less than ``min_uptime`` ago, plus :data:`PROBATION_SLACK`):
    if it fails now, :func:`decide` falls back to the checkpoints before it. None when no
    copy is on probation. A clock that went back keeps the floor (the safe side)."""
    if history.last_image is None or history.running_since is None:
        return None
    if now - history.running_since >= spec.min_uptime + PROBATION_SLACK:
        return None
    return history.last_image


def to_prune(checkpoints: Sequence[str], keep: int, floor: str | None = None) -> list[str]:
    """The members of a series (``checkpoints``, newest first) a prune to ``keep`` deletes,
    newest first: all but the newest ``keep`` and, with a ``floor`` (:func:`probation_floor`),
    but ``floor`` and the ``keep - 1`` older than it, the candidates the fallback had when the
    copy on probation was restored. At most ``2 * keep`` members stay."""
    kept = set(checkpoints[:keep])
    if floor is not None:
        kept.add(floor)
        kept.update(_older_than(checkpoints, floor)[: max(0, keep - 1)])
    return [c for c in checkpoints if c not in kept]


def _older_than(checkpoints: Sequence[str], image: str) -> list[str]:
    """The checkpoints older than ``image`` (``checkpoints`` are newest first). One no longer
    listed (pruned since) is placed by name: series names sort by their sequence number."""
    if image in checkpoints:
        return list(checkpoints[checkpoints.index(image) + 1 :])
    return [c for c in checkpoints if (len(c), c) < (len(image), image)]


def after_restore(history: History, image: str, now: float, *, counts: bool = True) -> History:
    """``history`` once ``image`` was restored (and runs) at ``now``; the restore ``counts``
    towards ``max_restarts`` or not (:attr:`Restore.counts`)."""
    restores = (*history.restores, now) if counts else history.restores
    return replace(history, restores=restores, last_image=image, running_since=now)


def after_failed_restore(history: History, image: str) -> History:
    """``history`` once ``image`` failed to restore: never tried again."""
    return replace(history, bad=history.bad | {image})


def prune_restores(history: History, window: float, now: float) -> History:
    """``history`` without restores older than ``window`` (they no longer count)."""
    return replace(history, restores=tuple(t for t in history.restores if now - t < window))


def _seconds(value: float) -> str:
    from ._spec import format_duration

    return format_duration(value)
