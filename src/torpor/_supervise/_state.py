"""The supervision record of a process: its :class:`State` (the spec, whether it is supervised,
stopped, given up or shut down, and what happened so far), one JSON file per name in
``<home>/supervised/NAME.json``.

Written whole or not at all (:func:`torpor._safe.replace_file`: a temporary 0600 file renamed
over the name, fsynced: the record is what ``torpor resume --all`` brings back after the host
died). Every read-modify-write (:func:`update`) holds the ``flock`` of ``NAME.lock`` beside it,
so the supervisor and a command (``torpor stop``, ``torpor unsupervise``) never lose each
other's changes. Lock files stay (unlinking one under a waiter would let two hold "it").

Read as hostile (torpor runs as root and a record names a command a resume runs): opened
``O_NOFOLLOW`` relative to the checked directory, a regular file torpor could have written, at
most :data:`._spec.MAX_RECORD` bytes, every field type- and range-checked, the spec by
:meth:`._spec.Spec.from_json`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import _paths, _safe
from .._errors import NotFoundError, TorporError, UnsafePathError
from ._spec import SUFFIX, Spec, SupervisionRecordError, read_record, record_file

STATUSES = ("supervised", "stopped", "given-up", "shutdown")
_LOCK_SUFFIX = ".lock"
_MAX_COUNT = 1 << 40
_MAX_TEXT = 4096  # characters of a reason or an image name


@dataclass(frozen=True)
class Crash:
    """How a supervised process last ended abnormally: killed by ``signal``, or exited with
    ``exit_code`` (both None: unknown, its keeper died too), after ``uptime_s``."""

    time: str
    signal: int | None
    exit_code: int | None
    uptime_s: float | None


@dataclass(frozen=True)
class LastCheckpoint:
    """The newest checkpoint of the series: the pool image, when, how long it took, how long
    the app was frozen (None: not measured) and the bytes it added to the pool."""

    image: str
    time: str
    duration_s: float
    frozen_ms: float | None
    new_bytes: int | None


@dataclass(frozen=True)
class State:
    """The supervision record of ``spec.name``.

    ``status``: ``supervised``; ``stopped`` (``torpor stop``); ``given-up`` (the restart policy
    gave up, ``given_up`` says why); ``shutdown`` (the supervisor was stopped by SIGTERM:
    ``torpor resume --all`` brings it back)."""

    spec: Spec
    status: str
    restores: int = 0
    kept: int = 0
    last_crash: Crash | None = None
    last_checkpoint: LastCheckpoint | None = None
    given_up: str | None = None
    failed_checkpoints: int = 0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"supervision status {self.status!r} is not one of {STATUSES}")

    @property
    def name(self) -> str:
        """The managed process's name."""
        return self.spec.name

    def evolve(self, **changes: Any) -> State:
        """A copy with ``changes`` applied."""
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The record as written."""
        out = asdict(self)
        out["spec"] = self.spec.to_json()
        return out


# -- the directory ----------------------------------------------------------------------------


@contextlib.contextmanager
def _dir(*, create: bool) -> Iterator[tuple[int, Path] | None]:
    """The supervision directory, checked, opened ``O_NOFOLLOW`` and checked again by fd; None
    (without ``create``) when the home or the directory does not exist yet."""
    if create:
        path = _paths.supervised_dir()
    else:
        try:
            present = _paths.home_path().exists()
        except OSError:  # not ours to look into: home() says so in one line
            present = True
        if not present:
            yield None
            return
        path = _paths.home() / "supervised"
    try:
        fd = _safe.open_dir(path)
    except FileNotFoundError:
        if create:
            raise
        yield None
        return
    try:
        _safe.check_private(path, what="supervision directory", fd=fd)
        yield fd, path
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(dir_fd: int, dir_path: Path, name: str) -> Iterator[None]:
    """The ``flock`` of ``NAME.lock`` in the supervision directory, held for the block."""
    file = name + _LOCK_SUFFIX
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(file, flags, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        raise UnsafePathError(
            f"lock file {dir_path / file} cannot be opened ({exc.strerror}); refused",
            path=dir_path / file,
            hint=f"torpor did not make it: remove {dir_path / file}",
        ) from exc
    try:
        problem = _safe.private_file_problem(os.fstat(fd))
        if problem is not None:
            raise UnsafePathError(
                f"lock file {dir_path / file} {problem}; refused",
                path=dir_path / file,
                hint=f"torpor did not make it: remove {dir_path / file}",
            )
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # lets go of the lock


# -- writing ----------------------------------------------------------------------------------


def save(state: State) -> None:
    """Write (or replace) the record of ``state.name`` atomically and durably (0600)."""
    file = record_file(state.name)
    with _dir(create=True) as opened:
        assert opened is not None
        dir_fd, path = opened
        with _locked(dir_fd, path, state.name):
            _write(dir_fd, path, file, state)


def _write(dir_fd: int, dir_path: Path, file: str, state: State) -> None:
    data = json.dumps(state.to_json(), indent=2, sort_keys=True, allow_nan=False).encode()
    try:
        _safe.replace_file(dir_fd, file, data, source="supervision directory")
    except OSError as exc:  # a full disk: one line naming it
        raise TorporError(
            f"cannot write the supervision record {dir_path / file}: {exc.strerror or exc}",
            hint=f"free space on the disk of {dir_path}",
        ) from exc


def update(name: str, fn: Callable[[State], State]) -> State:
    """Replace the record of ``name`` by ``fn(record)`` under its lock; the new state.
    :class:`~torpor.NotFoundError` if ``name`` has none (it is not supervised)."""
    file = record_file(name)
    with _dir(create=True) as opened:
        assert opened is not None
        dir_fd, path = opened
        with _locked(dir_fd, path, name):
            old = _read(dir_fd, path, file, name)
            if old is None:
                raise _not_supervised(name)
            new = fn(old)
            if new.name != name:
                raise ValueError(f"update of {name!r} returned the state of {new.name!r}")
            _write(dir_fd, path, file, new)
            return new


def remove(name: str) -> None:
    """Forget the record of ``name`` (nothing if it has none)."""
    file = record_file(name)
    with _dir(create=False) as opened:
        if opened is None:
            return
        dir_fd, path = opened
        with _locked(dir_fd, path, name), contextlib.suppress(FileNotFoundError):
            os.unlink(file, dir_fd=dir_fd)


def _not_supervised(name: str) -> NotFoundError:
    return NotFoundError(
        f"{name!r} is not supervised", hint=f"`torpor supervise {name}` supervises it"
    )


# -- reading ----------------------------------------------------------------------------------


def read(name: str) -> State | None:
    """The record of ``name``, or None if it has none. :class:`SupervisionRecordError` or
    :class:`~torpor.UnsafePathError` (one line naming the file and the field) if torpor did
    not write it."""
    file = record_file(name)
    with _dir(create=False) as opened:
        if opened is None:
            return None
        dir_fd, path = opened
        return _read(dir_fd, path, file, name)


def list_all(skipped: list[TorporError] | None = None) -> list[State]:
    """Every record, by name. Records that cannot be trusted are left out (and their errors
    appended to ``skipped``, when given)."""
    out: list[State] = []
    with _dir(create=False) as opened:
        if opened is None:
            return out
        dir_fd, path = opened
        with os.scandir(dir_fd) as it:
            files = sorted(e.name for e in it)
        for file in files:
            if file.startswith(".") or not file.endswith(SUFFIX):
                continue  # temporary files of replace_file, lock files, the daemon's lock
            try:
                state = _read(dir_fd, path, file, file[: -len(SUFFIX)])
            except (TorporError, OSError) as exc:
                if skipped is not None:
                    err = exc if isinstance(exc, TorporError) else _bad(path / file, str(exc))
                    skipped.append(err)
                continue
            if state is not None:
                out.append(state)
    return out


def _read(dir_fd: int, dir_path: Path, file: str, name: str) -> State | None:
    source = str(dir_path / file)
    data = read_record(dir_fd, file, source=source)
    if data is None:
        return None
    return parse(data, source=source, name=name)


def parse(data: dict[str, Any], *, source: str, name: str | None = None) -> State:
    """The state in the JSON object ``data`` read from ``source`` (hostile: see the module
    docstring); ``name``: the name it must be the record of."""
    if "spec" not in data or "status" not in data:
        raise _bad(source, "lacks " + " and ".join(k for k in ("spec", "status") if k not in data))
    spec = Spec.from_json(data["spec"], source=source)
    if name is not None and spec.name != name:
        raise _bad(source, f"is the record of another process ({spec.name!r})")
    status = data["status"]
    if not isinstance(status, str) or status not in STATUSES:
        raise _bad(source, f"has a bad status ({_short(status)})")
    values: dict[str, Any] = {"spec": spec, "status": status}
    for key in ("restores", "kept", "failed_checkpoints"):
        if key in data:
            values[key] = _count(data[key], source, key)
    if data.get("given_up") is not None:
        values["given_up"] = _text(data["given_up"], source, "given_up")
    if data.get("last_crash") is not None:
        values["last_crash"] = _crash(data["last_crash"], source)
    if data.get("last_checkpoint") is not None:
        values["last_checkpoint"] = _checkpoint(data["last_checkpoint"], source)
    return State(**values)


def _crash(data: object, source: str) -> Crash:
    what = "last_crash"
    obj = _object(data, source, what)
    sig = _opt_int(obj.get("signal"), source, f"{what}.signal", 1, 128)
    code = _opt_int(obj.get("exit_code"), source, f"{what}.exit_code", 0, 255)
    uptime = _opt_seconds(obj.get("uptime_s"), source, f"{what}.uptime_s")
    time = _time(obj.get("time"), source, f"{what}.time")
    return Crash(time=time, signal=sig, exit_code=code, uptime_s=uptime)


def _checkpoint(data: object, source: str) -> LastCheckpoint:
    what = "last_checkpoint"
    obj = _object(data, source, what)
    image = obj.get("image")
    if not _safe.is_plain_name(image):
        raise _bad(source, f"has a bad {what}.image ({_short(image)})")
    assert isinstance(image, str)
    duration = _opt_seconds(obj.get("duration_s"), source, f"{what}.duration_s")
    if duration is None:
        raise _bad(source, f"lacks {what}.duration_s")
    frozen = _opt_seconds(obj.get("frozen_ms"), source, f"{what}.frozen_ms", high=1e12)
    new_bytes = obj.get("new_bytes")
    if new_bytes is not None:
        new_bytes = _count(new_bytes, source, f"{what}.new_bytes", high=1 << 60)
    return LastCheckpoint(
        image=image,
        time=_time(obj.get("time"), source, f"{what}.time"),
        duration_s=duration,
        frozen_ms=frozen,
        new_bytes=new_bytes,
    )


def _object(data: object, source: str, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise _bad(source, f"has a bad {what} ({_short(data)})")
    return data


def _count(value: object, source: str, what: str, *, high: int = _MAX_COUNT) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise _bad(source, f"has a bad {what} ({_short(value)})")
    return value


def _opt_int(value: object, source: str, what: str, low: int, high: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(source, f"has a bad {what} ({_short(value)})")
    return value


def _opt_seconds(value: object, source: str, what: str, *, high: float = 1e9) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(source, f"has a bad {what} ({_short(value)})")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        number = math.inf
    if not (math.isfinite(number) and 0 <= number <= high):
        raise _bad(source, f"has a bad {what} ({_short(value)})")
    return number


def _text(value: object, source: str, what: str) -> str:
    if not isinstance(value, str) or len(value) > _MAX_TEXT:
        raise _bad(source, f"has a bad {what} ({_short(value)})")
    # Shown by `torpor ps`: no terminal escapes.
    return "".join(c if c.isprintable() else "?" for c in value)


def _time(value: object, source: str, what: str) -> str:
    if isinstance(value, str) and len(value) <= 64:
        try:
            datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            return value
    raise _bad(source, f"has a bad {what} ({_short(value)})")


def _short(value: object) -> str:
    if isinstance(value, int) and value.bit_length() > 64:
        return "a huge number"  # repr() of one of thousands of digits raises
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _bad(source: str | Path, problem: str) -> SupervisionRecordError:
    return SupervisionRecordError(
        f"supervision record {source} {problem}; refused",
        hint=f"torpor did not write it: remove {source}",
    )
