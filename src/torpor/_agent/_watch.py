"""Noticing that the agent's code changed: inotify on torpor's source dirs and the CRIU binary.

A worker forked from an agent started before an upgrade (``pip install``, ``git pull``, a new
CRIU) would run the old code. The master watches what its workers depend on and re-executes
itself when any of it changes; checking at each command instead would cost every command
~1 ms of ``stat`` calls.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_DIR_EVENTS = IN_CREATE | IN_DELETE | IN_MODIFY | IN_MOVED_TO | IN_MOVED_FROM | IN_CLOSE_WRITE
_FILE_EVENTS = IN_MODIFY | IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event)


class Watcher:
    """An inotify fd (for ``select``) that reports changes to source files under ``package``
    and to the ``files`` given."""

    def __init__(self, package: Path, files: list[str]) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int = fd
        try:
            for top, dirs, _ in os.walk(package):
                dirs[:] = [d for d in dirs if d != "__pycache__"]
                self._add(top, _DIR_EVENTS)
            for path in files:
                self._add(path, _FILE_EVENTS)
        except OSError:
            os.close(fd)
            raise

    def _add(self, path: str, mask: int) -> None:
        if self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")

    def changed(self) -> list[str]:
        """Drain pending events; the names of changed sources or watched files (empty if
        only irrelevant files changed, such as byte-code caches)."""
        names: list[str] = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return names
            pos = 0
            while pos + _HEADER.size <= len(data):
                _, mask, _, length = _HEADER.unpack_from(data, pos)
                raw = data[pos + _HEADER.size : pos + _HEADER.size + length]
                pos += _HEADER.size + length
                name = raw.rstrip(b"\0").decode(errors="replace")
                if not name:  # an event on a watched file itself
                    names.append(f"(watched file, mask {mask:#x})")
                elif name.endswith((".py", ".proto")):
                    names.append(name)

    def close(self) -> None:
        """Stop watching."""
        os.close(self.fd)
