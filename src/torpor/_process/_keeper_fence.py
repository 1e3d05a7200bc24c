"""The keeper's fence deadline: the supervisor's word that its lease on the keeper's process
is valid until a time, after which the keeper SIGKILLs its children itself.

The supervisor (:mod:`torpor._supervise._fence`) renews its lease in a shared pool and, after
each renewal, tells the process's keeper ``{"v": 1, "op": "fence", "for": SECONDS}``: stop
the children ``SECONDS`` from now (CLOCK_BOOTTIME: a suspended host counts) unless a newer
word comes first; ``"for": null`` clears it (the supervisor lets go of the process, which
runs on). So a supervisor that died, was paused or hangs cannot leave the copy running past
the point its lease may have lapsed, when another host may take it. Only the supervisor of
this home may say it: a root peer holding the supervisor's socket, never a child.
"""

from __future__ import annotations

import json
import math
import socket
import sys
import threading
import time
from collections.abc import Callable

from .. import _paths
from .._errors import PermissionDeniedError, UsageError
from .._images._manifest import now_iso
from ._peer import Peer
from ._proc import holds_unix_socket

MAX_FOR = 3600.0  # seconds: a longer word is refused


def _clock() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def parse(data: bytes) -> float | bool | None:
    """The seconds of a fence request in ``data`` (None: clear), or False if ``data`` is not
    one; :class:`UsageError` if it is a malformed one."""
    try:
        msg = json.loads(data)
    except (ValueError, RecursionError):
        return False
    if not isinstance(msg, dict) or msg.get("op") != "fence":
        return False
    if set(msg) != {"v", "op", "for"} or msg["v"] != 1:
        raise UsageError("malformed fence request")
    value = msg["for"]
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value <= MAX_FOR
    ):
        raise UsageError(f"fence request for {value!r} s: 0 to {MAX_FOR:g} s")
    return float(value)


def check_peer(peer: Peer) -> None:
    """Only this home's supervisor may set the deadline."""
    sock = str(_paths.supervised_dir() / ".daemon.sock")
    if not peer.privileged or not holds_unix_socket(peer.pid, sock):
        raise PermissionDeniedError(
            f"process {peer.pid} is not this home's supervisor: it may not set the fence"
        )


class Deadline:
    """When the keeper's children are stopped; ``kill_all`` does it (from a daemon thread)."""

    def __init__(self, kill_all: Callable[[], None], pid: int) -> None:
        self._kill_all = kill_all
        self._pid = pid
        self._cond = threading.Condition()
        self._until: float | None = None
        self._thread: threading.Thread | None = None

    @property
    def until(self) -> float | None:
        """The deadline (CLOCK_BOOTTIME seconds), or None."""
        return self._until

    def set(self, seconds: float | None) -> None:
        """Stop the children ``seconds`` from now unless set again first; None: never."""
        with self._cond:
            self._until = None if seconds is None else _clock() + seconds
            if self._thread is None and seconds is not None:
                self._thread = threading.Thread(target=self._watch, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _watch(self) -> None:
        while True:
            with self._cond:
                while self._until is None or self._until > _clock():
                    self._cond.wait(None if self._until is None else self._until - _clock())
                self._until = None
            print(
                f"{now_iso()} keeper {self._pid}: the supervisor's lease was not renewed in"
                " time: its processes killed so that only one copy runs",
                file=sys.stderr,
                flush=True,
            )
            self._kill_all()


def tell(keeper_pid: int, seconds: float | None, *, timeout: float = 0.5) -> None:
    """Tell the keeper ``keeper_pid`` the fence deadline (the supervisor's side); OSError
    or :class:`UsageError` (its refusal) if it was not taken."""
    from ._keeper_address import address

    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        sock.connect(address(keeper_pid))
        sock.send(json.dumps({"v": 1, "op": "fence", "for": seconds}).encode())
        reply = sock.recv(4096)
    try:
        ok = json.loads(reply).get("ok") is True
        error = json.loads(reply).get("error")
    except (ValueError, AttributeError):
        ok, error = False, "a malformed reply"
    if not ok:
        raise UsageError(f"keeper {keeper_pid} refused the fence: {error}")
