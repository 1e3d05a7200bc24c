"""Where each descriptor was opened: an opt-in audit hook, so a refused descriptor's error names
the application line that opened it.

``track_fds()`` (or ``TORPOR_TRACK_FDS=1``, read when torpor is imported) installs a
:func:`sys.addaudithook` that records a short stack on the ``open`` and ``sqlite3.connect``
events (keyed by the resolved path: the descriptor does not exist yet when the event fires) and
on ``socket.bind``/``socket.connect`` (keyed by descriptor number and socket inode). Sockets from
``accept()`` and pipes raise no audit event: they stay unnamed.

Audit hooks cannot be removed: ``track_fds(False)`` stops recording and forgets what was
recorded. The cost when on is a few microseconds per open; off, one attribute test per audit
event.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict
from types import FrameType
from typing import TypeVar

from ._fds import FdInfo

_MAX_ENTRIES = 4096
_STACK_DEPTH = 6
_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STDLIB = os.path.dirname(os.__file__)
_K = TypeVar("_K")


class _Tracker:
    def __init__(self) -> None:
        self.on = False
        self.installed = False
        self.lock = threading.Lock()
        self.by_path: OrderedDict[str, str] = OrderedDict()
        self.by_socket: OrderedDict[tuple[int, int], str] = OrderedDict()

    def hook(self, event: str, args: tuple[object, ...]) -> None:
        if not self.on:
            return
        if event in ("open", "sqlite3.connect"):
            path = args[0]
            if isinstance(path, str | bytes | os.PathLike):
                name = os.fsdecode(path)
                if not name.startswith("/proc/"):
                    self._remember(self.by_path, os.path.realpath(name))
        elif event in ("socket.bind", "socket.connect"):
            fileno = getattr(args[0], "fileno", None)
            if fileno is None:
                return
            try:
                fd = fileno()
                key = (fd, os.fstat(fd).st_ino)
            except (OSError, ValueError):
                return
            self._remember(self.by_socket, key)

    def _remember(self, table: OrderedDict[_K, str], key: _K) -> None:
        where = _where(sys._getframe(2))
        with self.lock:
            table[key] = where
            table.move_to_end(key)
            if len(table) > _MAX_ENTRIES:
                table.popitem(last=False)


def _where(frame: FrameType | None) -> str:
    """``file:line in func`` for the innermost application frame, then a few callers."""
    frames: list[str] = []
    while frame is not None and len(frames) < _STACK_DEPTH:
        code = frame.f_code
        name = code.co_filename
        stdlib = name.startswith(_STDLIB) and "-packages" not in name
        if not (stdlib or name.startswith((_HERE, "<frozen"))):
            frames.append(f"{name}:{frame.f_lineno} in {code.co_name}")
        frame = frame.f_back
    return " <- ".join(frames) if frames else "unknown (opened inside the standard library)"


_tracker = _Tracker()


def track_fds(enabled: bool = True) -> None:
    """Record where descriptors are opened from now on (``False``: stop and forget)."""
    if enabled and not _tracker.installed:
        sys.addaudithook(_tracker.hook)
        _tracker.installed = True
    _tracker.on = enabled
    if not enabled:
        with _tracker.lock:
            _tracker.by_path.clear()
            _tracker.by_socket.clear()


def enable_from_env() -> None:
    """Turn tracking on when ``TORPOR_TRACK_FDS`` is set to a true value."""
    if os.environ.get("TORPOR_TRACK_FDS", "").strip().lower() in ("1", "true", "yes", "on"):
        track_fds()


def opened_at(info: FdInfo) -> str | None:
    """Where ``info`` was opened, if tracking saw it."""
    if not _tracker.on:
        return None
    with _tracker.lock:
        if info.kind == "socket":
            return _tracker.by_socket.get((info.fd, info.inode))
        if info.path:
            return _tracker.by_path.get(info.path)
    return None
