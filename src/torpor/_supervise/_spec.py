"""What supervising a process means: its :class:`Spec` (command, checkpoint interval, how many
checkpoints to keep, the restart policy), durations as users write them, and :func:`load`, the
fast read of a managed name's active spec that every checkpoint's commit path makes.

A spec is read from two places, both as hostile (torpor runs as root, and a spec names a
command that a restore or ``torpor resume`` may run): the supervision record
``<home>/supervised/NAME.json`` (written by :mod:`._state`) and the ``supervision`` field of
each checkpoint's manifest (signed with it: ``torpor resume NAME@POOL`` reads it there, see
``_series.read_spec``). The pool object ``supervision/NAME`` is a copy torpor writes and never
reads. :meth:`Spec.from_json` is the one check of both: every field's type and range (an
interval of 0 or at least :data:`MIN_INTERVAL`), bounded sizes, one-line errors naming the
source and the field.

A leaf: it imports only the errors, :mod:`torpor._safe` and :mod:`torpor._paths` (name checks
of the images and pools modules are imported where used: those modules import the manifest,
which imports this one).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
from dataclasses import MISSING, dataclass, fields
from typing import Any

from .. import _paths, _safe
from .._errors import TorporError, UsageError

RESTART_POLICIES = ("on-failure", "always", "no")

# A supervision record is a spec and a few counters: a few hundred bytes. Bounds on what is
# read, so a planted file cannot exhaust memory.
MAX_RECORD = 1 << 20
MAX_ARGS = 4096
MAX_COMMAND_BYTES = 256 << 10
MAX_DURATION = 30 * 24 * 3600.0  # 30 days: anything longer is a typo
# The shortest checkpoint interval (0 aside: app-driven checkpoints only). Each checkpoint
# freezes the app and runs CRIU, the prune and a push: shorter, they run back to back and the
# app is frozen more than it runs. The one bound of the CLI (which makes a Spec) and of every
# spec read (Spec.from_json).
MIN_INTERVAL = 0.1
MAX_KEEP = 10_000
MAX_RESTARTS = 10_000
MAX_EXIT_CODES = 256

# The record file of NAME in the supervision directory.
SUFFIX = ".json"

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_HINT = "write a number and a unit: 500ms, 10s, 1.5s, 5m, 1h (or 0)"


class SupervisionRecordError(TorporError):
    """A supervision spec or state (a record in the home, a manifest field, a pool object)
    that torpor did not write: bad JSON, a missing field, a bad type or value."""


# -- durations --------------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``500ms``, ``10s``, ``1.5s``, ``5m``, ``1h`` or a plain ``0``.
    :class:`~torpor.UsageError` naming ``text`` for anything else (a negative, a number without
    its unit, more than 30 days)."""
    if text == "0":
        return 0.0
    m = _DURATION_RE.fullmatch(text)
    if m is None:
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            raise UsageError(f"invalid duration {text!r}: no unit", hint=f"write {text}s")
        raise UsageError(f"invalid duration {text!r}", hint=_DURATION_HINT)
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not math.isfinite(seconds) or seconds > MAX_DURATION:
        raise UsageError(
            f"invalid duration {text!r}: longer than 30 days", hint="use a shorter duration"
        )
    return seconds


def format_duration(seconds: float) -> str:
    """``seconds`` as :func:`parse_duration` reads it, to the millisecond: 0.5 -> ``500ms``,
    10 -> ``10s``, 1.5 -> ``1.5s``, 300 -> ``5m``, 3600 -> ``1h``, 0 -> ``0``."""
    if not math.isfinite(seconds) or seconds < 0:
        return f"{seconds}s"
    ms = round(seconds * 1000)
    if ms == 0:
        return "0"
    if ms % 3_600_000 == 0:
        return f"{ms // 3_600_000}h"
    if ms % 60_000 == 0:
        return f"{ms // 60_000}m"
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    if ms < 1000:
        return f"{ms}ms"
    return f"{ms // 1000}.{ms % 1000:03d}".rstrip("0") + "s"


# -- the spec ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """How a managed process is supervised. Every value is checked when a spec is made
    (:class:`~torpor.UsageError` naming the setting), and :meth:`from_json` checks what is
    read."""

    name: str
    command: tuple[str, ...]
    pool: str = "default"
    interval: float = 0.0  # seconds between checkpoints; 0 = app-driven checkpoints only
    keep: int = 3
    restart: str = "on-failure"
    tcp_established: bool = False
    success_exit_codes: tuple[int, ...] = (0,)
    min_uptime: float = 1.0
    max_restarts: int = 5
    restart_window: float = 300.0
    stop_timeout: float = 5.0

    def __post_init__(self) -> None:
        for f in fields(self):
            problem = _problem(f.name, getattr(self, f.name))
            if problem is not None:
                raise UsageError(
                    f"bad supervision setting {f.name}: {problem}", hint=_HINTS.get(f.name)
                )

    def to_json(self) -> dict[str, Any]:
        """The spec as a JSON object (what :meth:`from_json` reads back)."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["command"] = list(self.command)
        out["success_exit_codes"] = list(self.success_exit_codes)
        return out

    @classmethod
    def from_json(cls, data: object, *, source: str) -> Spec:
        """The spec in ``data`` (parsed JSON from ``source``, hostile):
        :class:`SupervisionRecordError` naming ``source`` and the field unless every field
        has the type and range torpor writes. Unknown fields are ignored (a newer torpor's)."""
        if not isinstance(data, dict):
            raise _bad(source, f"is not a JSON object ({type(data).__name__})")
        missing = sorted(n for n in _REQUIRED if n not in data)
        if missing:
            raise _bad(source, f"lacks {', '.join(missing)}")
        values: dict[str, Any] = {}
        for name, kind in _KINDS.items():
            if name not in data:
                continue
            value = _convert(kind, data[name])
            if value is None:
                raise _bad(source, f"has a bad {name} ({_describe(data[name])})")
            problem = _problem(name, value)
            if problem is not None:
                raise _bad(source, f"has a bad {name}: {problem}")
            values[name] = value
        return cls(**values)


def _bad(source: str, problem: str) -> SupervisionRecordError:
    return SupervisionRecordError(
        f"supervision spec in {source} {problem}; refused",
        hint="torpor did not write it: remove it, then `torpor supervise NAME` again",
    )


def _describe(value: object) -> str:
    if isinstance(value, int) and value.bit_length() > 64:
        return "a huge number"  # repr() of one of thousands of digits raises
    text = repr(value)
    return text if len(text) <= 40 else f"{type(value).__name__} {text[:30]}..."


# field -> how its JSON value is read ("str", "int", "float", "bool", "strs", "ints")
_KINDS: dict[str, str] = {
    "name": "str",
    "command": "strs",
    "pool": "str",
    "interval": "float",
    "keep": "int",
    "restart": "str",
    "tcp_established": "bool",
    "success_exit_codes": "ints",
    "min_uptime": "float",
    "max_restarts": "int",
    "restart_window": "float",
    "stop_timeout": "float",
}
_REQUIRED = {f.name for f in fields(Spec) if f.default is MISSING}
assert set(_KINDS) == {f.name for f in fields(Spec)}

_HINTS = {
    "interval": f"checkpoint every {format_duration(MIN_INTERVAL)} or more (500ms, 10s, 5m), "
    "or 0: only when the app asks",
    "min_uptime": _DURATION_HINT,
    "restart_window": _DURATION_HINT,
    "stop_timeout": _DURATION_HINT,
    "keep": f"keep 1 to {MAX_KEEP} checkpoints",
    "restart": f"use one of {', '.join(RESTART_POLICIES)}",
    "success_exit_codes": "list exit codes 0-255, separated by commas",
    "max_restarts": f"allow 0 to {MAX_RESTARTS} restarts",
}


def _convert(kind: str, value: object) -> Any:
    """``value`` as ``kind`` (a list as a tuple), or None if it has another type (a bool is
    not a number here)."""
    if kind == "bool":
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    if kind == "str":
        return value if isinstance(value, str) else None
    if kind == "int":
        return value if isinstance(value, int) else None
    if kind == "float":
        if not isinstance(value, (int, float)):
            return None
        try:
            return float(value)
        except OverflowError:  # an int too large for a float: out of every range anyway
            return math.inf
    if not isinstance(value, list) or len(value) > MAX_ARGS:
        return None
    want: type = str if kind == "strs" else int
    if not all(isinstance(v, want) and not isinstance(v, bool) for v in value):
        return None
    return tuple(value)


def _problem(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for the field ``name`` (its type taken as right), or
    None. The one check of a spec's values, made or read."""
    if name == "name":
        return _name_problem(value, "process name")
    if name == "pool":
        return _pool_problem(value)
    if name == "command":
        return _command_problem(value)
    if name in ("interval", "min_uptime", "restart_window", "stop_timeout"):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return "not a number of seconds"
        if not math.isfinite(value) or value < 0:
            return f"{value} is not a duration"
        if value > MAX_DURATION:
            return f"{value} s is longer than 30 days"
        if name == "restart_window" and value == 0:
            return "must be longer than 0"
        if name == "interval" and 0 < value < MIN_INTERVAL:
            return f"{value:g} s is shorter than {format_duration(MIN_INTERVAL)}"
        return None
    if name in ("keep", "max_restarts"):
        low, high = (1, MAX_KEEP) if name == "keep" else (0, MAX_RESTARTS)
        if not isinstance(value, int) or isinstance(value, bool):
            return "not a whole number"
        return None if low <= value <= high else f"{_describe(value)} is not within {low}-{high}"
    if name == "restart":
        ok = isinstance(value, str) and value in RESTART_POLICIES
        return None if ok else f"{value!r} is not one of {', '.join(RESTART_POLICIES)}"
    if name == "tcp_established":
        return None if isinstance(value, bool) else "not true or false"
    if name == "success_exit_codes":
        if not isinstance(value, tuple) or len(value) > MAX_EXIT_CODES:
            return f"not a list of at most {MAX_EXIT_CODES} exit codes"
        bad = [c for c in value if isinstance(c, bool) or not isinstance(c, int)]
        bad += [c for c in value if isinstance(c, int) and not 0 <= c <= 255]
        return None if not bad else f"{_describe(bad[0])} is not an exit code (0-255)"
    return f"unknown setting {name!r}"


def _name_problem(value: object, what: str) -> str | None:
    from .._images._store import check_name  # imports the manifest, which imports us

    if not isinstance(value, str):
        return "not a string"
    try:
        check_name(value, what=what)
    except UsageError:
        return f"{_describe(value)} is not a valid {what}"
    if value in ("keeper", "agent"):  # logs/NAME.log would be torpor's own log
        return f"{value!r} is reserved"
    return None


def _pool_problem(value: object) -> str | None:
    from .._pools._config import check_pool_name  # imports the manifest, which imports us

    if not isinstance(value, str):
        return "not a string"
    try:
        check_pool_name(value)
    except UsageError:
        return f"{_describe(value)} is not a valid pool name"
    return None


def _command_problem(value: object) -> str | None:
    if not isinstance(value, tuple) or not all(isinstance(a, str) for a in value):
        return "not a list of strings"
    if not value or not value[0]:
        return "is empty"
    if len(value) > MAX_ARGS:
        return f"has more than {MAX_ARGS} arguments"
    size = 0
    for arg in value:
        if "\0" in arg:
            return "holds a NUL byte"
        try:
            size += len(arg.encode())
        except UnicodeEncodeError:
            return "is not valid UTF-8"
        if size > MAX_COMMAND_BYTES:
            return f"is longer than {MAX_COMMAND_BYTES} bytes"
    return None


# -- the record in the home -------------------------------------------------------------------


def record_file(name: str) -> str:
    """The file name of the supervision record of ``name`` (``NAME.json``), the name checked."""
    problem = _name_problem(name, "process name")
    if problem is not None:
        raise UsageError(
            f"invalid process name {name!r}: {problem}",
            hint="use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name + SUFFIX


def read_record(dir_fd: int, file: str, *, source: str) -> dict[str, Any] | None:
    """The JSON object in the record ``file`` of the supervision directory ``dir_fd``, or None
    if there is none. Hostile: opened ``O_NOFOLLOW``, must be a regular file torpor could have
    written (:func:`torpor._safe.private_file_problem`), at most :data:`MAX_RECORD` bytes, a
    JSON object; else :class:`SupervisionRecordError` or :class:`~torpor.UnsafePathError`."""
    try:
        fd = os.open(
            file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _unsafe(source, "is a symlink") from exc
        raise SupervisionRecordError(
            f"cannot read supervision record {source}: {exc.strerror}",
            hint="check the permissions of the supervision directory",
        ) from exc
    try:
        problem = _safe.private_file_problem(os.fstat(fd))
        if problem is not None:
            raise _unsafe(source, problem)
        raw = os.read(fd, MAX_RECORD + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_RECORD:
        raise _malformed(source, f"is larger than {MAX_RECORD} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise _malformed(source, "is not JSON") from exc
    if not isinstance(data, dict):
        raise _malformed(source, "is not a JSON object")
    return data


def _unsafe(source: str, problem: str) -> TorporError:
    from .._errors import UnsafePathError

    return UnsafePathError(
        f"supervision record {source} {problem}; refused",
        path=source,
        hint=f"torpor did not write it: remove {source}",
    )


def _malformed(source: str, problem: str) -> SupervisionRecordError:
    return SupervisionRecordError(
        f"supervision record {source} {problem}; refused",
        hint=f"torpor did not write it: remove {source}",
    )


def load(name: str) -> Spec | None:
    """The active spec of the managed process ``name``: the spec of its supervision record
    when that says ``supervised``, else None (not supervised, or stopped, given up, shut
    down).

    Called on every checkpoint's commit path, so it is cheap (the supervision directory and
    the record opened ``O_NOFOLLOW``, nothing created) and never fails the checkpoint: a
    missing home or directory, or a record torpor cannot trust, is None here (``torpor ps``
    and the supervisor report an untrusted record, through :func:`._state.read`)."""
    try:
        file = record_file(name)
        dir_fd = _safe.open_dir(_paths.home_path() / "supervised")
    except (OSError, TorporError):
        return None
    try:
        _safe.check_private(_paths.home_path() / "supervised", fd=dir_fd)
        data = read_record(dir_fd, file, source=file)
        if data is None or data.get("status") != "supervised":
            return None
        return Spec.from_json(data.get("spec"), source=file)
    except (OSError, TorporError):
        return None
    finally:
        os.close(dir_fd)
