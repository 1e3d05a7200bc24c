"""The event log of a supervised process (``torpor events``): one JSON object a line in
``<home>/events/NAME.jsonl``.

Appended with ``O_APPEND`` and one ``write()`` a line of less than :data:`MAX_LINE` bytes (long
strings truncated), so concurrent writers (the supervisor, ``torpor stop``) never interleave
within a line. Past :data:`MAX_FILE` bytes the file is renamed to ``NAME.jsonl.1`` (replacing
the older one) under its ``flock``: the log keeps between 1 and 2 MiB of history.

Read as hostile: files opened ``O_NOFOLLOW``, regular files torpor could have written, read
from at most :data:`MAX_FILE` bytes from their end; a line that is not an event (garbage, a
partial line of a crashed writer, a bad field) is skipped and counted, never fatal. Strings read
have their control characters replaced (they are printed to terminals).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import _paths, _safe
from .._errors import UnsafeImageError, UnsafePathError
from ._spec import record_file

KINDS = (
    "supervise",
    "unsupervise",
    "checkpoint",
    "checkpoint-failed",
    "step-failed",
    "crash",
    "restore",
    "restore-failed",
    "skipped",
    "give-up",
    "stop",
    "shutdown",
    "resume",
    "lease",
)
MAX_LINE = 4096  # bytes of one event line, newline included
MAX_FILE = 1 << 20  # bytes of the current file before it is rotated
SUFFIX = ".jsonl"
OLD_SUFFIX = ".jsonl.1"
_FIELD_LIMITS = (1024, 256, 64)  # characters a string field is cut to, in turn, to fit a line
_KIND_RE = re.compile(r"[a-z][a-z-]{0,31}")  # a newer torpor's kinds are read too
_MAX_FIELDS = 64

Value = str | int | float | bool | None


@dataclass(frozen=True)
class Event:
    """One event: when (ISO 8601, UTC, milliseconds), what (one of :data:`KINDS`) and its
    fields (JSON scalars)."""

    time: str
    kind: str
    fields: Mapping[str, Any]


def now() -> str:
    """The current time as events write it: ISO 8601, UTC, milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- writing ----------------------------------------------------------------------------------


def append(name: str, kind: str, **fields: Value) -> None:
    """Append the event ``kind`` of ``name``, with ``fields`` and the current time."""
    if kind not in KINDS:
        raise ValueError(f"unknown event kind {kind!r}")
    for key in ("time", "kind"):
        if key in fields:
            raise ValueError(f"event field {key!r} is set by append")
    base = record_file(name)[: -len(".json")]  # the name, checked
    line = encode(kind, fields, time=now())
    events = _paths.events_dir()
    dir_fd = _safe.open_dir(events)
    try:
        _safe.check_private(events, what="events directory", fd=dir_fd)
        _append(dir_fd, events, base + SUFFIX, base + OLD_SUFFIX, line)
    finally:
        os.close(dir_fd)


def encode(kind: str, fields: Mapping[str, Value], *, time: str) -> bytes:
    """The line of an event, under :data:`MAX_LINE` bytes: long strings are cut (and the event
    marked ``truncated``), and fields beyond what fits dropped."""
    clean: dict[str, Value] = {}
    for key, value in fields.items():
        if isinstance(value, float) and not math.isfinite(value):
            value = None  # JSON has no NaN
        clean[key] = value
    for limit in (None, *_FIELD_LIMITS):
        obj: dict[str, Value] = {"time": time, "kind": kind}
        cut = False
        for key, value in clean.items():
            if limit is not None and isinstance(value, str) and len(value) > limit:
                value, cut = value[:limit] + "...", True
            obj[key] = value
        if cut:
            obj["truncated"] = True
        line = (json.dumps(obj, ensure_ascii=True, allow_nan=False) + "\n").encode()
        if len(line) < MAX_LINE:
            return line
    # Too many fields even with short strings: keep what fits.
    obj = {"time": time, "kind": kind, "truncated": True}
    for key, value in clean.items():
        if isinstance(value, str):
            value = value[: _FIELD_LIMITS[-1]]
        trial = {**obj, key: value}
        if len(json.dumps(trial, ensure_ascii=True)) + 1 >= MAX_LINE:
            break
        obj = trial
    return (json.dumps(obj, ensure_ascii=True) + "\n").encode()


_APPEND = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _append(dir_fd: int, dir_path: Path, file: str, old: str, line: bytes) -> None:
    for _ in range(8):  # files rotated under our feet, in a row
        fd = _open_append(dir_fd, dir_path, file)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            try:
                current = os.stat(file, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # rotated away meanwhile: append to the new one
            if (current.st_dev, current.st_ino) != (st.st_dev, st.st_ino):
                continue
            if st.st_size + len(line) > MAX_FILE and st.st_size > 0:
                os.rename(file, old, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                continue  # the next file gets the line
            if st.st_size and os.pread(fd, 1, st.st_size - 1) != b"\n":
                line = b"\n" + line  # a writer killed mid-line: its part stays a line of its own
            os.write(fd, line)  # one write: O_APPEND keeps concurrent lines whole
            return
        finally:
            os.close(fd)  # lets go of the lock
    raise UnsafePathError(
        f"event log {dir_path / file} keeps changing under torpor; event not written",
        path=dir_path / file,
        hint=f"check what else writes to {dir_path}",
    )


def _open_append(dir_fd: int, dir_path: Path, file: str) -> int:
    try:
        fd = os.open(file, _APPEND, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        raise _unsafe(dir_path / file, f"cannot be opened ({exc.strerror})") from exc
    try:
        st = os.fstat(fd)
        problem = _safe.private_file_problem(st)
        if problem is None and st.st_nlink != 1:
            # A hard link to a file elsewhere (root's, say): appending would write into it.
            problem = f"has {st.st_nlink} links"
        if problem is not None:
            raise _unsafe(dir_path / file, problem)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unsafe(path: Path, problem: str) -> UnsafePathError:
    return UnsafePathError(
        f"event log {path} {problem}; refused",
        path=path,
        hint=f"torpor did not make it: remove {path}",
    )


# -- reading ----------------------------------------------------------------------------------


def read(name: str, *, limit: int | None = None, skipped: list[str] | None = None) -> list[Event]:
    """The events of ``name``, oldest first (the newest ``limit`` when given); none if it has
    no log. Lines that are not events are skipped; ``skipped`` (when given) gets one line
    saying how many, per file. :class:`~torpor.UnsafePathError` for a log file torpor could
    not have written (a symlink, another user's)."""
    base = record_file(name)[: -len(".json")]
    try:
        present = _paths.home_path().exists()
    except OSError:  # not ours to look into: home() says so in one line
        present = True
    if not present:
        return []
    events_path = _paths.home() / "events"
    try:
        dir_fd = _safe.open_dir(events_path)
    except FileNotFoundError:
        return []
    out: list[Event] = []
    try:
        _safe.check_private(events_path, what="events directory", fd=dir_fd)
        for file in (base + OLD_SUFFIX, base + SUFFIX):
            raw = _read_tail(dir_fd, events_path, file)
            if raw is None:
                continue
            bad = 0
            for line in raw.split(b"\n"):
                if not line.strip():
                    continue
                event = parse_line(line)
                if event is None:
                    bad += 1
                else:
                    out.append(event)
            if bad and skipped is not None:
                noun = "line is" if bad == 1 else "lines are"
                skipped.append(f"{bad} {noun} not events in {events_path / file}; skipped")
    finally:
        os.close(dir_fd)
    if limit is not None:
        out = out[-limit:] if limit > 0 else []
    return out


def _read_tail(dir_fd: int, dir_path: Path, file: str) -> bytes | None:
    """At most the last :data:`MAX_FILE` bytes (plus a line) of ``file``, from the start of a
    line; None if there is none."""
    try:
        fd = _safe.open_regular(dir_fd, file, source=str(dir_path))
    except FileNotFoundError:
        return None
    except UnsafeImageError as exc:
        raise _unsafe(dir_path / file, "is not a regular file") from exc
    try:
        st = os.fstat(fd)
        problem = _safe.private_file_problem(st)
        if problem is not None:
            raise _unsafe(dir_path / file, problem)
        start = max(0, st.st_size - MAX_FILE - MAX_LINE)
        chunks: list[bytes] = []
        total, budget = 0, MAX_FILE + MAX_LINE
        while total < budget and (chunk := os.pread(fd, min(1 << 16, budget - total), start)):
            chunks.append(chunk)
            start += len(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    if st.st_size > MAX_FILE + MAX_LINE:
        raw = raw[raw.find(b"\n") + 1 :]  # the first line is cut: not an event
    return raw


def parse_line(line: bytes) -> Event | None:
    """The event in one line, or None if it is not one."""
    if len(line) >= MAX_LINE:
        return None
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    time, kind = obj.pop("time", None), obj.pop("kind", None)
    if not isinstance(kind, str) or not _KIND_RE.fullmatch(kind):
        return None
    if not isinstance(time, str) or len(time) > 64:
        return None
    try:
        datetime.fromisoformat(time)
    except ValueError:
        return None
    if len(obj) > _MAX_FIELDS:
        return None
    fields: dict[str, Value] = {}
    for key, value in obj.items():
        if not isinstance(value, (str, int, float, bool)) and value is not None:
            continue  # not one of ours: the rest of the event still counts
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        fields[_printable(key)] = _printable(value) if isinstance(value, str) else value
    return Event(time=time, kind=kind, fields=fields)


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)
