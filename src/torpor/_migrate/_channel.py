"""A mutually authenticated TLS channel between two torpor homes, over TCP.

Both ends present their home's TLS identity (:mod:`torpor._identity._tls`); each accepts the
other only if its certificate's fingerprint is in its trust store. TLS 1.3 only, a client
certificate required, no CA, no session tickets (a resumed session would skip the client's
certificate).

**How a peer is checked, and why it is safe.** Python's ``ssl`` has no verify callback, so:

- *Server* (:class:`Listener`, each handshake in a thread of its own, :meth:`Listener.accept`
  handing out those that passed): ``CERT_REQUIRED`` with the trusted peers' certificates
  (self-signed) as the only trust anchors, in a context built afresh for every connection from
  the trust store as it is then. OpenSSL thus refuses, *in the handshake*, a client without a
  certificate, with one not in the store, or one that cannot sign with the certificate's key
  (TLS 1.3 CertificateVerify): such a client gets a TLS alert and nothing else. Then the exact
  fingerprint of ``getpeercert(binary_form=True)`` is looked up in the store (re-read: a peer
  removed meanwhile is refused) before a byte of application data is read or written: OpenSSL
  would accept a certificate *issued* by a trusted one, the fingerprint check does not.
- *Client* (:func:`connect`): ``CERT_NONE``, then the server's certificate fingerprint is
  compared with the pinned one (and must be trusted) before a byte is written. ``CERT_NONE``
  skips only the *chain* check (there is no chain: the certificate is self-signed); OpenSSL
  still verifies the server's CertificateVerify signature with the certificate's key, so a
  server showing a trusted certificate holds its key. Pinning the exact certificate is stricter
  than any CA check.
- The server speaks first, a ``hello`` message, only after both checks: the client's
  :func:`connect` returns once it has it, so a client the server refused fails there (TLS 1.3
  finishes the client's side of the handshake before the server has judged its certificate).

**Framing.** Frames of a 5-byte header (kind, 32-bit big-endian length) and a body:
``M`` a JSON object (at most :data:`MAX_MESSAGE` bytes), ``D`` relayed bytes (at most
:data:`MAX_DATA`), ``E`` the end of one direction of a relay. A frame read must be whole
within the timeout set (:meth:`Conn.settimeout`), however its bytes are spread (:mod:`._deadline`).

**CRIU's page traffic.** CRIU speaks plain bytes on a socket torpor hands it; the TLS
session stays here and :func:`relay` (:mod:`._relay`) copies between that plain socket and the
channel (``D``/``E`` frames, so either direction can end on its own, as a TCP half-close).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import json
import os
import selectors
import socket
import ssl
import struct
import threading
import time
from pathlib import Path
from typing import Any

from .._errors import TorporError
from .._identity._tls import TlsIdentity, fingerprint, parse_fingerprint, tls_identity
from .._identity._trust import Peer, TrustStore
from . import _deadline
from ._deadline import Deadline
from ._sockutil import _reason, _shut, _source, _tune

MAX_MESSAGE = 1 << 20
MAX_DATA = 1 << 20
HANDSHAKE_TIMEOUT = 10.0
MAX_HANDSHAKES = 16  # TLS handshakes a listener runs at once (see Listener)
MAX_PER_SOURCE = 4  # of them from one source address (an IPv6 /64: see Listener)
MAX_WAITING = 16  # authenticated connections waiting for Listener.accept
MAX_REFUSALS = 64  # refusals waiting to be reported by Listener.accept
_HEADER = struct.Struct(">cI")
_MSG, _DATA, _END = b"M", b"D", b"E"
_SMALL = 16 * 1024  # a data frame this small is joined to its header rather than copied


class ChannelError(TorporError):
    """The channel broke or its peer broke the protocol (a bad frame, a closed link)."""


class PeerRefusedError(ChannelError):
    """A peer was not authenticated: no TLS, no or an untrusted certificate, a wrong pin."""

    def __init__(self, msg: str, *, peer: str | None = None, hint: str | None = None) -> None:
        super().__init__(msg, hint=hint)
        self.peer = peer


def _context(ident: TlsIdentity, *, server: bool, trusted: list[bytes]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ident.load_into(ctx)
    if server:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.num_tickets = 0  # no resumption: every connection shows its certificate
        if trusted:  # none trusted: no anchor, every certificate fails
            ctx.load_verify_locations(cadata=b"".join(trusted))
    else:
        ctx.check_hostname = False  # the pinned fingerprint is the identity, not a name
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Conn:
    """An authenticated channel to :attr:`peer` (the trusted peer at the other end).

    Reads are exact (``recv_into`` of what the frame in hand still needs, never more): the
    bytes after a frame stay in the TLS layer for whoever reads next (:func:`relay`, a
    message), and no buffer of ours is ever larger than one frame."""

    def __init__(self, sock: ssl.SSLSocket, peer: Peer) -> None:
        self.sock = sock
        self.peer = peer
        self._wbuf: bytearray | None = None  # one frame being written (send_bytes)

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self.sock.close()

    def settimeout(self, seconds: float | None) -> None:
        """Time out a receive unless its frame is whole ``seconds`` after its first read, and
        a blocking write after ``seconds`` (None: never)."""
        self.sock.settimeout(seconds)

    def send(self, msg: dict[str, Any]) -> None:
        """Send one JSON object."""
        body = json.dumps(msg, separators=(",", ":")).encode()
        if len(body) > MAX_MESSAGE:
            raise ChannelError(f"message of {len(body)} bytes is over the {MAX_MESSAGE} limit")
        self._sendall(_HEADER.pack(_MSG, len(body)) + body)

    def recv(self) -> dict[str, Any]:
        """Receive one JSON object (:class:`ChannelError` if the peer sent anything else, or
        closed the channel)."""
        kind, body = self._frame()
        if kind != _MSG:
            raise ChannelError(f"{self._who()} sent a {kind!r} frame where a message was due")
        try:
            msg = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise ChannelError(f"{self._who()} sent a message that is not JSON") from exc
        if not isinstance(msg, dict):
            raise ChannelError(f"{self._who()} sent a message that is not a JSON object")
        return msg

    def _who(self) -> str:
        return f"peer {self.peer.name!r}"

    def _sendall(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError) as exc:
            raise ChannelError(f"channel to {self._who()} broke: {exc}") from exc

    def _send_data(self, data: bytes | bytearray | memoryview) -> None:
        """One ``D`` frame of ``data``, header and body in one write (one TLS record run, one
        segment with ``TCP_NODELAY``), copied into a buffer kept for it rather than joined."""
        n = len(data)
        if n > MAX_DATA:
            raise ChannelError(f"a data frame of {n} bytes is over the {MAX_DATA} limit")
        if n <= _SMALL:
            self._sendall(_HEADER.pack(_DATA, n) + bytes(data))
            return
        if self._wbuf is None:
            self._wbuf = bytearray(_HEADER.size + MAX_DATA)
        _HEADER.pack_into(self._wbuf, 0, _DATA, n)
        self._wbuf[_HEADER.size : _HEADER.size + n] = data
        self._sendall(memoryview(self._wbuf)[: _HEADER.size + n])

    def _header(self, due: Deadline | None) -> tuple[bytes, int]:
        """The next frame's kind and length, checked against the kind's bound."""
        kind, length = _HEADER.unpack(self._exact(_HEADER.size, due))
        limit = {_MSG: MAX_MESSAGE, _DATA: MAX_DATA, _END: 0}.get(kind)
        if limit is None or length > limit:
            raise ChannelError(f"{self._who()} sent a bad frame header ({kind!r}, {length} bytes)")
        return kind, length

    def _frame(self) -> tuple[bytes, bytes]:
        """The next frame, whole within the socket's timeout (:mod:`._deadline`)."""
        due = _deadline.start(self.sock)
        try:
            kind, length = self._header(due)
            return kind, self._exact(length, due)
        finally:
            if due is not None:
                due.done()

    def _data_into(self, buf: bytearray | memoryview) -> int:
        """Read the next frame, which must be a ``D`` frame of 1 to ``len(buf)`` bytes (the
        file data still due), into ``buf``, whole within the socket's timeout; its length."""
        due = _deadline.start(self.sock)
        try:
            kind, length = self._header(due)
            if kind != _DATA:
                raise ChannelError(f"{self._who()} sent a {kind!r} frame where file data was due")
            if length > len(buf):
                raise ChannelError(f"{self._who()} sent more file data than announced")
            if not length:
                raise ChannelError(f"{self._who()} sent an empty data frame")
            self._fill(memoryview(buf)[:length], due)
        finally:
            if due is not None:
                due.done()
        return length

    def _exact(self, n: int, due: Deadline | None) -> bytes:
        buf = bytearray(n)
        self._fill(memoryview(buf), due)
        return bytes(buf)

    def _fill(self, view: memoryview, due: Deadline | None) -> None:
        """Fill ``view`` from the channel, reading no byte past it, by ``due``."""
        got, n = 0, len(view)
        while got < n:
            try:
                if due is not None:
                    due.before_read()
                k = self._recv_into(view[got:])
            except TimeoutError as exc:
                within = f"within {due.budget:g} s" if due is not None else "in time"
                raise ChannelError(f"{self._who()} sent no whole frame {within}") from exc
            except (OSError, ssl.SSLError) as exc:
                raise ChannelError(f"channel to {self._who()} broke: {exc}") from exc
            if not k:
                raise ChannelError(f"{self._who()} closed the channel")
            got += k

    def _recv_into(self, view: memoryview) -> int:
        recv_into = getattr(self.sock, "recv_into", None)
        if recv_into is not None:
            return int(recv_into(view, len(view)))
        # A socket-like object with recv only (the fuzz tests' scripted peer).
        chunk = self.sock.recv(len(view))
        view[: len(chunk)] = chunk
        return len(chunk)


class Listener:
    """A TCP socket accepting only trusted peers (see the module docstring).

    Connections are taken off the socket by a thread of the listener's own from the moment it
    is made, and each TLS handshake (and the fingerprint check after it) runs in a thread of
    its own, so that a client that connects and sends nothing, or dribbles its handshake,
    holds up nobody else: :meth:`accept` hands out the connections whose peers passed, in the
    order they passed, and reports each refusal likewise.

    Bounds: at most :data:`MAX_HANDSHAKES` handshakes at once, each over within
    :data:`HANDSHAKE_TIMEOUT` seconds from its start (a total deadline, not one per read);
    a connection arriving when all are taken makes the **oldest** pending handshake of the
    source holding the most give up (its socket is shut down: it gets nothing), so a flood of
    idle connections ages out instead of locking out a real peer, which needs a few
    milliseconds, and sources flooding together give up their own first. Of those, at most
    :data:`MAX_PER_SOURCE` from one source (an IPv4 address; for IPv6 its /64, which one host
    commonly holds whole): a connection from a source at its cap is closed at once, before
    any TLS, so that one address cannot take every slot and make the trusted peers' handshakes
    the oldest ones given up (it is reported once, as a refusal, until one of that source's
    handshakes has ended). At most :data:`MAX_WAITING` authenticated connections wait for
    :meth:`accept` (beyond: the new one is closed before its ``hello``) and
    :data:`MAX_REFUSALS` refusals (beyond: not reported)."""

    def __init__(self, sock: socket.socket, home: Path | None) -> None:
        self.sock = sock
        self._home = home
        self._ident = tls_identity(home)
        self._store = TrustStore(home)
        self._cond = threading.Condition()
        self._closed = False
        self._ready: collections.deque[tuple[ssl.SSLSocket, Peer, str] | Exception] = (
            collections.deque()
        )
        # each connection in its handshake: [when it began, its thread, given up, its fd,
        # its source (_source)]
        self._pending: dict[int, list[Any]] = {}
        self._capped: set[str] = set()  # sources at MAX_PER_SOURCE, reported already
        self._tokens = itertools.count()
        self._wake_r, self._wake_w = os.pipe()
        sock.setblocking(False)
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="torpor-channel-accept", daemon=True
        )
        self._acceptor.start()

    @property
    def address(self) -> tuple[str, int]:
        """The address and port listened on."""
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop listening: the threads end, pending handshakes and connections not yet
        accepted are closed (their peers get nothing)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            for entry in self._pending.values():
                entry[2] = True
                _shut(entry[3])
            threads = [entry[1] for entry in self._pending.values()]
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._acceptor.join(HANDSHAKE_TIMEOUT)
        for t in threads:
            t.join(HANDSHAKE_TIMEOUT)
        with self._cond:
            waiting = list(self._ready)
            self._ready.clear()
        for item in waiting:
            if isinstance(item, tuple):
                item[0].close()
        self.sock.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def accept(self, timeout: float | None = None) -> Conn:
        """The next connection, authenticated. A peer that fails (plain TCP, no or an untrusted
        certificate, a removed trust) is closed having received nothing but the TLS handshake,
        and :class:`PeerRefusedError` is raised: the caller logs it and accepts again.
        :class:`TimeoutError` after ``timeout`` seconds with nothing; :class:`OSError` once
        the listener is closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._ready:
                if self._closed:
                    raise OSError(errno.EBADF, "the listener is closed")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("timed out")
                self._cond.wait(left)
            item = self._ready.popleft()
        if isinstance(item, Exception):
            raise item
        tls, peer, where = item
        try:
            # The store again, now (a trust removed while this connection waited), before
            # the first byte of application data.
            if self._store.find(peer.fingerprint) is None:
                raise PeerRefusedError(
                    f"connection from {where} refused: {peer.name!r} is no longer trusted",
                    peer=where,
                )
            conn = Conn(tls, peer)
            conn.send({"type": "hello", "fingerprint": self._ident.fingerprint})
        except BaseException:
            tls.close()
            raise
        tls.settimeout(None)
        return conn

    # -- the threads ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        sel = selectors.DefaultSelector()
        try:
            sel.register(self.sock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._closed:
                sel.select()
                if self._closed:
                    return
                try:
                    raw, addr = self.sock.accept()
                except BlockingIOError:
                    continue
                except OSError:  # out of fds, say: not a busy loop
                    time.sleep(0.05)
                    continue
                self._start(raw, f"{addr[0]}:{addr[1]}", _source(addr[0]))
        finally:
            sel.close()

    def _start(self, raw: socket.socket, where: str, source: str) -> None:
        """Run ``raw``'s handshake in a thread, once one of the :data:`MAX_HANDSHAKES` is
        free (the oldest pending one is given up for it); close it at once if ``source`` has
        :data:`MAX_PER_SOURCE` pending already."""
        with self._cond:
            if sum(e[4] == source for e in self._pending.values()) >= MAX_PER_SOURCE:
                raw.close()
                if source not in self._capped:
                    self._capped.add(source)
                    self._refuse(
                        PeerRefusedError(
                            f"connections from {source} closed before TLS: {MAX_PER_SOURCE} "
                            "of its handshakes are pending (more are closed unreported until "
                            "one ends)",
                            peer=where,
                        )
                    )
                return
            while len(self._pending) >= MAX_HANDSHAKES and not self._closed:
                live = [e for e in self._pending.values() if not e[2]]
                if live:
                    # The oldest of the source holding the most: several flooding sources
                    # give up their own before a peer's one handshake.
                    held = collections.Counter(e[4] for e in live)
                    most = max(held.values())
                    oldest = min((e for e in live if held[e[4]] == most), key=lambda e: e[0])
                    oldest[2] = True
                    _shut(oldest[3])
                self._cond.wait(1.0)
            if self._closed:
                raw.close()
                return
            token = next(self._tokens)
            t = threading.Thread(
                target=self._handshake, args=(raw, where, token), name="torpor-channel-tls",
                daemon=True,
            )  # fmt: skip
            self._pending[token] = [time.monotonic(), t, False, raw.fileno(), source]
            t.start()

    def _handshake(self, raw: socket.socket, where: str, token: int) -> None:
        """The handshake and the trust check of one connection; its outcome queued for
        :meth:`accept`. The socket stays open (its fd not reused) until this thread's entry
        has left :attr:`_pending`, under the lock: :func:`_shut` never hits another's."""
        sock: socket.socket = raw
        result: tuple[ssl.SSLSocket, Peer, str] | Exception | None = None
        try:
            # One deadline for the whole handshake: CPython's do_handshake waits on the
            # socket's timeout from its start, however the client dribbles its bytes.
            raw.settimeout(HANDSHAKE_TIMEOUT)
            ctx = _context(self._ident, server=True, trusted=self._store.trusted_certs())
            tls = ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            sock = tls  # (a failed wrap_socket handshake would close the fd itself)
            try:
                tls.do_handshake()
            except (OSError, ssl.SSLError) as exc:
                raise PeerRefusedError(
                    f"connection from {where} refused in the TLS handshake: {_reason(exc)}",
                    peer=where,
                ) from exc
            der = tls.getpeercert(binary_form=True)
            fp = fingerprint(der) if der else None
            peer = self._store.find(fp) if fp else None
            if peer is None:
                raise PeerRefusedError(
                    f"connection from {where} refused: certificate {fp} is not trusted",
                    peer=where,
                    hint=f"if that host is trusted: torpor trust add {fp} --name NAME",
                )
            result = (tls, peer, where)
        except Exception as exc:
            result = exc
        with self._cond:
            entry = self._pending.pop(token)
            given_up = entry[2]
            self._capped.discard(entry[4])  # below its cap again: a new refusal is reported
            if given_up and not isinstance(result, tuple):
                result = PeerRefusedError(
                    f"connection from {where} dropped in its TLS handshake: the oldest of "
                    f"{MAX_HANDSHAKES} pending when another came",
                    peer=where,
                )
            keep = False
            if isinstance(result, tuple):
                conns = sum(isinstance(i, tuple) for i in self._ready)
                keep = not given_up and conns < MAX_WAITING and not self._closed
                if keep:
                    self._ready.append(result)
            else:
                self._refuse(result)
            self._cond.notify_all()  # a slot is free (_start), something to accept maybe
        if not keep:
            sock.close()

    def _refuse(self, exc: Exception) -> None:
        """Queue the refusal ``exc`` for :meth:`accept` (under the lock), if fewer than
        :data:`MAX_REFUSALS` wait."""
        refusals = sum(not isinstance(i, tuple) for i in self._ready)
        if refusals < MAX_REFUSALS and not self._closed:
            self._ready.append(exc)
            self._cond.notify_all()


def listen(addr: str, port: int, *, home: Path | None = None, backlog: int = 16) -> Listener:
    """Listen on ``addr:port`` (``port`` 0: any free one, see :attr:`Listener.address`) for
    trusted peers of the torpor home ``home`` (the current one by default)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(backlog)
        return Listener(sock, home)
    except BaseException:
        sock.close()
        raise


def connect(
    host: str,
    port: int,
    expected_fingerprint: str | None = None,
    *,
    home: Path | None = None,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> Conn:
    """Connect to a trusted peer at ``host:port``. Its certificate must have the fingerprint
    ``expected_fingerprint`` (when given) and be in the trust store of ``home``; otherwise the
    connection is closed before a byte is written (:class:`PeerRefusedError`). Returns once the
    peer has accepted this host too (its ``hello``)."""
    where = f"{host}:{port}"
    pin = None
    if expected_fingerprint is not None:
        pin = parse_fingerprint(expected_fingerprint)
        if pin is None:
            raise PeerRefusedError(
                f"{expected_fingerprint!r} is not a certificate fingerprint", peer=where
            )
    store = TrustStore(home)
    ident = tls_identity(home)
    mine = ident.fingerprint
    ctx = _context(ident, server=False, trusted=[])
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise ChannelError(f"cannot connect to {where}: {exc.strerror or exc}") from exc
    try:
        _tune(raw)
        try:
            tls = ctx.wrap_socket(raw)
        except (OSError, ssl.SSLError) as exc:
            raise PeerRefusedError(
                f"TLS handshake with {where} failed: {_reason(exc)}", peer=where
            ) from exc
        raw = tls
        der = tls.getpeercert(binary_form=True)
        fp = fingerprint(der) if der else None
        if pin is not None and fp != pin:
            raise PeerRefusedError(
                f"{where} showed certificate {fp}, not the expected {pin}; refused",
                peer=where,
                hint="someone may be in the way: compare with torpor identity show on the peer",
            )
        peer = store.find(fp) if fp else None
        if peer is None or der is None:
            raise PeerRefusedError(
                f"{where} showed certificate {fp}, which is not trusted; refused",
                peer=where,
                hint=f"if that host is trusted: torpor trust add {fp} --name NAME",
            )
        if peer.cert_der is None:
            store.learn_cert(der)  # from now on it may connect to us as well
        conn = Conn(tls, peer)
        try:
            hello = conn.recv()
        except ChannelError as exc:
            if isinstance(exc.__cause__, TimeoutError):  # handshaken, but not taken yet
                raise ChannelError(
                    f"{where} did not take the connection in time (busy with another migration?)"
                ) from exc
            raise PeerRefusedError(
                f"{where} refused this host's certificate",
                peer=where,
                hint=f"on {peer.name}: torpor trust add {mine} --name NAME",
            ) from exc
        if hello.get("type") != "hello":
            raise ChannelError(f"{where} did not start with hello")
    except BaseException:
        raw.close()
        raise
    tls.settimeout(None)
    return conn
