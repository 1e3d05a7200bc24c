"""A mutually authenticated TLS channel between two torpor homes, over TCP.

Both ends present their home's TLS identity (:mod:`torpor._identity._tls`); each accepts the
other only if its certificate's fingerprint is in its trust store. TLS 1.3 only, a client
certificate required, no CA, no session tickets (a resumed session would skip the client's
certificate).

**How a peer is checked, and why it is safe.** Python's ``ssl`` has no verify callback, so:

- *Server* (:meth:`Listener.accept`): ``CERT_REQUIRED`` with the trusted peers' certificates
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
:data:`MAX_DATA`), ``E`` the end of one direction of a relay.

**CRIU's page traffic.** CRIU takes a connected socket as ``ps.fd`` and then speaks plain bytes
on it (skipping its own TLS). A TLS socket's fd cannot be handed over: its bytes are records
only our process can decrypt. So torpor keeps the TLS session and gives CRIU one end of a local
``socketpair``; :func:`relay` copies between that plain socket and the channel (``D``/``E``
frames, so either direction can end on its own, as a TCP half-close), until both have ended.
:func:`start_relay` does it in a thread and returns CRIU's end.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import ssl
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._errors import TorporError
from .._identity._tls import TlsIdentity, fingerprint, parse_fingerprint, tls_identity
from .._identity._trust import Peer, TrustStore

MAX_MESSAGE = 1 << 20
MAX_DATA = 256 * 1024
HANDSHAKE_TIMEOUT = 10.0
_HEADER = struct.Struct(">cI")
_MSG, _DATA, _END = b"M", b"D", b"E"
_HIGH = 4 * MAX_DATA  # bytes buffered towards one side before we stop reading the other


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
    """An authenticated channel to :attr:`peer` (the trusted peer at the other end)."""

    def __init__(self, sock: ssl.SSLSocket, peer: Peer) -> None:
        self.sock = sock
        self.peer = peer
        self._buf = bytearray()

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self.sock.close()

    def settimeout(self, seconds: float | None) -> None:
        """Time out a blocking send or receive after ``seconds`` (None: never)."""
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

    def _sendall(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError) as exc:
            raise ChannelError(f"channel to {self._who()} broke: {exc}") from exc

    def _frame(self) -> tuple[bytes, bytes]:
        kind, length = _HEADER.unpack(self._exact(_HEADER.size))
        limit = {_MSG: MAX_MESSAGE, _DATA: MAX_DATA, _END: 0}.get(kind)
        if limit is None or length > limit:
            raise ChannelError(f"{self._who()} sent a bad frame header ({kind!r}, {length} bytes)")
        return kind, self._exact(length)

    def _exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            try:
                chunk = self.sock.recv(max(n - len(self._buf), 65536))
            except TimeoutError as exc:
                raise ChannelError(f"{self._who()} sent nothing in time") from exc
            except (OSError, ssl.SSLError) as exc:
                raise ChannelError(f"channel to {self._who()} broke: {exc}") from exc
            if not chunk:
                raise ChannelError(f"{self._who()} closed the channel")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


class Listener:
    """A TCP socket accepting only trusted peers (see the module docstring)."""

    def __init__(self, sock: socket.socket, home: Path | None) -> None:
        self.sock = sock
        self._home = home
        self._ident = tls_identity(home)
        self._store = TrustStore(home)

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
        """Stop listening."""
        self.sock.close()

    def accept(self, timeout: float | None = None) -> Conn:
        """The next connection, authenticated. A peer that fails (plain TCP, no or an untrusted
        certificate, a removed trust) is closed having received nothing but the TLS handshake,
        and :class:`PeerRefusedError` is raised: the caller logs it and accepts again."""
        self.sock.settimeout(timeout)
        raw, addr = self.sock.accept()
        where = f"{addr[0]}:{addr[1]}"
        try:
            raw.settimeout(HANDSHAKE_TIMEOUT)
            ctx = _context(self._ident, server=True, trusted=self._store.trusted_certs())
            try:
                tls = ctx.wrap_socket(raw, server_side=True)
            except (OSError, ssl.SSLError) as exc:
                raise PeerRefusedError(
                    f"connection from {where} refused in the TLS handshake: {_reason(exc)}",
                    peer=where,
                ) from exc
            raw = tls
            der = tls.getpeercert(binary_form=True)
            fp = fingerprint(der) if der else None
            peer = self._store.find(fp) if fp else None
            if peer is None:
                raise PeerRefusedError(
                    f"connection from {where} refused: certificate {fp} is not trusted",
                    peer=where,
                    hint=f"if that host is trusted: torpor trust add {fp} --name NAME",
                )
            conn = Conn(tls, peer)
            conn.send({"type": "hello", "fingerprint": self._ident.fingerprint})
        except BaseException:
            raw.close()
            raise
        tls.settimeout(None)
        return conn


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


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


# -- the relay ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RelayStats:
    """Bytes relayed: ``sent`` from the plain socket to the peer, ``received`` the other way."""

    sent: int
    received: int


def relay(conn: Conn, plain: socket.socket, *, idle_timeout: float | None = None) -> RelayStats:
    """Copy bytes both ways between ``plain`` (CRIU's local socket) and the channel, until the
    plain side has ended (EOF: an ``E`` frame is sent) and the peer has ended its side (its
    ``E`` frame: ``plain`` is then shut down for writing). The channel stays usable for
    messages after. :class:`ChannelError` if the channel breaks, the peer sends a message
    mid-relay, or nothing moves for ``idle_timeout`` seconds."""
    tls = conn.sock
    tls.setblocking(False)
    plain.setblocking(False)
    sel = selectors.DefaultSelector()
    to_tls = bytearray()
    to_plain = bytearray()
    inbuf, conn._buf = conn._buf, bytearray()
    write_len = 0  # a TLS write that must be retried with exactly this many bytes
    tls_wants_write = False  # a TLS read that needs the socket writable first
    plain_ended = peer_ended = shut = False
    sent = received = 0
    try:
        while True:
            peer_ended, got = _parse(inbuf, to_plain, peer_ended, conn)
            received += got
            if peer_ended and not to_plain and not shut:
                plain.shutdown(socket.SHUT_WR)
                shut = True
            if plain_ended and shut and not to_tls:
                return RelayStats(sent, received)
            read_tls = not peer_ended and len(to_plain) < _HIGH
            tls_ev = (selectors.EVENT_READ if read_tls else 0) | (
                selectors.EVENT_WRITE if to_tls or tls_wants_write else 0
            )
            plain_ev = (selectors.EVENT_READ if not plain_ended and len(to_tls) < _HIGH else 0) | (
                selectors.EVENT_WRITE if to_plain else 0
            )
            ready: dict[object, int] = {}
            if read_tls and tls.pending():  # decrypted bytes select cannot see
                ready[tls] = selectors.EVENT_READ
            else:
                for s, ev in ((tls, tls_ev), (plain, plain_ev)):
                    if ev:
                        sel.register(s, ev)
                try:
                    events = sel.select(idle_timeout)
                finally:
                    for key in list(sel.get_map().values()):
                        sel.unregister(key.fileobj)
                if not events:
                    raise ChannelError(
                        f"relay with {conn._who()}: nothing moved in {idle_timeout} s"
                    )
                ready = {key.fileobj: ev for key, ev in events}
            if ready.get(tls):
                tls_wants_write = False
                if to_tls:
                    n = write_len or min(len(to_tls), MAX_DATA)
                    try:
                        tls.send(to_tls[:n])
                        del to_tls[:n]
                        write_len = 0
                    except ssl.SSLWantWriteError:
                        write_len = n
                    except ssl.SSLWantReadError:
                        write_len = n
                if read_tls:
                    try:
                        chunk = tls.recv(MAX_DATA + _HEADER.size)
                    except ssl.SSLWantReadError:
                        chunk = None
                    except ssl.SSLWantWriteError:
                        chunk, tls_wants_write = None, True
                    if chunk == b"":
                        raise ChannelError(f"{conn._who()} closed the channel mid-relay")
                    if chunk:
                        inbuf += chunk
            ev = ready.get(plain, 0)
            if ev & selectors.EVENT_WRITE and to_plain:
                with contextlib.suppress(BlockingIOError):
                    del to_plain[: plain.send(to_plain[:MAX_DATA])]
            if ev & selectors.EVENT_READ and not plain_ended:
                try:
                    data = plain.recv(MAX_DATA)
                except BlockingIOError:
                    data = None
                if data == b"":
                    plain_ended = True
                    to_tls += _HEADER.pack(_END, 0)
                elif data:
                    sent += len(data)
                    to_tls += _HEADER.pack(_DATA, len(data)) + data
    except (OSError, ssl.SSLError) as exc:
        raise ChannelError(f"relay with {conn._who()} broke: {exc}") from exc
    finally:
        sel.close()
        conn._buf = inbuf
        tls.setblocking(True)


def _parse(inbuf: bytearray, to_plain: bytearray, ended: bool, conn: Conn) -> tuple[bool, int]:
    """Move whole frames from ``inbuf``: ``D`` bodies to ``to_plain``; an ``E`` ends the
    peer's side (what follows is left for :meth:`Conn.recv`). Returns (ended, bytes moved)."""
    moved = 0
    while not ended and len(inbuf) >= _HEADER.size:
        kind, length = _HEADER.unpack_from(inbuf)
        if kind == _END and length == 0:
            del inbuf[: _HEADER.size]
            return True, moved
        if kind != _DATA or length > MAX_DATA:
            raise ChannelError(f"{conn._who()} sent a bad relay frame ({kind!r}, {length} bytes)")
        if len(inbuf) < _HEADER.size + length:
            break
        to_plain += inbuf[_HEADER.size : _HEADER.size + length]
        del inbuf[: _HEADER.size + length]
        moved += length
    return ended, moved


class RelayHandle:
    """A relay running in a thread: :attr:`criu_sock` is the end to give CRIU (as
    ``ps.fd``); :meth:`wait` returns the stats or raises the relay's error."""

    def __init__(self, conn: Conn, *, idle_timeout: float | None) -> None:
        self.criu_sock, self._ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._result: RelayStats | BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(conn, idle_timeout), name="torpor-relay", daemon=True
        )
        self._thread.start()

    def _run(self, conn: Conn, idle_timeout: float | None) -> None:
        try:
            self._result = relay(conn, self._ours, idle_timeout=idle_timeout)
        except BaseException as exc:  # handed to wait(), in the caller's thread
            self._result = exc
        finally:
            self._ours.close()

    def wait(self, timeout: float | None = None) -> RelayStats:
        """The relay's stats once it ended (:class:`ChannelError` as it failed)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise ChannelError(f"relay still running after {timeout} s")
        if isinstance(self._result, BaseException):
            raise self._result
        assert self._result is not None
        return self._result


def start_relay(conn: Conn, *, idle_timeout: float | None = None) -> RelayHandle:
    """Relay between ``conn`` and a new local socket pair in a thread (see :func:`relay`);
    give ``handle.criu_sock`` to CRIU, then close it here."""
    return RelayHandle(conn, idle_timeout=idle_timeout)
