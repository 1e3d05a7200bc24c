"""The coordination errors that do not fit torpor's flat tree in ``torpor._errors``.

::

    TorporError
    └── CoordinationError                      (torpor._errors)
        ├── CheckpointRefusedError             (torpor._errors) blocking descriptors
        ├── CheckpointInProgressError          (torpor._errors) checkpoint from inside a hook
        ├── NotCoordinatedError                nothing listens in the target process
        └── RemoteCheckpointError              the target process reported a failure
    CheckpointError(ExceptionGroup, TorporError)   before-checkpoint hooks failed; no image
    RestoreHookError(ExceptionGroup, TorporError)  after-restore hooks failed; process runs

The two groups hold the hooks' own exceptions, each with a note naming the resource and phase,
so ``except* ConnectionError`` works on them. ``RestoreHookError`` is named so to stay apart from
``torpor._errors.RestoreError``, which is CRIU failing to restore an image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

from .._errors import CoordinationError, TorporError

_SHOWN = 3


def _summary(what: str, excs: Sequence[BaseException]) -> str:
    parts = []
    for exc in excs[:_SHOWN]:
        where = f" ({exc.__notes__[0]})" if getattr(exc, "__notes__", None) else ""
        parts.append(f"{type(exc).__name__}: {exc}{where}")
    more = f"; and {len(excs) - _SHOWN} more" if len(excs) > _SHOWN else ""
    plural = "s" if len(excs) != 1 else ""
    return f"{len(excs)} hook{plural} failed {what}: " + "; ".join(parts) + more


class _HookFailures(ExceptionGroup[Exception], TorporError):
    """Shared machinery of the two hook failure groups (not raised itself)."""

    _what = ""

    def __new__(cls, excs: Sequence[Exception], *, hint: str | None = None) -> Self:
        return super().__new__(cls, _summary(cls._what, excs), excs)

    def __init__(self, excs: Sequence[Exception], *, hint: str | None = None) -> None:
        super().__init__(_summary(self._what, excs), excs)
        self.msg = _summary(self._what, excs)
        self.hint = hint

    def derive(self, excs: Sequence[Exception]) -> Self:  # type: ignore[override]
        """Keep the class (and hint) when ``except*`` or ``split`` takes the group apart."""
        return type(self)(excs, hint=self.hint)

    def __str__(self) -> str:
        return TorporError.__str__(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), list(self.exceptions), self.hint))


def _rebuild(cls: type[_HookFailures], excs: list[Exception], hint: str | None) -> _HookFailures:
    return cls(excs, hint=hint)


class CheckpointError(_HookFailures):
    """Before-checkpoint hooks failed: no image was written and the resources already notified
    were told ``after_restore`` at once, so the application runs on as before.

    ``exceptions`` holds every failure (rollback failures too, noted as such).
    """

    _what = "before checkpoint"


class RestoreHookError(_HookFailures):
    """After-restore hooks failed. The process is running (restored, or the original after a
    ``leave_running`` checkpoint, or after an aborted one); ``result`` is the checkpoint's
    result when there is one.
    """

    _what = "after restore"
    result: object = None


class NotCoordinatedError(CoordinationError):
    """No torpor listener in the target process: it does not use torpor's coordination (or has
    it switched off). A plain, uncoordinated dump is the caller's fallback.
    """

    def __init__(self, msg: str, *, pid: int, hint: str | None = None) -> None:
        super().__init__(msg, hint=hint)
        self.pid = pid


class RemoteCheckpointError(CoordinationError):
    """The target process ran the coordinated checkpoint and reported a failure.

    ``kind`` is the remote exception's class name, ``details`` its lines (hook failures,
    refused descriptors, CRIU log lines).
    """

    def __init__(
        self,
        msg: str,
        *,
        pid: int,
        kind: str,
        details: Sequence[str] = (),
        hint: str | None = None,
    ) -> None:
        super().__init__(msg, hint=hint)
        self.pid = pid
        self.kind = kind
        self.details = tuple(details)
