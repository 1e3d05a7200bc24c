"""The in-process end of the external trigger channel (see :mod:`._channel` for the protocol):
a :class:`Listener` thread that checks who asks (``SO_PEERCRED``) and what (:func:`parse_request`),
answers before any hook runs, runs the coordinated checkpoint and reports to the requester's
reply socket. Starting and stopping this process's one listener is :mod:`._channel`'s.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import _safe
from .._errors import CheckpointRefusedError, CriuError, UsageError
from .._process._proc import host_pid
from ._checkpoint import default_coordinator
from ._context import Context
from ._failures import RestoreHookError
from ._wire import HANDSHAKE_TIMEOUT, PROTOCOL, listener_address, peercred, recv, send

log = logging.getLogger("torpor.coord")


@dataclass(frozen=True)
class Request:
    """A checkpoint request as checked: where, how, and who asked (its pid and uid)."""

    dest: Path
    leave_running: bool
    tcp_established: bool
    name: str | None
    reply: bytes
    requester: tuple[int, int]


def parse_request(message: dict[str, Any], requester: tuple[int, int]) -> Request:
    """The request ``message`` (from ``requester``), validated: :class:`~torpor.UsageError`
    names what is wrong with it."""
    if message.get("v") != PROTOCOL or message.get("op") != "checkpoint":
        raise UsageError(
            f"unsupported request (protocol {message.get('v')!r}, op {message.get('op')!r})"
        )
    dest, reply, name = message.get("dest"), message.get("reply"), message.get("name")
    flags = (message.get("leave_running"), message.get("tcp_established"))
    if not isinstance(dest, str) or not os.path.isabs(dest):
        raise UsageError("the request's dest must be an absolute path")
    if (
        not isinstance(reply, str)
        or not reply.startswith("torpor-reply/")
        or not reply.isascii()
        or not reply.isprintable()
        or len(reply) > 100
    ):
        raise UsageError("the request's reply address is malformed")
    if not all(isinstance(f, bool) for f in flags):
        raise UsageError("leave_running and tcp_established must be booleans")
    if name is not None and not _safe.is_plain_name(name):
        raise UsageError("the request's name must be a plain name")
    return Request(
        Path(dest), bool(flags[0]), bool(flags[1]), name, b"\0" + reply.encode(), requester
    )


def _error_message(exc: BaseException) -> dict[str, Any]:
    details: list[str] = []
    if isinstance(exc, CheckpointRefusedError):
        details = list(exc.offenders)
    elif isinstance(exc, CriuError):
        details = list(exc.log_lines)
    elif isinstance(exc, BaseExceptionGroup):
        details = [_one_line(e) for e in exc.exceptions]
    return {"ok": False, "kind": type(exc).__name__, "error": str(exc), "details": details}


def _one_line(exc: BaseException) -> str:
    notes = getattr(exc, "__notes__", None)
    where = f" ({'; '.join(notes)})" if notes else ""
    return f"{type(exc).__name__}: {exc}{where}"


class Listener:
    """The in-process end: a daemon thread accepting trigger requests; a torpor resource."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._sock: socket.socket | None = None
        self._accepting = False
        self._state = "new"
        self._thread: threading.Thread | None = None
        self.address: bytes | None = None

    def start(self) -> None:
        """Bind and start the accepting thread."""
        with self._cond:
            self._bind()
            self._state = "open"
        self._thread = threading.Thread(target=self._loop, name="torpor-channel", daemon=True)
        self._thread.start()

    def _bind(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        address = listener_address(host_pid())
        try:
            sock.bind(address)
            sock.listen(4)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.address = address

    def stop(self) -> None:
        """Close the listener and end the thread."""
        with self._cond:
            self._state = "stopped"
            self._release()
            self._cond.notify_all()

    def _release(self) -> None:
        """Close the listening socket (caller holds the condition)."""
        sock = self._sock
        if sock is None:
            return
        if self._accepting and threading.current_thread() is not self._thread:
            # The loop thread is (about to be) in accept(): shutdown wakes it with EINVAL and
            # it closes the socket itself, so the fd is never closed under its feet.
            sock.shutdown(socket.SHUT_RDWR)
            while self._sock is sock:
                self._cond.wait()
        else:
            sock.close()
            self._sock = None

    def before_checkpoint(self, context: Context) -> None:
        """Close the listener: restored copies must not collide on its name."""
        with self._cond:
            if self._state == "open":
                self._state = "suspended"
                self._release()

    def after_restore(self, context: Context) -> None:
        """Listen again, under the (possibly new) host pid."""
        with self._cond:
            if self._state != "suspended":
                return
            try:
                self._bind()
            except OSError:
                self._state = "stopped"
                raise
            finally:
                self._cond.notify_all()
            self._state = "open"

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._state == "suspended":
                    self._cond.wait()
                if self._state != "open" or self._sock is None:
                    return
                sock = self._sock
                self._accepting = True
            try:
                conn, _ = sock.accept()
            except OSError:
                with self._cond:
                    self._accepting = False
                    if self._sock is sock:
                        sock.close()
                        self._sock = None
                    self._cond.notify_all()
                continue
            with self._cond:
                self._accepting = False
            try:
                self._serve(conn)
            except Exception:
                log.exception("torpor: checkpoint request failed")

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(HANDSHAKE_TIMEOUT)
            pid, uid, _ = peercred(conn)
            try:
                # Read the request before answering, so the client never writes to a closed
                # connection, even when it is refused.
                message, bad = recv(conn), None
            except (ValueError, OSError) as exc:
                message, bad = {}, f"malformed request: {exc}"
            if uid not in (0, os.geteuid()):
                send(
                    conn,
                    {
                        "ok": False,
                        "kind": "PermissionDeniedError",
                        "error": f"uid {uid} may not checkpoint process {host_pid()} "
                        f"(owned by uid {os.geteuid()}): only root or the owner may",
                        "details": [],
                    },
                )
                return
            try:
                if bad is not None:
                    raise UsageError(bad)
                request = parse_request(message, (pid, uid))
            except UsageError as exc:
                with contextlib.suppress(OSError):
                    send(
                        conn, {"ok": False, "kind": "UsageError", "error": str(exc), "details": []}
                    )
                return
            send(conn, {"ok": True, "pid": host_pid()})
        self._run(request)

    def _run(self, request: Request) -> None:
        message: dict[str, Any]
        try:
            # Not torpor.checkpoint(): that starts coordination, which started this listener.
            result = default_coordinator().checkpoint(
                request.dest,
                leave_running=request.leave_running,
                tcp_established=request.tcp_established,
                name=request.name,
            )
        except RestoreHookError as exc:
            result_obj = exc.result
            if getattr(result_obj, "restored", True):
                raise
            message = {
                "ok": True,
                "image": str(request.dest),
                "warnings": _error_message(exc)["details"],
            }
        except Exception as exc:
            message = _error_message(exc)
        else:
            if result.restored:
                return
            message = {"ok": True, "image": str(result.image or request.dest), "warnings": []}
        _report(request, message)


def _report(request: Request, message: dict[str, Any]) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(HANDSHAKE_TIMEOUT)
        try:
            s.connect(request.reply)
            pid, uid, _ = peercred(s)
            if (pid, uid) != request.requester:
                log.warning("torpor: reply socket is not the requester's; result not sent")
                return
            send(s, message)
        except OSError as exc:
            log.warning("torpor: could not report the checkpoint result: %s", exc)
