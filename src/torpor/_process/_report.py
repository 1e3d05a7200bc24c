"""What a checkpointer's report means to the command that started it (see
:mod:`._checkpointer`): the :class:`Outcome` of a committed checkpoint, torpor errors carried
across the report pipe as JSON (:func:`encode_error`, :func:`decode_error`), and, when the
checkpointer ended without a report, what it left behind (:func:`orphaned`).

What a dead checkpointer left on disk is not taken on trust: :func:`orphaned` opens (and so
checks) an image before it calls the checkpoint committed.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._errors import DumpError, TorporError
from .._images._image import Image, Staging
from .._images._incomplete import IN_USE, INCOMPLETE, STALE, IncompleteImageError, scan, sweep
from .._images._manifest import Manifest
from ._proc import ProcRef, status_field

_EXIT_GRACE = 5.0  # seconds


@dataclass(frozen=True)
class Outcome:
    """A committed checkpoint: ``interrupted`` if the command was interrupted once it was too
    late to abort; ``warnings`` for the user (the image is fine). With a pool: ``stored``, the
    name it was stored under, or ``push_error`` (the image is kept at ``image.path``), and
    ``new_bytes``, what the pool grew by. ``frozen_ms``: how long CRIU kept the process frozen
    (its ``stats-dump``; None if unknown)."""

    image: Image
    interrupted: bool = False
    warnings: tuple[str, ...] = ()
    stored: str | None = None
    push_error: TorporError | None = None
    frozen_ms: float | None = None
    new_bytes: int | None = None


def outcome_of(msg: Mapping[str, Any], *, interrupted: bool) -> Outcome:
    """The outcome a checkpointer's final report ``msg`` (``"ok"`` in it) says, or raise its
    error."""
    if not msg["ok"]:
        raise decode_error(msg["error"])
    warnings = tuple(str(w) for w in msg.get("warnings", ()))
    failed = msg.get("push_error")
    frozen = msg.get("frozen_ms")
    new_bytes = msg.get("new_bytes")
    if msg.get("stored") is not None:
        # Pushed: the checkpointer deleted the local copy; its manifest came in the report.
        image = Image(Path(msg["image"]), Manifest.from_json(msg["manifest"]))
    else:
        image = Image.open(msg["image"])
    return Outcome(
        image,
        interrupted=interrupted,
        warnings=warnings,
        stored=msg.get("stored"),
        push_error=decode_error(failed) if failed else None,
        frozen_ms=float(frozen) if isinstance(frozen, int | float) else None,
        new_bytes=int(new_bytes) if isinstance(new_bytes, int) else None,
    )


def orphaned(target: ProcRef, dest: Path, staging: Staging) -> Outcome:
    """The checkpointer of ``target`` into ``dest`` (staged at ``staging``) ended without a
    report (killed): what it left, or the error that says so."""
    pid = target.pid
    # Its end of the pipe may close before its lock goes, and its CRIU, unanswered, may still
    # be thawing the process: give both a moment before looking.
    deadline = time.monotonic() + _EXIT_GRACE
    while target.alive() and _traced(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    while True:
        lefts = [left for left in scan(staging.path.parent) if left.path == staging.path]
        if not lefts or lefts[0].state != IN_USE or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    kept = "the process keeps running" if target.alive() else "the process is gone"
    for left in lefts:
        if left.state == IN_USE:
            raise DumpError(
                f"checkpoint of pid {pid}: the checkpointer ended without a report and "
                f"{left.path} is still in use ({kept})",
                pid=pid,
                hint="`torpor images` shows what became of it",
            )
        if left.state == INCOMPLETE:
            raise IncompleteImageError(
                f"checkpoint of pid {pid}: the checkpointer ended before its image was "
                f"finished ({kept}); it is kept at {left.path}",
                image=left.path,
                hint=f"`torpor image repair {left.path}` finishes it",
            )
        if left.state == STALE:
            sweep(staging.path.parent)
    if not staging.path.exists() and dest.is_dir():
        with contextlib.suppress(TorporError):
            image = Image.open(dest)
            if image.manifest.pid == pid:  # committed; the report was all that was lost
                return Outcome(image)
    raise DumpError(
        f"checkpoint of pid {pid} failed: the checkpointer ended before CRIU had written the "
        f"image ({kept}; nothing was kept)",
        pid=pid,
        hint="checkpoint it again",
    )


def _traced(pid: int) -> bool:
    try:
        return status_field("TracerPid", pid) not in ([], ["0"])
    except OSError:
        return False


# -- errors across the pipe ----------------------------------------------------------------------


def encode_error(exc: BaseException) -> dict[str, Any]:
    """A torpor error as JSON data for :func:`decode_error`; any other exception becomes a
    :class:`DumpError` saying the checkpointer failed."""
    if not isinstance(exc, TorporError):
        return {"class": None, "msg": f"the checkpointer failed: {exc!r}", "hint": None}
    fields = {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in vars(exc).items()
        if k not in ("msg", "hint") and _plain(v)
    }
    cls = type(exc)
    return {
        "class": f"{cls.__module__}:{cls.__qualname__}",
        "msg": exc.msg,
        "hint": exc.hint,
        "fields": fields,
    }


def _plain(value: object) -> bool:
    if value is None or isinstance(value, str | int | float | bool):
        return True
    return isinstance(value, tuple | list) and all(isinstance(v, str) for v in value)


def decode_error(data: Mapping[str, Any]) -> TorporError:
    """The error :func:`encode_error` encoded (a torpor error class, else :class:`DumpError`)."""
    cls: type[TorporError] = DumpError
    where = data.get("class")
    if isinstance(where, str) and where.startswith("torpor.") and ":" in where:
        module, _, qualname = where.partition(":")
        with contextlib.suppress(ImportError, AttributeError):
            found = getattr(importlib.import_module(module), qualname)
            if isinstance(found, type) and issubclass(found, TorporError):
                cls = found
    exc = cls.__new__(cls)
    TorporError.__init__(exc, str(data.get("msg")), hint=data.get("hint"))
    for key, value in dict(data.get("fields") or {}).items():
        setattr(exc, key, tuple(value) if isinstance(value, list) else value)
    return exc
