"""Hold a lazy copy's background page push while it answers its first request (issue 10).

**An experiment, not safe to use in torpor as it is.** signal(7): after a stop signal and
SIGCONT, ``epoll_wait`` fails with EINTR even without a handler, and CRIU's
``epoll_run_rfds`` (``criu/util.c``) takes any failure of it as fatal (``polling failed``):
a daemon stopped while it waits in ``epoll_wait`` may exit when continued. One of ~60 paused
restores in ``bench_torch_parts.py`` hung on its first answer (the bench holds duplicates of
the userfaultfds, so nothing served the fault), consistent with that.

Once a lazily restored copy runs, ``criu lazy-pages`` pushes every page not yet faulted, as
fast as it can (``handle_requests`` in ``criu/uffd.c``: the push starts when the restore
finishes). On this project's 2-core machines that push shares the cores with the copy's first
answer: measured on the torch app with a complete warm set (``bench/bench_torch_parts.py``),
the first answer took ~38 ms longer while the push ran than once it had ended, the copy
waiting ~30 ms on the run queue.

:class:`PushPause` stops the daemon (``SIGSTOP``) for at most ``most`` seconds after the
resume. A fault still gets served at once: a pending fault makes the userfaultfd readable,
and the caller holds duplicates of the daemon's userfaultfds (``_daemon.Daemon.hold_uffds``),
which a thread polls; on one it continues the daemon (``SIGCONT``), waits until no thread of
the copy waits in ``handle_userfault`` and no fault is pending, and stops it again. After a
stop it checks again that no thread of the copy waits on a fault the daemon had already read
(else it continues the daemon until that one is served): a copy never waits on a fault for
longer than the daemon takes to serve it plus a poll, never for the window.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import signal
import threading
import time
from collections.abc import Sequence

from torpor._process._proc import descendants

WINDOW = 0.15  # seconds the push is held at most after a resume (bench_torch_parts: 0.15)
USERFAULT_WCHAN = "handle_userfault"  # where a thread waits for its page (/proc/TID/wchan)
SETTLE = 0.0005  # seconds between checks while the daemon serves a fault


def tree(root: int, most: int = 4096) -> list[int]:
    """``root`` and its descendants (``_proc.descendants``), at most ``most``."""
    return [root, *itertools.islice(descendants(root), most - 1)]


def waiting_on_fault(pids: Sequence[int]) -> bool:
    """Whether a thread of ``pids`` sleeps in ``handle_userfault`` (a process gone: no)."""
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/wchan", encoding="ascii") as fh:
                    if fh.read().strip() == USERFAULT_WCHAN:
                        return True
            except OSError:
                continue
    return False


def pending(fds: Sequence[int]) -> bool:
    """Whether one of the userfaultfds ``fds`` holds an unread fault."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class PushPause:
    """Stop the daemon ``daemon`` now and keep it stopped for at most ``most`` seconds but
    while it serves the faults of the copy (the tree of ``root``; faults seen on ``uffds``,
    duplicates of the daemon's userfaultfds that this process holds). :meth:`end` continues
    it; :meth:`close` also joins its thread. ``root`` 0: no process to watch (tests)."""

    def __init__(self, daemon: int, uffds: Sequence[int], root: int, *, most: float) -> None:
        self.daemon = daemon
        self.uffds = list(uffds)
        self.root = root
        self.faults = 0  # faults served while paused
        self.started_at = time.monotonic()
        self.ended_at: float | None = None
        self._deadline = self.started_at + max(most, 0.0)
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self._signal(signal.SIGSTOP)
        self._thread = threading.Thread(target=self._run, name="push-pause", daemon=True)
        self._thread.start()

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.daemon, sig)

    def _waiting(self) -> bool:
        return self.root > 0 and waiting_on_fault(tree(self.root))

    def _left(self) -> float:
        return self._deadline - time.monotonic()

    def _run(self) -> None:
        try:
            poller = select.poll()
            for fd in (*self.uffds, self._wake_r):
                poller.register(fd, select.POLLIN)
            while self._left() > 0:
                got = poller.poll(self._left() * 1000)
                if not got or any(fd == self._wake_r for fd, _ in got):
                    return
                self.faults += 1
                if not self._serve():
                    return
        finally:
            self.end()

    def _serve(self) -> bool:
        """Continue the daemon until the faults are served, then stop it again; False once
        the window is over (the daemon left running)."""
        with self._lock:
            if self.ended_at is not None:
                return False
            self._signal(signal.SIGCONT)
        while True:
            while pending(self.uffds) or self._waiting():
                if self._left() <= 0:
                    return False
                time.sleep(SETTLE)
            with self._lock:
                if self.ended_at is not None:
                    return False
                self._signal(signal.SIGSTOP)
            # Stopped just after it read a fault and before it served it: serve that one too.
            if not self._waiting() or pending(self.uffds):
                return True
            with self._lock:
                if self.ended_at is not None:
                    return False
                self._signal(signal.SIGCONT)

    def end(self) -> None:
        """Continue the daemon for good (once)."""
        with self._lock:
            if self.ended_at is not None:
                return
            self._signal(signal.SIGCONT)
            self.ended_at = time.monotonic()
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the pause ends (its window runs out); whether it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def close(self) -> None:
        """:meth:`end`, then release the thread and its pipe."""
        self.end()
        self._thread.join(5)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
