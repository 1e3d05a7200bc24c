"""The image's bytes on the channel: whole files as ``D`` frames, hashed as they pass.

A file is sent as consecutive ``D`` frames of at most :data:`._channel.MAX_DATA` bytes; no
message comes between the frames of one file (the receiver reads exactly the announced size).
Both sides hash what passes (SHA-256), so the receiver can compare with the sender's sums.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

from ._channel import _DATA, _HEADER, MAX_DATA, ChannelError, Conn


class WireError(ChannelError):
    """A file could not be sent whole (it shrank while it was read)."""


def send_bytes(conn: Conn, data: bytes) -> None:
    """Send ``data`` (at most :data:`MAX_DATA` bytes) as one ``D`` frame."""
    # The channel's framing, used as its relay does; no message may come between the frames
    # of one file (the receiver reads exactly the announced size).
    conn._sendall(_HEADER.pack(_DATA, len(data)) + data)


def recv_bytes(conn: Conn) -> bytes:
    """The body of the next frame, which must be a ``D`` frame."""
    kind, body = conn._frame()
    if kind != _DATA:
        raise ChannelError(f"{conn._who()} sent a {kind!r} frame where file data was due")
    return body


def send_file(
    conn: Conn, fd: int, size: int, *, progress: Callable[[int], None] | None = None
) -> str:
    """Send ``size`` bytes of ``fd`` from its start; their SHA-256 (hex). ``progress(n)`` is
    called after each ``n`` bytes sent."""
    h = hashlib.sha256()
    left = size
    while left:
        chunk = os.read(fd, min(left, MAX_DATA))
        if not chunk:
            raise WireError(f"an image file shrank while it was sent ({left} bytes short)")
        h.update(chunk)
        send_bytes(conn, chunk)
        left -= len(chunk)
        if progress is not None:
            progress(len(chunk))
    return h.hexdigest()


class Progress:
    """``say``s how much of ``total`` bytes has moved, every tenth (and at the end)."""

    def __init__(self, say: Callable[[str], None] | None, total: int, where: str) -> None:
        self.say, self.total, self.where = say, total, where
        self.done = 0
        self.next = 0

    def __call__(self, n: int) -> None:
        self.done += n
        if self.say is None or self.done < min(self.next, self.total):
            return
        self.next = self.done + max(1, self.total // 10)
        pct = 100 * self.done // max(1, self.total)
        self.say(f"sent {_mib(self.done)} of {_mib(self.total)} to {self.where} ({pct}%)")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def receive_file(conn: Conn, fd: int, size: int) -> str:
    """Write the next ``size`` bytes of file data from ``conn`` to ``fd``; their SHA-256."""
    h = hashlib.sha256()
    left = size
    while left:
        chunk = recv_bytes(conn)
        if len(chunk) > left:
            raise ChannelError(f"{conn._who()} sent more file data than announced")
        h.update(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]
        left -= len(chunk)
    return h.hexdigest()
