"""One deadline for a frame of the channel (:class:`._channel.Conn`) read in several reads.

A socket's timeout bounds each read, not a frame: a peer sending one byte just inside it would
hold a reader for ever (the target's server serves one migration at a time; the source's
original stays frozen at ``post-dump``). So the timeout a reader set (``Conn.settimeout``)
is the budget of each frame from its first byte read: before each read the socket's timeout is
cut to what is left of it, once it would outlast the deadline by more than :data:`SLACK`
(reads of a frame that arrives at speed never pay for the system call), and set back after the
frame. A TLS socket holding decrypted bytes (``pending``) is read without a cut: that read
cannot block.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

SLACK = 0.05  # seconds a frame's last read may end past its deadline


class Deadline:
    """The deadline of one frame read from ``sock``, ``budget`` seconds from its start."""

    __slots__ = ("budget", "cut", "end", "sock", "timeout")

    def __init__(self, sock: Any, budget: float) -> None:
        self.sock, self.budget = sock, budget
        self.end = time.monotonic() + budget
        self.timeout = budget  # the socket's timeout now
        self.cut = False

    def before_read(self) -> None:
        """Cut the socket's timeout to what is left, if need be; :class:`TimeoutError` if
        nothing is."""
        pending = getattr(self.sock, "pending", None)
        if pending is not None and pending():
            return
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("the frame's deadline passed")
        if self.timeout - left > SLACK:  # a read now could end that long after the deadline
            self.sock.settimeout(left)
            self.timeout, self.cut = left, True

    def done(self) -> None:
        """The socket's timeout as it was before the frame."""
        if self.cut:
            self.timeout, self.cut = self.budget, False
            with contextlib.suppress(OSError):  # (a broken socket: its error is the one raised)
                self.sock.settimeout(self.budget)


def start(sock: Any) -> Deadline | None:
    """The deadline of a frame read from ``sock`` now: its timeout from now; None if it has
    none (blocking, non-blocking, or a socket-like object without ``gettimeout``)."""
    get = getattr(sock, "gettimeout", None)
    budget = get() if get is not None else None
    if not isinstance(budget, float) or budget <= 0:
        return None
    return Deadline(sock, budget)
