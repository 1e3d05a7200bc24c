"""CRIU's RPC transport: one ``criu swrk`` per connection over a SOCK_SEQPACKET socketpair.

One request per packet; replies are sized with ``recv(MSG_PEEK | MSG_TRUNC)``. While a request
runs, CRIU may send NOTIFY messages (with ``notify_scripts``) and waits for our answer; the loop
in :meth:`Connection.receive` hands each to a callback.

Every ``criu swrk`` is started by :func:`start_swrk`, with umask 077: CRIU creates its images,
logs and stats 0644, and pages hold a process's secrets.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .._proto import criu_rpc_pb2 as pb
from . import _kdat, _thp


@dataclass(frozen=True)
class NotifyEvent:
    """A CRIU notification: ``name`` is the action script name (``pre-dump``, ``post-restore``
    …); ``pid`` is set for ``post-restore`` and the network/namespace events."""

    name: str
    pid: int


NotifyHandler = Callable[[NotifyEvent], "bool | None"]
"""Called for each notification; returning ``False`` (or raising) makes CRIU abort."""


class TransportError(Exception):
    """The swrk connection broke (CRIU died or closed it). Internal: the engine converts it."""


SWRK_UMASK = 0o077


def start_swrk(
    criu: str,
    sock_fd: int,
    *,
    pass_fds: Sequence[int] = (),
    options: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    restoring: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``criu swrk`` serving the socket ``sock_fd`` (which the caller then closes);
    ``pass_fds`` are further fds CRIU must open itself, ``options`` command-line options that
    hold for every request (``--action-script``), ``env`` its environment (ours by default).
    No stdio: CRIU logs to the log file a request names. CRIU's kernel-facts cache is made
    first where CRIU cannot keep it itself (``_kdat``: ~30-65 ms less per request here).
    A CRIU that will restore (``restoring``) starts with transparent huge pages off, which its
    restored tasks inherit until its restorer sets their own flag back (``_thp``: else a
    lazy copy with eager pages can read zeros on a host with THP ``always``)."""
    _kdat.ensure(criu)
    with _thp.children_without_thp() if restoring else contextlib.nullcontext():
        return subprocess.Popen(
            [criu, *options, "swrk", str(sock_fd)],
            pass_fds=(sock_fd, *pass_fds),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            umask=SWRK_UMASK,
            env=env,
        )


class Connection:
    """A connected ``criu swrk`` process (or a socket to one spawned elsewhere)."""

    def __init__(self, sock: socket.socket, proc: subprocess.Popen[bytes] | None = None) -> None:
        self.sock = sock
        self.proc = proc
        self.notify_error: BaseException | None = None
        self._pidfd: int | None = None  # of proc, once waited on (_until_readable)

    @classmethod
    def spawn(
        cls, criu: str, pass_fds: Sequence[int] = (), *, restoring: bool = False
    ) -> Connection:
        """Start ``criu swrk`` as our child, connected through a fresh socketpair; ``pass_fds``
        are the fds CRIU must open (images dir, work dir, inherited fds); ``restoring``: it
        is for a restore (:func:`start_swrk`)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = start_swrk(criu, theirs.fileno(), pass_fds=pass_fds, restoring=restoring)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return cls(ours, proc)

    def alive(self) -> bool:
        """Whether the CRIU on the other end can still take a request: our child has not
        exited and the socket has neither hung up nor anything unread (a connection made
        ahead of time may have lost its CRIU since: a dead one must not fail the command)."""
        if self.proc is not None and self.proc.poll() is not None:
            return False
        poller = select.poll()
        poller.register(self.sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        return not poller.poll(0)

    def send(self, req: pb.Req) -> None:
        """Send one request packet."""
        try:
            self.sock.send(req.SerializeToString())
        except OSError as exc:
            raise TransportError(f"cannot send to CRIU: {exc}") from exc

    def recv(self) -> pb.Resp:
        """Receive one response packet."""
        try:
            self._until_readable()
            # With MSG_TRUNC the kernel reports the whole packet's length; Python returns a
            # buffer of that length, so len() is the size to read.
            size = len(self.sock.recv(1, socket.MSG_PEEK | socket.MSG_TRUNC))
            data = self.sock.recv(max(size, 1))
        except OSError as exc:
            raise TransportError(f"cannot read from CRIU: {exc}") from exc
        if not data:
            raise TransportError("CRIU closed the connection")
        resp = pb.Resp()
        resp.ParseFromString(data)
        return resp

    def _until_readable(self) -> None:
        """Wait until the socket has something to read, or hung up; with CRIU our child, stop
        waiting once it has exited with nothing left to read (:class:`TransportError`): a
        process it forked (a restored task not yet itself, CRIU killed under it) may hold the
        socket's other end open for ever, so it never hangs up."""
        if self.proc is None:
            return
        if self._pidfd is None:
            try:
                self._pidfd = os.pidfd_open(self.proc.pid)
            except ProcessLookupError:  # reaped already: it has exited
                self._pidfd = -1
        poller = select.poll()
        poller.register(self.sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        if self._pidfd >= 0:
            poller.register(self._pidfd, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll(None if self._pidfd >= 0 else 0)}
            if self.sock.fileno() in ready:
                return
            if self._pidfd < 0 or self._pidfd in ready:
                if select.select([self.sock], [], [], 0)[0]:  # its last words first
                    return
                raise TransportError("CRIU exited, its socket held open by a process it forked")

    def call(self, req: pb.Req, notify: NotifyHandler | None = None) -> pb.Resp:
        """Send ``req`` and return CRIU's final response, answering notifications on the way.

        An exception raised by ``notify`` is kept in :attr:`notify_error` and answered as a
        failure, so CRIU aborts cleanly; the caller re-raises it.
        """
        self.send(req)
        return self.receive(notify)

    def receive(self, notify: NotifyHandler | None = None) -> pb.Resp:
        """CRIU's final response to a request already sent (by us, or by whoever set up the
        connection: a keeper sends a self-dump's request for the process), answering
        notifications on the way as :meth:`call` does."""
        while True:
            resp = self.recv()
            if resp.type != pb.NOTIFY:
                return resp
            ok = True
            if notify is not None:
                try:
                    ok = notify(NotifyEvent(resp.notify.script, resp.notify.pid)) is not False
                except BaseException as exc:  # kept and re-raised by the caller
                    self.notify_error = exc
                    ok = False
            self.send(pb.Req(type=pb.NOTIFY, notify_success=ok))

    def close(self) -> None:
        """Close the socket and reap the swrk process (CRIU exits when the socket closes)."""
        self.sock.close()
        if self._pidfd is not None and self._pidfd >= 0:
            os.close(self._pidfd)
        self._pidfd = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
