"""The image's bytes on the channel: whole files as ``D`` frames, hashed as they pass.

A file is sent as consecutive ``D`` frames of at most :data:`._channel.MAX_DATA` bytes, none
empty; no message comes between the frames of one file (the receiver reads exactly the
announced size). Both sides hash what passes (SHA-256), so the receiver can compare with the
sender's sums.

**Speed.** A file larger than one frame is moved by two threads in a pipeline, so that the
hashing (``hashlib`` releases the GIL) overlaps the TLS crypto on the other core: the sender's
helper reads the file (``preadv``, straight after a 5-byte gap for the header) and hashes it
while the caller encrypts and sends the frame before; the receiver's helper hashes and writes a
frame while the caller decrypts the next. :data:`_DEPTH` buffers of one frame each, made once
per file: nothing grows with the file or with what a peer sends.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from ._channel import _DATA, _HEADER, MAX_DATA, ChannelError, Conn

_DEPTH = 3  # buffers in flight: one the caller uses, one the helper uses, one waiting
_FAILED = object()  # put by a helper whose work raised (the error is in ``Helper.error``)


class WireError(ChannelError):
    """A file could not be sent whole (it shrank while it was read)."""


def send_bytes(conn: Conn, data: bytes) -> None:
    """Send ``data`` (at most :data:`MAX_DATA` bytes) as one ``D`` frame."""
    # The channel's framing, used as its relay does; no message may come between the frames
    # of one file (the receiver reads exactly the announced size).
    conn._send_data(data)


def recv_bytes(conn: Conn) -> bytes:
    """The body of the next frame, which must be a ``D`` frame."""
    kind, body = conn._frame()
    if kind != _DATA:
        raise ChannelError(f"{conn._who()} sent a {kind!r} frame where file data was due")
    return body


class _Helper:
    """One thread running ``work(item)`` on the items :meth:`put` to it, in order; its
    results come back through :meth:`get`, which raises the work's error instead."""

    def __init__(self, work: Callable[[Any], Any], name: str) -> None:
        self._todo: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), name=name, daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[Any], Any]) -> None:
        while (item := self._todo.get()) is not None:
            if self.error is not None:
                continue
            try:
                self._done.put(work(item))
            except BaseException as exc:  # handed to the caller's thread by get()
                self.error = exc
                self._done.put(_FAILED)

    def put(self, item: Any) -> None:
        self._todo.put(item)

    def get(self) -> Any:
        out = self._done.get()
        if out is _FAILED:
            assert self.error is not None
            raise self.error
        return out

    def close(self) -> None:
        """Stop the thread once it has done what it was given."""
        self._todo.put(None)
        self._thread.join()


def send_file(
    conn: Conn, fd: int, size: int, *, progress: Callable[[int], None] | None = None
) -> str:
    """Send ``size`` bytes of ``fd`` from its start; their SHA-256 (hex). ``progress(n)`` is
    called after each ``n`` bytes sent."""
    h = hashlib.sha256()
    step = min(size, MAX_DATA)
    bufs = [bytearray(_HEADER.size + step) for _ in range(_DEPTH if size > step else 1)]
    offsets = iter(range(0, size, step))

    def read(job: tuple[bytearray, int]) -> tuple[memoryview, int]:
        buf, offset = job
        want = min(step, size - offset)
        view = memoryview(buf)[: _HEADER.size + want]
        got = 0
        while got < want:
            n = os.preadv(fd, [view[_HEADER.size + got :]], offset + got)
            if not n:
                raise WireError(
                    f"an image file shrank while it was sent ({size - offset - got} bytes short)"
                )
            got += n
        h.update(view[_HEADER.size :])
        _HEADER.pack_into(buf, 0, _DATA, want)
        return view, want

    if len(bufs) == 1:
        for offset in offsets:  # one frame at most: no thread
            view, n = read((bufs[0], offset))
            conn._sendall(view)
            if progress is not None:
                progress(n)
        return h.hexdigest()
    helper = _Helper(read, "torpor-send-read")
    try:
        for buf, offset in zip(bufs, offsets, strict=False):
            helper.put((buf, offset))
        for _ in range(0, size, step):
            view, n = helper.get()
            conn._sendall(view)
            after = next(offsets, None)
            if after is not None:
                helper.put((view.obj, after))
            if progress is not None:
                progress(n)
    finally:
        helper.close()
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
    step = min(size, MAX_DATA)

    def write(job: tuple[bytearray, int]) -> bytearray:
        buf, n = job
        view = memoryview(buf)[:n]
        h.update(view)
        while view:
            view = view[os.write(fd, view) :]
        return buf

    def frame(buf: bytearray, left: int) -> int:
        return conn._data_into(buf if left >= len(buf) else memoryview(buf)[:left])

    left = size
    if size <= step:  # one frame at most: no thread
        buf = bytearray(size)
        while left:
            n = frame(buf, left)
            write((buf, n))
            left -= n
        return h.hexdigest()
    free = [bytearray(MAX_DATA) for _ in range(_DEPTH)]
    helper = _Helper(write, "torpor-receive-write")
    try:
        while left:
            buf = free.pop() if free else helper.get()
            n = frame(buf, left)
            helper.put((buf, n))
            left -= n
        for _ in range(_DEPTH - len(free)):  # the last frames written (or the error raised)
            free.append(helper.get())
    finally:
        helper.close()
    return h.hexdigest()
