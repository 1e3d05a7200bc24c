"""The external trigger channel: ``torpor checkpoint PID`` asks a process that uses torpor to
checkpoint itself, coordinated (as ``jcmd PID JDK.checkpoint`` does for a JVM).

The client end lives here, with the start and stop of this process's one listener; the
listener itself is :mod:`._listener`, and what both ends share, :mod:`._wire`.

In the process, a daemon thread listens on the abstract unix socket ``@torpor/<host pid>``
(``SOCK_SEQPACKET``; the host pid comes from ``readlink /proc/self``, right even inside a PID
namespace because /proc is the host's). The listener is one of torpor's own resources: it is
closed before every dump (restored copies must not collide on the name, and a socket to an
outside process cannot be dumped) and bound again after restore, under the new host pid. After
``fork()`` the child closes the inherited listener and listens under its own pid.

The protocol, one JSON object per packet:

1. the client binds a *reply* socket ``@torpor-reply/<its pid>/<random>``, connects to the
   listener and checks that the listener is the target process, running as root or one of
   the target's uids: its process held by a pidfd (``SO_PEERPIDFD``), its pid and start time
   the target's, read while it is not reaped (a squatter whose pid was reused by the target is
   not; before Linux 6.5 no listener is believed);
2. the listener checks the client through ``SO_PEERCRED``: only root or the process's own uid
   may trigger (others get ``PermissionDeniedError`` back, with a reason);
3. the client sends ``{"v": 1, "op": "checkpoint", "dest", "leave_running",
   "tcp_established", "name", "reply"}``; the listener answers ``{"ok": true, "pid"}`` (or an
   error) and both close that connection, before any hook runs;
4. the process runs the coordinated checkpoint. When it can report (an error before the dump,
   or success in the original after ``leave_running``) it connects to the reply socket, checks
   that its owner is the requester, and sends ``{"ok": ..., ...}``; the client believes only a
   connection from the target pid (anyone can see the reply address and connect to it: others
   are ignored; the same check as the listener's). A restored copy never reports: its
   requester is long gone.
5. Without ``leave_running`` CRIU kills the original after the dump, so the client instead
   waits for the process to exit (pidfd, else polling ``/proc/PID/stat``'s start time) and for
   ``dest/torpor.json`` to appear (the engine's helper finalises the image).

A second request that arrives while a checkpoint runs finds no listener and gets
:class:`NotCoordinatedError`; callers that may race should serialise among themselves.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import select
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._errors import (
    AlreadyExistsError,
    CheckpointInProgressError,
    CheckpointRefusedError,
    CoordinationError,
    DumpError,
    PermissionDeniedError,
    ProcessNotFoundError,
    TorporError,
    UsageError,
)
from .._process._pidfd_peer import PeerProcess
from .._process._proc import start_time
from ._contexts import system_context
from ._failures import NotCoordinatedError as NotCoordinatedError
from ._failures import RemoteCheckpointError
from ._listener import Listener as Listener
from ._listener import Request as _Request  # noqa: F401 (the name tests/fuzz checks it by)
from ._listener import parse_request as _parse_request  # noqa: F401 (tests/fuzz drives it)
from ._wire import HANDSHAKE_TIMEOUT as _HANDSHAKE_TIMEOUT
from ._wire import PROTOCOL as PROTOCOL
from ._wire import listener_address as listener_address
from ._wire import peercred as _peercred
from ._wire import recv as _recv
from ._wire import send as _send

log = logging.getLogger("torpor.coord")

_listener: Listener | None = None
_lock = threading.Lock()


def channel_wanted() -> bool:
    """Whether the external trigger channel may run (``TORPOR_CHANNEL`` is not ``0``)."""
    return os.environ.get("TORPOR_CHANNEL", "1").strip().lower() not in ("0", "off", "no", "false")


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
        ack = _handshake(pid, born, dest, token, leave_running, tcp_established, name, deadline)
        if not ack.get("ok"):
            raise _remote_error(pid, dest, ack)
        return _await_outcome(pid, born, dest, reply, leave_running, started, deadline)


def _may_be(pid: int, uid: int) -> bool:
    """Whether ``uid`` is one of process ``pid``'s uids (read from ``/proc``: believed only as
    :func:`_speaker_problem` reads it)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Uid:"):
                    return str(uid) in line.split()[1:]
    except OSError:
        return False
    return False


_NO_PIDFD = "cannot be traced to its process: this kernel has no SO_PEERPIDFD (Linux 6.5)"


class _Unheld(Exception):
    """The process of a socket cannot be held by a pidfd, or is gone."""


def _speaker_problem(conn: socket.socket, pid: int, born: int) -> str | None:
    """Why the process at the other end of ``conn`` (the one that called ``listen()``, or
    ``connect()``) does not speak for process ``pid`` started at ``born`` (None: it does).

    Root may speak for any process (``SO_PEERCRED``'s uid and pid decide, nothing is read).
    Another uid must be that very process, running as one of its uids. ``SO_PEERCRED``'s pid
    would not do for that: it names a process that may be gone, its pid reused by ``pid``
    (which ``/proc/PID`` then shows, uids and start time). So the process is held by a pidfd
    (``SO_PEERPIDFD``), and its pid, uids and start time are read while it is not reaped (read,
    then verify: the shared ``_process._pidfd_peer``). Without ``SO_PEERPIDFD`` (before Linux
    6.5) only root does; a process that exited before it is judged does not.
    """
    seen, uid, _ = _peercred(conn)
    if uid == 0:
        return None if seen in (0, pid) else f"belongs to process {seen} (uid 0)"
    try:
        with PeerProcess(conn, what="its process", error=_Unheld) as peer:
            if peer.pid != pid or not peer.verified(_may_be(pid, uid)):
                return f"belongs to process {peer.pid} (uid {uid})"
            if peer.verified(start_time(pid)) != born:
                return f"belongs to a newer process {pid} (uid {uid}): the one asked has exited"
    except _Unheld as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError) and cause.errno == errno.ENOPROTOOPT:
            return _NO_PIDFD
        return str(exc)
    return None


def _handshake(
    pid: int,
    born: int,
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
        problem = _speaker_problem(conn, pid, born)
        if problem is not None:
            raise CoordinationError(
                f"the socket named for process {pid} {problem}",
                hint="checkpoint it with --no-coordinate (its hooks do not run)"
                if problem == _NO_PIDFD
                else "another process squats on torpor's address; refusing to talk to it",
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
                message = _read_reply(pid, born, reply)
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
        return _await_image(pid, born, dest, reply, leave_running, started, deadline)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _read_reply(pid: int, born: int, reply: socket.socket) -> dict[str, Any] | None:
    """The result on the next connection to the reply socket, None if that connection is not
    from process ``pid`` (started at ``born``): the reply address is visible to every user
    (``/proc/net/unix``), and anyone may connect to an abstract socket, so a result is
    believed only from the process asked (:func:`_speaker_problem`)."""
    conn, _ = reply.accept()
    with conn:
        problem = _speaker_problem(conn, pid, born)
        if problem is not None:
            log.warning(
                "torpor: a result for process %d came from one that %s; ignored", pid, problem
            )
            return None
        conn.settimeout(_HANDSHAKE_TIMEOUT)
        try:
            return _recv(conn)
        except (OSError, ValueError) as exc:
            raise CoordinationError(f"process {pid} sent a malformed result: {exc}") from exc


def _await_image(
    pid: int,
    born: int,
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
        message = _read_reply(pid, born, reply)
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
