"""The relay of CRIU's page traffic over a migration's channel (:mod:`._channel`).

CRIU takes a connected socket as ``ps.fd`` and then speaks plain bytes on it (skipping its own
TLS). A TLS socket's fd cannot be handed over: its bytes are records only our process can
decrypt. So torpor keeps the TLS session and copies between a plain socket and the channel
(``D``/``E`` frames, so either direction can end on its own, as a TCP half-close), until both
have ended.

For a lazy migration the plain socket is CRIU's own socket at both ends, with no hop of ours
in between: on the source the page server's end of a socketpair (:class:`Gate` with
``requests_to_plain``: the target daemon's requests pass to CRIU only whole, and the end of
the relay never reaches CRIU), on the target the lazy-pages daemon's TCP connection itself,
accepted and checked by the keeper and handed to the server's relay over the local socket by
``SCM_RIGHTS`` (:func:`start_relay` with ``daemon_socket``). A page fault's request and its
answer thus cross two relays, not four hops.

Why it is fast enough: one thread per relay, non-blocking, both ways at once; a frame's bytes
go on as they arrive (page faults wait on them), written at once when the other socket takes
them rather than after another ``select``; the selector is changed only when what is waited
for changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import selectors
import socket
import ssl
import struct
import termios
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._channel import _DATA, _END, _HEADER, MAX_DATA, ChannelError
from ._closehold import CLOSED_STATUS, CloseHold

if TYPE_CHECKING:
    from ._channel import Conn

PSI_SIZE = 32  # a ``page_server_iov``: u32 cmd, 4 bytes pad, u64 nr_pages, vaddr, dst_id
CLOSE_COMMANDS = (0x1023, 0x1024)  # PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE
_GOOD, _BAD = b"K", b"F"  # the target server's verdict to the keeper (daemon_socket)
HANDOVER_TIMEOUT = 60.0  # seconds for the keeper to hand over the daemon's connection or end
STALL_AFTER = 1 << 20  # tests: bytes of pages passed before a stalled relay passes no more


@dataclass(frozen=True)
class RelayStats:
    """Bytes relayed: ``sent`` from the plain socket to the peer, ``received`` the other way."""

    sent: int
    received: int


class Gate:
    """What a lazy migration's relay watches in the target daemon's stream of 32-byte
    requests: :attr:`closed` once it sent ``PS_IOV_CLOSE`` (every page is in).

    ``requests_to_plain`` (the source; plain is CRIU's page server): the peer's bytes are
    the requests. They are written to CRIU only as whole requests (:meth:`take`, what is
    still to write in :attr:`out`), and the relay never shuts CRIU's socket down: CRIU takes
    an EOF at a request boundary for the end of a good transfer. Its answers are pages
    (counted in :attr:`pages`; with ``stall``, a path made once :data:`STALL_AFTER` bytes
    have passed, after which no more pass: tests break the transfer there).

    Otherwise (the target; plain is the daemon's connection): the plain side's bytes are the
    requests, passed as they come, and noted; the peer's end shuts the daemon's socket down
    only after the close, else the relay fails and leaves the connection open (the copy is
    killed first)."""

    def __init__(self, *, requests_to_plain: bool, stall: str | None = None) -> None:
        self.requests_to_plain = requests_to_plain
        self.closed = False
        self.pages = 0
        self.out = bytearray()  # requests_to_plain: whole requests not yet written
        self.written = 0  # requests_to_plain: bytes of requests written to plain
        self._unit = bytearray()  # the start of a request not yet whole
        self._stall = Path(stall) if stall else None
        self.stalled = False

    def take(self, data: memoryview | bytes) -> int | None:
        """Requests seen going towards the daemon's peer: note a close; for the source,
        queue the whole ones in :attr:`out`. Where in ``data`` the first close begins, if it
        is in these (negative: it began in bytes taken before)."""
        unit = self._unit
        before = len(unit)
        unit += data
        whole = len(unit) - len(unit) % PSI_SIZE
        first = None
        for at in range(0, whole, PSI_SIZE):
            if int.from_bytes(unit[at : at + 4], "little") & 0xFFFF in CLOSE_COMMANDS:
                if not self.closed:
                    first = at - before
                self.closed = True
        if self.requests_to_plain:
            self.out += unit[:whole]
        del unit[:whole]
        return first

    def passed_pages(self, n: int) -> bool:
        """``n`` bytes of answers came from CRIU; whether they go on (False once stalled)."""
        if self.stalled:
            return False
        self.pages += n
        if self._stall is not None and self.pages >= STALL_AFTER:
            self._stall.touch()
            self.stalled = True
        return True


def relay(
    conn: Conn,
    plain: socket.socket,
    *,
    idle_timeout: float | None = None,
    gate: Gate | None = None,
) -> RelayStats:
    """Copy bytes both ways between ``plain`` (CRIU's local socket) and the channel, until the
    plain side has ended (EOF: an ``E`` frame is sent) and the peer has ended its side (its
    ``E`` frame: ``plain`` is then shut down for writing). The channel stays usable for
    messages after. :class:`ChannelError` if the channel breaks, the peer sends a message
    mid-relay, or nothing moves for ``idle_timeout`` seconds. With a ``gate``, see
    :class:`Gate` for what changes.

    Each way holds at most one frame, in a buffer made once: a peer that floods is simply not
    read while ``plain`` does not drain."""
    return _Relay(conn, plain, gate).run(idle_timeout)


class _Relay(CloseHold):
    """The state of one :func:`relay` (see there)."""

    def __init__(
        self,
        conn: Conn,
        plain: socket.socket,
        gate: Gate | None,
        confirm: socket.socket | None = None,
    ) -> None:
        self.conn, self.tls, self.plain, self.gate = conn, conn.sock, plain, gate
        # The target, with ``confirm`` (the keeper's socket): the daemon's close is held back
        # and answered here until the keeper says how the daemon ended (:mod:`._closehold`).
        self._init_hold(confirm)
        # The frame holding the close is in hand (its TCP bytes marked once written).
        self.close_in_frame = False
        self.gated_in = gate is not None and gate.requests_to_plain
        # plain -> channel: one frame, header included; ``out_len`` 0: none in hand.
        self.out = bytearray(_HEADER.size + MAX_DATA)
        self.out_view = memoryview(self.out)
        self.out_len = self.out_off = 0
        # channel -> plain: the header being read, then the body; written on as it comes.
        self.head = bytearray(_HEADER.size)
        self.head_got = 0
        self.body = bytearray(MAX_DATA)
        self.body_view = memoryview(self.body)
        self.body_len = -1  # -1: reading a header
        self.body_got = self.body_sent = 0
        self.tls_wants_write = False  # a TLS read that needs the socket writable first
        self.plain_ended = self.peer_ended = self.shut = False
        self.sent = self.received = 0
        # The target: the channel's TCP bytes written up to the frame with the daemon's close
        # (see :meth:`finish_close`), and the bytes written to the daemon since that close.
        self.close_mark: int | None = None
        self.after_close = 0

    def _to_plain(self) -> int:
        """Bytes waiting to go to plain."""
        if self.gated_in:
            assert self.gate is not None
            return len(self.gate.out)
        return self.body_got - self.body_sent

    def run(self, idle_timeout: float | None) -> RelayStats:
        tls, plain = self.tls, self.plain
        tls.setblocking(False)
        plain.setblocking(False)
        sel = selectors.DefaultSelector()
        confirm = self.confirm
        masks: dict[Any, int] = {tls: 0, plain: 0, confirm: 0}
        read, write = selectors.EVENT_READ, selectors.EVENT_WRITE
        try:
            while True:
                if self.peer_ended and self.body_len < 0 and not self.shut:
                    self._peer_end()
                if self.plain_ended and self.shut and not self.out_len:
                    return RelayStats(self.sent, self.received)
                if self.held is not None:
                    self._judge_held()
                read_tls = not self.peer_ended and (
                    (len(self.gate.out) < MAX_DATA if self.gated_in and self.gate else True)
                    and (self.body_len < 0 or self.body_got < self.body_len)
                )
                want_tls = (read if read_tls else 0) | (
                    write if self.out_len or self.tls_wants_write else 0
                )
                held = self.held is not None
                want_plain = (
                    read if not self.plain_ended and not self.out_len and not held else 0
                ) | (write if self._to_plain() else 0)
                want_confirm = read if self.confirm_open and self.word is None else 0
                for s, ev in ((tls, want_tls), (plain, want_plain), (confirm, want_confirm)):
                    if s is None:
                        continue
                    if ev != masks[s]:
                        if not masks[s]:
                            sel.register(s, ev)
                        elif not ev:
                            sel.unregister(s)
                        else:
                            sel.modify(s, ev)
                        masks[s] = ev
                ev_tls = ev_plain = 0
                if read_tls and tls.pending():  # decrypted bytes select cannot see
                    ev_tls = read
                else:
                    wait = idle_timeout
                    waiting = held and self.word is None  # (the keeper's word on its way)
                    if waiting:
                        wait = self._keepalive(wait)
                    events = sel.select(wait)
                    if not events:
                        if waiting:
                            continue  # a keepalive due, or _judge_held: past HOLD_LIMIT
                        raise ChannelError(
                            f"relay with {self.conn._who()}: nothing moved in {idle_timeout} s"
                        )
                    for key, ev in events:
                        if key.fileobj is tls:
                            ev_tls = ev
                        elif key.fileobj is plain:
                            ev_plain = ev
                        else:
                            self._confirmed()
                if ev_tls:
                    self.tls_wants_write = False
                    if self.out_len:
                        self._tls_write()
                    if read_tls:
                        self._tls_read()
                        if self._to_plain():
                            ev_plain |= write  # at once: plain most often takes it
                if ev_plain & write and self._to_plain():
                    self._plain_write()
                if ev_plain & read and not self.plain_ended and not self.out_len:
                    self._plain_read()
        except (OSError, ssl.SSLError) as exc:
            raise ChannelError(f"relay with {self.conn._who()} broke: {exc}") from exc
        finally:
            sel.close()
            tls.setblocking(True)
            with contextlib.suppress(OSError):
                plain.setblocking(True)

    def _peer_end(self) -> None:
        """The peer ended its side and everything it sent is written."""
        gate = self.gate
        if gate is not None and gate.requests_to_plain:
            if gate.out:
                return  # requests still to write first
            # Never an EOF towards CRIU (the end of a good transfer to it): what CRIU sends
            # from now on is of no use to the target, which ended.
            self.shut = True
            if not self.plain_ended and not self.out_len:
                self._end_plain()
            return
        if gate is not None and (not gate.closed or self.held is not None):
            # The daemon's connection stays open: the copy is killed before it closes.
            raise ChannelError(
                f"{self.conn._who()} ended the transfer before the last page was asked for"
            )
        with contextlib.suppress(OSError) if self.answered else contextlib.nullcontext():
            self.plain.shutdown(socket.SHUT_WR)  # (a daemon answered here may be gone)
        self.shut = True

    def _end_plain(self) -> None:
        self.plain_ended = True
        _HEADER.pack_into(self.out, 0, _END, 0)
        self.out_len = _HEADER.size
        self._tls_write()

    def _tls_write(self) -> None:
        # A write that wanted more room is retried with the same bytes (OpenSSL's rule).
        try:
            self.out_off += self.tls.send(self.out_view[self.out_off : self.out_len])
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return
        if self.out_off == self.out_len:
            self.out_len = self.out_off = 0
            if self.close_in_frame:
                self.close_in_frame = False
                self.close_mark = _written(self.tls)
            if self.shut and not self.plain_ended and self.gated_in:
                self._end_plain()  # the source's end, once the frame in hand has gone

    def _tls_read(self) -> None:
        while True:  # everything already decrypted, without waiting on select again
            try:
                if self.body_len < 0:
                    n = self.tls.recv_into(memoryview(self.head)[self.head_got :])
                else:
                    n = self.tls.recv_into(self.body_view[self.body_got : self.body_len])
            except ssl.SSLWantReadError:
                return
            except ssl.SSLWantWriteError:
                self.tls_wants_write = True
                return
            if n == 0:
                raise ChannelError(f"{self.conn._who()} closed the channel mid-relay")
            if self.body_len >= 0:
                self.received += n
                if self.gated_in:
                    assert self.gate is not None
                    self.gate.take(self.body_view[self.body_got : self.body_got + n])
                    self.body_got += n
                    self.body_sent = self.body_got
                    if self.body_got == self.body_len:
                        self.body_len = -1
                        self.body_got = self.body_sent = 0
                    return
                self.body_got += n
                if self.answered:  # the source's answer to the close: the daemon has one
                    self.body_sent = self.body_got
                    if self.body_got == self.body_len:
                        self.body_len = -1
                        self.body_got = self.body_sent = 0
                    continue
                if self.body_got == self.body_len:
                    return  # this frame's bytes go to plain before the next is read
                continue
            self.head_got += n
            if self.head_got < _HEADER.size:
                continue
            self.head_got = 0
            kind, length = _HEADER.unpack(self.head)
            if kind == _END and length == 0:
                self.peer_ended = True  # what follows is left for Conn.recv
                return
            if kind != _DATA or length > MAX_DATA:
                raise ChannelError(
                    f"{self.conn._who()} sent a bad relay frame ({kind!r}, {length} bytes)"
                )
            self.body_len, self.body_got, self.body_sent = length, 0, 0
            if not length:
                self.body_len = -1

    def _plain_write(self) -> None:
        if self.gated_in:
            assert self.gate is not None
            out = self.gate.out
            try:
                n = self.plain.send(out)
            except BlockingIOError:
                return
            self.gate.written += n
            del out[:n]
            return
        try:
            n = self.plain.send(self.body_view[self.body_sent : self.body_got])
        except BlockingIOError:
            return
        if self.gate is not None and self.gate.closed:
            self.after_close += n
        self.body_sent += n
        if self.body_sent == self.body_len:
            self.body_len = -1
            self.body_got = self.body_sent = 0

    def _plain_read(self) -> None:
        try:
            n = self.plain.recv_into(self.out_view[_HEADER.size :])
        except BlockingIOError:
            return
        if n == 0:
            self._end_plain()
            return
        gate = self.gate
        if gate is not None:
            if gate.requests_to_plain:
                if not gate.passed_pages(n):
                    return  # tests: a stalled transfer
            else:
                start = gate.take(self.out_view[_HEADER.size : _HEADER.size + n])
                if start is not None:
                    if self.confirm is not None:
                        n = self._hold_close(max(start, 0), n)  # what came before it goes
                        if not n:
                            return
                    else:
                        self.close_in_frame = True
        self._send_frame(None, n)

    def _send_frame(self, data: bytes | None, n: int = 0) -> None:
        """Send a D frame of ``data``, or of the ``n`` bytes read into the out buffer."""
        if data is not None:
            n = len(data)
            self.out_view[_HEADER.size : _HEADER.size + n] = data
        self.sent += n
        _HEADER.pack_into(self.out, 0, _DATA, n)
        self.out_len = _HEADER.size + n
        self._tls_write()  # at once: the socket is most often writable

    def finish_close(self) -> bool:
        """The target, its relay broken: whether the copy has every page all the same, and
        if so, end the daemon's transfer as the source would have. The daemon sent its close
        (every page is in) and the source's TCP acknowledged the frame holding it: the source
        has it, so CRIU there ends the dump and kills the original (``_lazy``: a break after
        the close is a good end). Killing this copy too would lose the process; instead the
        daemon gets the page server's answer to its close (a status of 0, four bytes, those
        not already passed on) and its socket is shut down, so it exits as after any
        transfer. A close not acknowledged may never have reached the source, which then
        takes its original back: this copy is killed, as before (False)."""
        gate = self.gate
        if gate is None or gate.requests_to_plain or self.held is not None:
            return False
        if not gate.closed or self.close_mark is None:
            return False
        try:
            if _acked(self.tls) < self.close_mark or self.after_close > len(CLOSED_STATUS):
                return False
            if not self.answered:
                self.plain.settimeout(HANDOVER_TIMEOUT)
                self.plain.sendall(CLOSED_STATUS[self.after_close :])
            self.plain.shutdown(socket.SHUT_WR)
        except OSError:
            return self.answered  # (answered: the daemon may be gone already)
        return True


_TCP_INFO_BYTES_ACKED = 120  # the offset of tcpi_bytes_acked (u64) in struct tcp_info


def _acked(sock: socket.socket) -> int:
    """The bytes of ``sock``'s TCP stream its peer has acknowledged (plus one: the SYN);
    still there once the connection is reset."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    (acked,) = struct.unpack_from("=Q", info, _TCP_INFO_BYTES_ACKED)
    return int(acked)


def _written(sock: socket.socket) -> int | None:
    """The bytes written to ``sock``'s TCP stream so far, counted as :func:`_acked` counts
    (acknowledged, and in the send queue); None if they cannot be told."""
    try:
        queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
        return _acked(sock) + int(queued)
    except OSError:
        return None


class RelayHandle:
    """A relay running in a thread: :attr:`criu_sock` is the end to give CRIU (as
    ``ps.fd``); :meth:`wait` returns the stats or raises the relay's error.

    With ``daemon_socket`` (the target of a lazy migration), :attr:`criu_sock` goes to the
    keeper instead, which sends the lazy-pages daemon's connection over it (``SCM_RIGHTS``,
    one byte) once it has checked it is the daemon's: the relay then runs on that socket
    itself, with a :class:`Gate`, and tells the keeper how it ended (``K``: the daemon closed
    the transfer and the source ended; ``F`` and why: the transfer broke; nothing and EOF:
    this server is gone; ``K`` too for a break once the source has acknowledged the daemon's
    close: :meth:`_Relay.finish_close`). The keeper holds its own descriptor of the
    connection until the copy is dead or resident. If the keeper ends the socket without
    sending one, the relay runs on the local socket (at EOF: the transfer ends at once); if it
    does neither for :data:`HANDOVER_TIMEOUT` seconds, the relay fails."""

    def __init__(
        self, conn: Conn, *, idle_timeout: float | None, daemon_socket: bool = False
    ) -> None:
        self.criu_sock, self._ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._result: RelayStats | BaseException | None = None
        self.gate: Gate | None = None
        self._daemon_socket = daemon_socket
        self._thread = threading.Thread(
            target=self._run, args=(conn, idle_timeout), name="torpor-relay", daemon=True
        )
        self._thread.start()

    def _run(self, conn: Conn, idle_timeout: float | None) -> None:
        daemon: socket.socket | None = None
        try:
            if self._daemon_socket:
                daemon = self._handed_over()
            if daemon is None:
                self._result = relay(conn, self._ours, idle_timeout=idle_timeout)
                return
            self.gate = Gate(requests_to_plain=False)
            running = _Relay(conn, daemon, self.gate, confirm=self._ours)
            try:
                self._result = running.run(idle_timeout)
            except ChannelError:
                if not running.finish_close():
                    raise
                self._result = RelayStats(running.sent, running.received)
            with contextlib.suppress(OSError):
                self._ours.sendall(_GOOD)
        except BaseException as exc:  # handed to wait(), in the caller's thread
            self._result = exc
            if self._daemon_socket:  # the keeper kills the copy, then closes the connection
                why = exc.msg if isinstance(exc, ChannelError) else repr(exc)
                with contextlib.suppress(OSError):
                    self._ours.sendall(_BAD + why.encode()[:4000])
        finally:
            if daemon is not None:
                daemon.close()  # ours only: the keeper holds the connection
            self._ours.close()

    def _handed_over(self) -> socket.socket | None:
        self._ours.settimeout(HANDOVER_TIMEOUT)
        try:
            return receive_socket(self._ours)
        except TimeoutError as exc:
            raise ChannelError(
                f"the keeper handed over no connection in {HANDOVER_TIMEOUT:g} s"
            ) from exc
        finally:
            self._ours.settimeout(None)

    def wait(self, timeout: float | None = None) -> RelayStats:
        """The relay's stats once it ended (:class:`ChannelError` as it failed)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise ChannelError(f"relay still running after {timeout} s")
        if isinstance(self._result, BaseException):
            raise self._result
        assert self._result is not None
        return self._result


def receive_socket(local: socket.socket) -> socket.socket | None:
    """The socket sent over ``local`` by :func:`send_socket`; None if ``local`` ended first."""
    _msg, fds, _flags, _addr = socket.recv_fds(local, 1, 1)
    if not fds:
        return None
    for extra in fds[1:]:
        with contextlib.suppress(OSError):
            os.close(extra)
    sock = socket.socket(fileno=fds[0])
    if sock.type != socket.SOCK_STREAM:
        sock.close()
        return None
    return sock


def send_socket(local: socket.socket, sock: socket.socket) -> None:
    """Send ``sock`` (a descriptor of it) over ``local`` (``SCM_RIGHTS``)."""
    socket.send_fds(local, [b"S"], [sock.fileno()])


def verdict(local: socket.socket) -> str | None:
    """After :func:`send_socket`: block until the relay ended; None if it ended well, else
    why not."""
    got = bytearray()
    try:
        while chunk := local.recv(4096):
            got += chunk
    except OSError:
        if not got:  # (else the relay's word came: a reset after it, e.g. a word of ours
            raise  # it never read, changes nothing)
    if got[:1] == _GOOD:
        return None
    if got[:1] == _BAD:
        return got[1:].decode(errors="replace") or "the relay broke"
    return "the migration server's relay ended without a word"


def start_relay(
    conn: Conn, *, idle_timeout: float | None = None, daemon_socket: bool = False
) -> RelayHandle:
    """Relay between ``conn`` and a new local socket pair in a thread (see :func:`relay` and
    :class:`RelayHandle`); give ``handle.criu_sock`` to CRIU (or the keeper), then close it
    here."""
    return RelayHandle(conn, idle_timeout=idle_timeout, daemon_socket=daemon_socket)
