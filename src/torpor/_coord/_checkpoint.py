"""``torpor.checkpoint()``: a process checkpointing itself, coordinated.

The sequence, under one lock (concurrent requests from several threads run one after another):

1. refuse if called from inside a hook (:class:`CheckpointInProgressError`);
2. tell every resource ``before_checkpoint`` (the application's, then torpor's own: the log
   files, the trigger channel's listener);
3. scan the descriptors and apply the policies; refuse with one line per offender;
4. ``gc.collect()`` and ``malloc_trim(0)`` (smaller image);
5. hold the application's other threads (:mod:`._hold`) and dump through the engine;
6. in the restored copy (and in the original after ``leave_running``): reopen what the policies
   closed for reopening, then tell every resource ``after_restore`` (torpor's own first), and
   only then let the other threads go on.

If anything fails before the dump (a hook, the checks, the engine), no image is written and
step 6 runs at once (threads held by then stay held through it), so the application is left
as it was; the original error is raised, or a
:class:`CheckpointError` holding it with the rollback's own failures.

The engine is injectable: :class:`Coordinator` takes any callable with the contract of
:data:`Engine`. The default one imports ``torpor._process._selfdump`` lazily.

The public ``checkpoint()`` and ``restore_info()`` are :mod:`._runtime`'s: they start
coordination first (the built-ins, the channel), and the channel's listener runs checkpoints
through :func:`default_coordinator`, so this module stays below both.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Protocol

from .._errors import CheckpointInProgressError, CheckpointRefusedError
from . import _fds, _hold, _policy
from ._context import Context, in_notification
from ._contexts import root_context
from ._failures import CheckpointError, RestoreHookError
from ._track import opened_at

# The label a checkpoint without a path carries (``_process._keeper_dump`` reads it): wanted in
# the process's series only.
SERIES_ONLY_LABEL = "torpor.series-only"


class DumpOutcome(Protocol):
    """What the engine returns: ``restored`` is True in a restored copy, False in the original
    after a ``leave_running`` dump; ``image`` is the image directory."""

    @property
    def restored(self) -> bool:
        """Whether this is a restored copy."""

    @property
    def image(self) -> Path | None:
        """The image directory."""

    @property
    def series(self) -> str | None:
        """The series member the image became (a supervised process's checkpoint taken
        without a path), if any."""


class Engine(Protocol):
    """Dumps the calling process into ``dest``. Without ``leave_running`` the original never
    returns (CRIU kills it); every restored copy returns with ``restored=True``. Raises
    ``DumpError`` (process still running) on failure."""

    def __call__(
        self,
        dest: Path,
        *,
        leave_running: bool,
        tcp_established: bool,
        name: str | None,
        labels: Mapping[str, str],
    ) -> DumpOutcome:
        """Dump this process."""


def selfdump_engine(
    dest: Path,
    *,
    leave_running: bool,
    tcp_established: bool,
    name: str | None,
    labels: Mapping[str, str],
) -> DumpOutcome:
    """The real engine: CRIU through ``torpor._process._selfdump``."""
    from .._process._selfdump import self_checkpoint

    return self_checkpoint(
        dest, leave_running=leave_running, tcp_established=tcp_established, name=name, labels=labels
    )


@dataclass(frozen=True)
class CheckpointResult:
    """What ``checkpoint()`` returns, in the restored copy and in a ``leave_running`` original.

    ``restored`` tells which of the two this is; ``restore_count`` how many restores this
    process has lived through; ``restored_at`` the last one (UTC); ``checkpointed_at`` when this
    checkpoint was taken. ``series``: in a supervised process, the checkpoint in its series
    (``NAME.sNNNNNN@POOL``) a checkpoint taken without a path became; its ``image`` is None
    then (the local copy was dropped once the pool had it).
    """

    restored: bool
    image: Path | None
    restore_count: int
    restored_at: datetime | None
    checkpointed_at: datetime
    series: str | None = None


@dataclass(frozen=True)
class RestoreInfo:
    """Was this process restored, when, how many times, and how long ago.

    ``uptime_since_restore`` is in seconds (None if never restored). ``monotonic_jump`` is how
    far ``time.monotonic()`` moved *unlike* the wall clock across the last restore: about 0 when
    the restore kept the monotonic clock (same boot, or a time namespace), large or negative
    after a restore on another host or boot. Timers and deadlines computed from monotonic time
    before the checkpoint are off by that much.
    """

    restored: bool
    restore_count: int
    restored_at: datetime | None
    uptime_since_restore: float | None
    image: Path | None
    monotonic_jump: float | None


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def _offender_line(decision: _policy.Decision) -> str:
    info = decision.info
    where = opened_at(info)
    line = f"{info.describe()}: {decision.reason}"
    return f"{line} [opened at {where}]" if where else line


class Coordinator:
    """Runs coordinated checkpoints of this process.

    ``engine`` dumps the process (default: :func:`selfdump_engine`), ``context`` is notified
    (default: torpor's root context), ``scan`` lists the descriptors (default: /proc/self).
    ``hold`` says whether the other threads are held from the dump to the end of the
    after-restore hooks (default: :func:`configure_hold`'s setting, on unless switched off).
    """

    def __init__(
        self,
        engine: Engine | None = None,
        context: Context | None = None,
        *,
        scan: Callable[[], list[_fds.FdInfo]] = _fds.scan,
        hold: bool | None = None,
    ) -> None:
        self._engine: Engine = engine or selfdump_engine
        self._context = context if context is not None else root_context()
        self._scan = scan
        self._hold = hold
        self._lock = threading.Lock()
        # The restore state has its own lock: hooks (and request threads) read it while a
        # checkpoint holds ``_lock``.
        self._state_lock = threading.Lock()
        self._count = 0
        self._restored_at: datetime | None = None
        self._restored_mono: float | None = None
        self._image: Path | None = None
        self._jump: float | None = None

    def checkpoint(
        self,
        to: str | os.PathLike[str] | None = None,
        *,
        leave_running: bool = False,
        tcp_established: bool = False,
        name: str | None = None,
        labels: Mapping[str, str] | None = None,
        fd_rules: Iterable[_policy.FdRule] = (),
    ) -> CheckpointResult:
        """Checkpoint this process into the image directory ``to`` (see the module docstring).

        Without ``to`` the image goes to a fresh temporary directory; in a supervised process
        (``torpor run --checkpoint-every``) it joins the process's series of checkpoints in
        its pool (``result.series``) and the local copy is removed once the pool has it.

        Returns in the restored copy (``restored=True``) and, with ``leave_running``, in the
        original (``restored=False``). Raises :class:`CheckpointError` (hooks),
        ``CheckpointRefusedError`` (descriptors), ``DumpError`` (CRIU) with the application
        left running, or :class:`RestoreHookError` (with ``.result``) when after-restore hooks
        failed.
        """
        if in_notification():
            raise CheckpointInProgressError(
                "checkpoint requested from inside a checkpoint/restore hook",
                hint="hooks must not checkpoint; request it from the application's own code",
            )
        own = dict(labels or {})
        scratch: Path | None = None
        if to is None:
            scratch = Path(tempfile.mkdtemp(prefix="torpor-checkpoint-"))
            dest = scratch / "image"
            own[SERIES_ONLY_LABEL] = "1"
        else:
            dest = Path(to).absolute()
        try:
            with self._lock:
                result = self._run(dest, leave_running, tcp_established, name, own, tuple(fd_rules))
        except BaseException:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            raise
        if scratch is not None and result.series is not None and not result.restored:
            shutil.rmtree(scratch, ignore_errors=True)  # it is in the pool: nothing to keep
            result = dataclasses.replace(result, image=None)
        return result

    def _run(
        self,
        dest: Path,
        leave_running: bool,
        tcp_established: bool,
        name: str | None,
        labels: dict[str, str],
        call_rules: tuple[_policy.FdRule, ...],
    ) -> CheckpointResult:
        rules = _policy.effective_rules(call_rules)
        taken = datetime.now(UTC)
        wall0, mono0 = time.time(), time.monotonic()
        reopener = _policy.Reopener()
        hold: _hold.Hold | None = None
        try:
            self._context.before_checkpoint()
            decisions = _policy.decide(
                self._scan(), rules, partial(_fds.problem, tcp_established=tcp_established)
            )
            refused = [d for d in decisions if d.action == "error"]
            if refused:
                lines = [_offender_line(d) for d in refused]
                raise CheckpointRefusedError(
                    f"checkpoint refused: {len(lines)} descriptor(s) would break the restore: "
                    + "; ".join(lines),
                    offenders=lines,
                    hint="close them in a before_checkpoint hook, or set an fd policy "
                    "(TORPOR_FD_POLICY); torpor.track_fds() shows where they were opened",
                )
            reopener.apply(decisions)
            hold = _hold.begin(self._hold)
            _trim()
            if hold is not None:
                hold.start()
            outcome = self._engine(
                dest,
                leave_running=leave_running,
                tcp_established=tcp_established,
                name=name,
                labels=labels,
            )
        except BaseException as exc:
            if hold is not None:
                hold.arm()
            try:
                self._rollback(exc, reopener.restore())
            finally:
                if hold is not None:
                    hold.release()
            raise  # _rollback re-raises; this keeps the type checker informed
        if hold is not None:
            hold.arm()
        try:
            return self._after_dump(outcome, reopener, taken, wall0, mono0)
        finally:
            if hold is not None:
                hold.release()

    def _after_dump(
        self,
        outcome: DumpOutcome,
        reopener: _policy.Reopener,
        taken: datetime,
        wall0: float,
        mono0: float,
    ) -> CheckpointResult:
        with self._state_lock:
            if outcome.restored:
                self._count += 1
                self._restored_at = datetime.now(UTC)
                self._restored_mono = time.monotonic()
                self._jump = (self._restored_mono - mono0) - (time.time() - wall0)
                self._image = outcome.image
            result = CheckpointResult(
                restored=outcome.restored,
                image=outcome.image,
                restore_count=self._count,
                restored_at=self._restored_at,
                checkpointed_at=taken,
                series=None if outcome.restored else getattr(outcome, "series", None),
            )
        failures = reopener.restore()
        try:
            self._context.after_restore()
        except RestoreHookError as group:
            failures.extend(group.exceptions)
        if failures:
            err = RestoreHookError(failures, hint="the process is running; check the hooks above")
            err.result = result
            raise err
        return result

    def _rollback(self, exc: BaseException, failures: list[Exception]) -> None:
        """Undo a checkpoint that failed before the dump, then raise."""
        try:
            self._context.after_restore()
        except RestoreHookError as group:
            failures.extend(group.exceptions)
        if not failures or not isinstance(exc, Exception):
            raise exc
        for f in failures:
            f.add_note("while rolling back the failed checkpoint")
        primary = list(exc.exceptions) if isinstance(exc, CheckpointError) else [exc]
        raise CheckpointError(
            [*primary, *failures], hint="no image was written; some resources did not recover"
        ) from None

    def restore_info(self) -> RestoreInfo:
        """Whether (and when, how often) this process was restored (callable from hooks)."""
        with self._state_lock:
            up = None if self._restored_mono is None else time.monotonic() - self._restored_mono
            return RestoreInfo(
                restored=self._count > 0,
                restore_count=self._count,
                restored_at=self._restored_at,
                uptime_since_restore=up,
                image=self._image,
                monotonic_jump=self._jump,
            )


_default: Coordinator | None = None
_default_lock = threading.Lock()


def default_coordinator() -> Coordinator:
    """The process's coordinator (real engine, root context), created on first use."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Coordinator()
    return _default
