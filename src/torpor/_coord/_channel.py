"""The external trigger channel: ``torpor checkpoint PID`` asks a process that uses torpor to
checkpoint itself, coordinated (as ``jcmd PID JDK.checkpoint`` does for a JVM).

Both ends live here.

In the process, a daemon thread listens on the abstract unix socket ``@torpor/<host pid>``
(``SOCK_SEQPACKET``; the host pid comes from ``readlink /proc/self``, right even inside a PID
namespace because /proc is the host's). The listener is one of torpor's own resources: it is
closed before every dump (restored copies must not collide on the name, and a socket to an
outside process cannot be dumped) and bound again after restore, under the new host pid. After
``fork()`` the child closes the inherited listener and listens under its own pid.

The protocol, one JSON object per packet:

1. the client binds a *reply* socket ``@torpor-reply/<its pid>/<random>``, connects to the
   listener and checks through ``SO_PEERCRED`` that the listener is the target pid, running as
   root or one of the target's uids (a squatter whose pid was reused is not);
2. the listener checks the client through ``SO_PEERCRED``: only root or the process's own uid
   may trigger (others get ``PermissionDeniedError`` back, with a reason);
3. the client sends ``{"v": 1, "op": "checkpoint", "dest", "leave_running",
   "tcp_established", "name", "reply"}``; the listener answers ``{"ok": true, "pid"}`` (or an
   error) and both close that connection, before any hook runs;
4. the process runs the coordinated checkpoint. When it can report (an error before the dump,
   or success in the original after ``leave_running``) it connects to the reply socket, checks
   that its owner is the requester, and sends ``{"ok": ..., ...}``; the client believes only a
   connection from the target pid (anyone can see the reply address and connect to it: others
   are ignored). A restored copy never reports: its requester is long gone.
5. Without ``leave_running`` CRIU kills the original after the dump, so the client instead
   waits for the process to exit (pidfd, else polling ``/proc/PID/stat``'s start time) and for
   ``dest/torpor.json`` to appear (the engine's helper finalises the image).

A second request that arrives while a checkpoint runs finds no listener and gets
:class:`NotCoordinatedError`; callers that may race should serialise among themselves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import _safe
from .._errors import (
    AlreadyExistsError,
    CheckpointInProgressError,
    CheckpointRefusedError,
    CoordinationError,
    CriuError,
    DumpError,
    PermissionDeniedError,
    ProcessNotFoundError,
    TorporError,
    UsageError,
)
from .._process._proc import host_pid, start_time
from ._context import Context
from ._failures import NotCoordinatedError as NotCoordinatedError
from ._failures import RemoteCheckpointError, RestoreHookError
from ._runtime import channel_wanted, system_context

log = logging.getLogger("torpor.coord")

PROTOCOL = 1
_MAX_PACKET = 1 << 16
_CRED = struct.Struct("3i")
_HANDSHAKE_TIMEOUT = 5.0


def listener_address(pid: int) -> bytes:
    """The abstract socket address the process with host pid ``pid`` listens on."""
    return f"\0torpor/{pid}".encode()


def _peercred(sock: socket.socket) -> tuple[int, int, int]:
    pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return pid, uid, gid


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message).encode())


def _recv(sock: socket.socket) -> dict[str, Any]:
    data = sock.recv(_MAX_PACKET)
    if not data:
        raise ConnectionResetError("the other end closed the connection")
    try:
        message = json.loads(data)
    except RecursionError as exc:  # nesting deeper than the parser goes: malformed like the rest
        raise ValueError("nested too deeply") from exc
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    return message


# ----------------------------------------------------------------------------- in the process


@dataclass(frozen=True)
class _Request:
    dest: Path
    leave_running: bool
    tcp_established: bool
    name: str | None
    reply: bytes
    requester: tuple[int, int]


def _parse_request(message: dict[str, Any], requester: tuple[int, int]) -> _Request:
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
    return _Request(
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
            conn.settimeout(_HANDSHAKE_TIMEOUT)
            pid, uid, _ = _peercred(conn)
            try:
                # Read the request before answering, so the client never writes to a closed
                # connection, even when it is refused.
                message, bad = _recv(conn), None
            except (ValueError, OSError) as exc:
                message, bad = {}, f"malformed request: {exc}"
            if uid not in (0, os.geteuid()):
                _send(
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
                request = _parse_request(message, (pid, uid))
            except UsageError as exc:
                with contextlib.suppress(OSError):
                    _send(
                        conn, {"ok": False, "kind": "UsageError", "error": str(exc), "details": []}
                    )
                return
            _send(conn, {"ok": True, "pid": host_pid()})
        self._run(request)

    def _run(self, request: _Request) -> None:
        from ._checkpoint import checkpoint

        message: dict[str, Any]
        try:
            result = checkpoint(
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


def _report(request: _Request, message: dict[str, Any]) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(_HANDSHAKE_TIMEOUT)
        try:
            s.connect(request.reply)
            pid, uid, _ = _peercred(s)
            if (pid, uid) != request.requester:
                log.warning("torpor: reply socket is not the requester's; result not sent")
                return
            _send(s, message)
        except OSError as exc:
            log.warning("torpor: could not report the checkpoint result: %s", exc)


_listener: Listener | None = None
_lock = threading.Lock()


def start_listener() -> None:
    """Start this process's listener (once); a failure to bind is logged, not raised."""
    global _listener
    with _lock:
        if _listener is not None:
            return
        listener = Listener()
        try:
            listener.start()
        except OSError as exc:
            log.warning("torpor: external checkpoint trigger unavailable: %s", exc)
            return
        system_context()._register_strong(listener)
        _listener = listener


def stop_listener() -> None:
    """Stop listening (``torpor checkpoint PID`` then finds this process uncoordinated)."""
    global _listener
    with _lock:
        listener, _listener = _listener, None
    if listener is not None:
        listener.stop()
        system_context().unregister(listener)


def _after_fork_in_child() -> None:
    global _listener, _lock
    _lock = threading.Lock()
    old, _listener = _listener, None
    if old is None:
        return
    if old._sock is not None:
        old._sock.close()
    system_context().unregister(old)
    if channel_wanted():
        start_listener()


os.register_at_fork(after_in_child=_after_fork_in_child)


# ----------------------------------------------------------------------------- the client


@dataclass(frozen=True)
class ExternalOutcome:
    """How an external coordinated checkpoint ended.

    ``exited`` is True when the original is gone (no ``leave_running``: CRIU killed it after the
    dump); ``warnings`` lists after-restore hook failures the original reported.
    """

    pid: int
    image: Path
    leave_running: bool
    exited: bool
    elapsed: float
    warnings: tuple[str, ...] = ()


def _remote_error(pid: int, dest: Path, message: dict[str, Any]) -> TorporError:
    # The process may be anyone's (and torpor checkpoint runs as root): its words are outside
    # input, shown as one bounded line each.
    kind = _one_line_text(message.get("kind", "Error"))
    text = _one_line_text(message.get("error", "the process reported a failure"))
    details = _text_list(message.get("details"))
    msg = f"process {pid}: {text}"
    if kind == "PermissionDeniedError":
        return PermissionDeniedError(msg)
    if kind == "CheckpointRefusedError":
        return CheckpointRefusedError(msg, offenders=details)
    if kind == "CheckpointInProgressError":
        return CheckpointInProgressError(msg)
    if kind == "AlreadyExistsError":
        return AlreadyExistsError(msg, path=str(dest))
    if kind == "UsageError":
        return UsageError(msg)
    if kind.endswith("DumpError") or kind.startswith("Criu"):
        return DumpError(msg, pid=pid, image=dest, log_lines=details)
    return RemoteCheckpointError(msg, pid=pid, kind=kind, details=details)


def _one_line_text(value: object, limit: int = 500) -> str:
    """``value`` as one printable line of at most ``limit`` characters."""
    text = "".join(c if c.isprintable() else " " for c in str(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _text_list(value: object, limit: int = 64) -> list[str]:
    """A list of strings from the other end as bounded lines (anything else: none)."""
    if not isinstance(value, list):
        return []
    return [_one_line_text(v) for v in value[:limit]]


def request_checkpoint(
    pid: int,
    dest: Path,
    *,
    leave_running: bool,
    tcp_established: bool,
    name: str | None,
    timeout: float,
) -> ExternalOutcome:
    """Ask process ``pid`` to checkpoint itself, coordinated, into ``dest``; wait for the end.

    Raises :class:`NotCoordinatedError` when nothing listens (do a plain dump instead),
    ``ProcessNotFoundError`` for no such process, ``PermissionDeniedError`` when the process
    refuses the caller, and the TorporError matching the remote failure otherwise
    (``CheckpointRefusedError``, ``DumpError``, :class:`RemoteCheckpointError`...), carrying the
    remote message. ``CoordinationError`` on timeout.
    """
    started = time.monotonic()
    deadline = started + timeout
    dest = Path(dest).absolute()
    born = start_time(pid)
    if born is None:
        raise ProcessNotFoundError(f"no process {pid}", pid=pid)
    token = f"torpor-reply/{os.getpid()}/{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as reply:
        reply.bind(b"\0" + token.encode())
        reply.listen(4)
        ack = _handshake(pid, dest, token, leave_running, tcp_established, name, deadline)
        if not ack.get("ok"):
            raise _remote_error(pid, dest, ack)
        return _await_outcome(pid, born, dest, reply, leave_running, started, deadline)


def _may_be(pid: int, uid: int) -> bool:
    """Whether a socket of a process running as ``uid`` may speak for process ``pid``: root,
    or one of ``pid``'s own uids. ``SO_PEERCRED`` names the pid that called ``listen()`` (or
    ``connect()``), which may be gone and its number reused by ``pid``: the uid says more."""
    if uid == 0:
        return True
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Uid:"):
                    return str(uid) in line.split()[1:]
    except OSError:
        return False
    return False


def _handshake(
    pid: int,
    dest: Path,
    token: str,
    leave_running: bool,
    tcp_established: bool,
    name: str | None,
    deadline: float,
) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.settimeout(max(0.1, min(_HANDSHAKE_TIMEOUT, deadline - time.monotonic())))
        try:
            conn.connect(listener_address(pid))
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            raise NotCoordinatedError(
                f"process {pid} does not listen for coordinated checkpoints",
                pid=pid,
                hint="it does not use torpor (or set TORPOR_CHANNEL=0): dump it uncoordinated",
            ) from exc
        peer_pid, peer_uid, _ = _peercred(conn)
        if peer_pid not in (0, pid) or not _may_be(pid, peer_uid):
            raise CoordinationError(
                f"the socket named for process {pid} belongs to process {peer_pid} (uid "
                f"{peer_uid})",
                hint="another process squats on torpor's address; refusing to talk to it",
            )
        try:
            _send(
                conn,
                {
                    "v": PROTOCOL,
                    "op": "checkpoint",
                    "dest": str(dest),
                    "leave_running": leave_running,
                    "tcp_established": tcp_established,
                    "name": name,
                    "reply": token,
                },
            )
            return _recv(conn)
        except (OSError, ValueError) as exc:
            raise CoordinationError(
                f"process {pid} did not answer the checkpoint request: {exc}"
            ) from exc


def _await_outcome(
    pid: int,
    born: int,
    dest: Path,
    reply: socket.socket,
    leave_running: bool,
    started: float,
    deadline: float,
) -> ExternalOutcome:
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except (OSError, AttributeError):
        pidfd = None
    try:
        if pidfd is not None and start_time(pid) != born:
            # The pid was reused between our checks: the process we asked is gone.
            os.close(pidfd)
            pidfd = None
        watch: list[Any] = [reply] + ([pidfd] if pidfd is not None else [])
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CoordinationError(
                    f"process {pid} did not finish its checkpoint within the timeout",
                    hint="hooks may be slow: raise the timeout",
                )
            ready, _, _ = select.select(watch, [], [], min(left, 0.05 if pidfd is None else left))
            if reply in ready:
                message = _read_reply(pid, reply)
                if message is None:
                    continue  # not from the process: ignored
                if not message.get("ok"):
                    raise _remote_error(pid, dest, message)
                warnings = tuple(_text_list(message.get("warnings")))
                image = Path(str(message.get("image", dest)))
                return ExternalOutcome(
                    pid, image, leave_running, False, time.monotonic() - started, warnings
                )
            gone = (pidfd is not None and pidfd in ready) or start_time(pid) != born
            if gone:
                break
        return _await_image(pid, dest, reply, leave_running, started, deadline)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _read_reply(pid: int, reply: socket.socket) -> dict[str, Any] | None:
    """The result on the next connection to the reply socket, None if that connection is not
    from process ``pid``: the reply address is visible to every user (``/proc/net/unix``), and
    anyone may connect to an abstract socket, so a result is believed only from the process
    asked (``SO_PEERCRED``)."""
    conn, _ = reply.accept()
    with conn:
        peer_pid, peer_uid, _ = _peercred(conn)
        if peer_pid != pid or not _may_be(pid, peer_uid):
            log.warning(
                "torpor: a result for process %d came from process %d (uid %d); ignored",
                pid,
                peer_pid,
                peer_uid,
            )
            return None
        conn.settimeout(_HANDSHAKE_TIMEOUT)
        try:
            return _recv(conn)
        except (OSError, ValueError) as exc:
            raise CoordinationError(f"process {pid} sent a malformed result: {exc}") from exc


def _await_image(
    pid: int,
    dest: Path,
    reply: socket.socket,
    leave_running: bool,
    started: float,
    deadline: float,
) -> ExternalOutcome:
    """The process exited: an error it reported just before wins, else wait for the image."""
    for _ in range(8):  # connections from others are ignored, but not forever
        if not select.select([reply], [], [], 0)[0]:
            break
        message = _read_reply(pid, reply)
        if message is not None and not message.get("ok"):
            raise _remote_error(pid, dest, message)
        if message is not None:
            break
    if leave_running:
        raise CoordinationError(
            f"process {pid} exited during a leave_running checkpoint",
            hint="it crashed or was killed; look at its logs",
        )
    manifest = dest / "torpor.json"
    while not manifest.exists():
        if time.monotonic() >= deadline:
            raise DumpError(
                f"process {pid} exited but no image appeared at {dest}",
                pid=pid,
                image=dest,
                hint="the dump may have failed after the process was frozen; see CRIU's log",
            )
        time.sleep(0.05)
    return ExternalOutcome(pid, dest, False, True, time.monotonic() - started)
