"""The migration channel: mutual TLS between two homes over loopback, real sockets, real TLS.

Trusted peers exchange messages; every unauthenticated client (plain TCP, a TLS client without a
certificate, an untrusted certificate, a trust removed, a wrong pin) is refused in the handshake
and receives no byte of application data; the relay carries CRIU's plain bytes both ways with
half-closes.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from torpor._identity._tls import new_identity_pem, tls_identity
from torpor._identity._trust import TrustStore
from torpor._migrate import (
    ChannelError,
    Conn,
    Listener,
    PeerRefusedError,
    _channel,
    connect,
    listen,
)
from torpor._migrate._relay import relay, start_relay


def _home(root: Path, name: str) -> Path:
    home = root / name
    home.mkdir(mode=0o700)
    return home


@pytest.fixture
def homes(tmp_path: Path) -> tuple[Path, Path]:
    """Two homes, A (client) and B (server), trusting each other by certificate."""
    a, b = _home(tmp_path, "a"), _home(tmp_path, "b")
    TrustStore(a).add("b", cert_der=tls_identity(b).cert_der, via="cert")
    TrustStore(b).add("a", cert_der=tls_identity(a).cert_der, via="cert")
    return a, b


class Server:
    """A listener of ``home`` accepting one connection in a thread; ``result`` is the
    accepted :class:`Conn` (after ``handler`` ran on it) or the exception accept raised."""

    def __init__(self, home: Path, handler: Callable[[Conn], Any] | None = None) -> None:
        self.listener: Listener = listen("127.0.0.1", 0, home=home)
        self.port = self.listener.address[1]
        self.result: Any = None
        self.handled: Any = None
        self._handler = handler
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            conn = self.listener.accept(timeout=20)
        except BaseException as exc:
            self.result = exc
            return
        self.result = conn
        if self._handler is not None:
            try:
                self.handled = self._handler(conn)
            except BaseException as exc:
                self.handled = exc
        conn.close()

    def join(self) -> Any:
        self._thread.join(30)
        assert not self._thread.is_alive()
        self.listener.close()
        return self.result


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    made: list[Server] = []
    yield made
    for s in made:
        s.listener.close()


def _echo(conn: Conn) -> dict[str, Any]:
    msg = conn.recv()
    conn.send({"echo": msg})
    return msg


def test_trusted_peers_exchange_messages(homes: tuple[Path, Path]) -> None:
    a, b = homes
    srv = Server(b, _echo)
    with connect("127.0.0.1", srv.port, tls_identity(b).fingerprint, home=a) as conn:
        assert conn.peer.name == "b"
        assert conn.sock.version() == "TLSv1.3"
        conn.send({"type": "ping", "n": 1})
        assert conn.recv() == {"echo": {"type": "ping", "n": 1}}
    accepted = srv.join()
    assert isinstance(accepted, Conn)
    assert accepted.peer.name == "a"
    assert accepted.peer.fingerprint == tls_identity(a).fingerprint
    assert srv.handled == {"type": "ping", "n": 1}


def test_connect_without_pin_needs_a_trusted_server(homes: tuple[Path, Path]) -> None:
    a, b = homes
    srv = Server(b, _echo)
    with connect("127.0.0.1", srv.port, home=a) as conn:
        conn.send({"x": 1})
        assert conn.recv() == {"echo": {"x": 1}}
    assert isinstance(srv.join(), Conn)


def _raw_reply(port: int, hello: bytes) -> bytes:
    """What a plain TCP client that sends ``hello`` gets back, until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(hello)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:  # closed with our bytes unread: a reset, after nothing
            pass
    return out


def test_plain_tcp_client_gets_nothing(homes: tuple[Path, Path]) -> None:
    _, b = homes
    srv = Server(b)
    reply = _raw_reply(srv.port, b'{"type": "run", "cmd": "id"}\n' * 4)
    refused = srv.join()
    assert isinstance(refused, PeerRefusedError)
    assert str(refused).startswith("connection from 127.0.0.1:")
    assert "refused in the TLS handshake" in str(refused)
    # Not a TLS server hello and no frame of ours: at most a TLS alert record (type 21).
    assert reply == b"" or reply[0] == 21


def _tls_client(cert_pem: bytes | None, tmp: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert_pem is not None:
        path = tmp / "other.pem"
        path.write_bytes(cert_pem)
        ctx.load_cert_chain(path)
    return ctx


# How a refused TLS client sees its end: the server's alert, or the close that follows it.
_REFUSED_HOW = {"SSLError", "SSLEOFError", "ConnectionResetError", "BrokenPipeError"}


def _tls_attempt(port: int, ctx: ssl.SSLContext) -> tuple[bytes, str]:
    """Handshake, send a command, read what comes: (application bytes, how it ended)."""
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw) as s:
                s.sendall(b"M\x00\x00\x00\x0f" + b'{"type":"run"}')
                while chunk := s.recv(65536):
                    got += chunk
                return got, "closed"
        except (ssl.SSLError, OSError) as exc:
            return got, type(exc).__name__


def test_tls_client_without_certificate_gets_nothing(
    homes: tuple[Path, Path], tmp_path: Path
) -> None:
    _, b = homes
    srv = Server(b)
    got, how = _tls_attempt(srv.port, _tls_client(None, tmp_path))
    refused = srv.join()
    assert isinstance(refused, PeerRefusedError)
    assert "refused in the TLS handshake" in str(refused)
    assert got == b""
    assert how in _REFUSED_HOW


def test_untrusted_certificate_gets_nothing(homes: tuple[Path, Path], tmp_path: Path) -> None:
    _, b = homes
    srv = Server(b)
    got, how = _tls_attempt(srv.port, _tls_client(new_identity_pem("intruder"), tmp_path))
    refused = srv.join()
    assert isinstance(refused, PeerRefusedError)
    assert "refused in the TLS handshake" in str(refused)
    assert got == b""
    assert how in _REFUSED_HOW


def test_untrusted_home_connecting_gets_nothing(homes: tuple[Path, Path], tmp_path: Path) -> None:
    _, b = homes
    c = _home(tmp_path, "c")  # C trusts B, B does not trust C
    TrustStore(c).add("b", cert_der=tls_identity(b).cert_der)
    srv = Server(b, _echo)
    with pytest.raises(PeerRefusedError) as info:
        connect("127.0.0.1", srv.port, tls_identity(b).fingerprint, home=c)
    assert str(info.value).startswith("127.0.0.1:")
    assert "refused this host's certificate" in str(info.value)
    assert isinstance(srv.join(), PeerRefusedError)
    assert srv.handled is None  # the handler never ran


def test_removed_trust_is_refused(homes: tuple[Path, Path]) -> None:
    a, b = homes
    results: list[Any] = []
    with listen("127.0.0.1", 0, home=b) as listener:  # one listener: trust changes while it runs

        def accept_twice() -> None:
            for _ in range(2):
                try:
                    results.append(listener.accept(timeout=20))
                except PeerRefusedError as exc:
                    results.append(exc)

        t = threading.Thread(target=accept_twice, daemon=True)
        t.start()
        port = listener.address[1]
        connect("127.0.0.1", port, home=a).close()
        TrustStore(b).remove("a")
        with pytest.raises(PeerRefusedError):
            connect("127.0.0.1", port, home=a)
        t.join(30)
    assert isinstance(results[0], Conn)
    assert isinstance(results[1], PeerRefusedError)
    # In the handshake: each connection's context is built from the store as it is then.
    assert "refused in the TLS handshake" in str(results[1])


def test_fingerprint_check_catches_what_openssl_lets_through(
    homes: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Defence in depth: even if the handshake admitted a certificate (here: B's store lists A
    # when the handshake's context is built and forgets it just after), the exact fingerprint
    # must be trusted when it is looked up.
    a, b = homes
    srv = Server(b, _echo)
    monkeypatch.setattr(srv.listener._store, "find", lambda fp: None)
    with pytest.raises(PeerRefusedError):
        connect("127.0.0.1", srv.port, home=a)
    refused = srv.join()
    assert isinstance(refused, PeerRefusedError)
    assert refused.msg == (
        f"connection from {refused.peer} refused: certificate {tls_identity(a).fingerprint}"
        " is not trusted"
    )
    assert srv.handled is None


def test_wrong_pin_refused_before_a_byte_is_written(
    homes: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = homes
    c = _home(tmp_path, "c")
    TrustStore(a).add("c", cert_der=tls_identity(c).cert_der)
    srv = Server(b)
    with pytest.raises(PeerRefusedError) as info:
        connect("127.0.0.1", srv.port, tls_identity(c).fingerprint, home=a)
    fb, fc = tls_identity(b).fingerprint, tls_identity(c).fingerprint
    assert info.value.msg == (
        f"127.0.0.1:{srv.port} showed certificate {fb}, not the expected {fc}; refused"
    )
    srv.join()


def test_untrusted_server_refused(homes: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = homes
    c = _home(tmp_path, "c")
    TrustStore(c).add("a", cert_der=tls_identity(a).cert_der)
    srv = Server(c)
    with pytest.raises(PeerRefusedError) as info:
        connect("127.0.0.1", srv.port, home=a)
    assert info.value.msg == (
        f"127.0.0.1:{srv.port} showed certificate {tls_identity(c).fingerprint},"
        " which is not trusted; refused"
    )
    srv.join()


def test_fingerprint_only_trust_learns_the_certificate(tmp_path: Path) -> None:
    a, b = _home(tmp_path, "a"), _home(tmp_path, "b")
    TrustStore(a).add("b", fingerprint_text=tls_identity(b).fingerprint)
    TrustStore(b).add("a", cert_der=tls_identity(a).cert_der)
    assert TrustStore(a).peers()[0].cert_der is None
    srv = Server(b, _echo)
    connect("127.0.0.1", srv.port, home=a).close()
    srv.join()
    assert TrustStore(a).peers()[0].cert_der == tls_identity(b).cert_der


def test_oversized_and_bad_frames_refused(homes: tuple[Path, Path]) -> None:
    a, b = homes

    def bad_header(conn: Conn) -> None:
        conn.sock.sendall(_channel._HEADER.pack(b"M", _channel.MAX_MESSAGE + 1))

    srv = Server(b, bad_header)
    with connect("127.0.0.1", srv.port, home=a) as conn, pytest.raises(ChannelError) as info:
        conn.recv()
    assert info.value.msg == (
        f"peer 'b' sent a bad frame header (b'M', {_channel.MAX_MESSAGE + 1} bytes)"
    )
    srv.join()
    with pytest.raises(ChannelError):
        Conn.send(conn, {"x": "y" * _channel.MAX_MESSAGE})


def _criu_side(sock: socket.socket, payload: bytes) -> bytes:
    """Play CRIU on a plain socket: send ``payload``, half-close, read all it is sent."""
    got = bytearray()

    def send() -> None:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=send)
    t.start()
    while chunk := sock.recv(1 << 16):
        got += chunk
    t.join()
    return bytes(got)


def test_relay_carries_plain_bytes_both_ways(homes: tuple[Path, Path]) -> None:
    a, b = homes
    up = bytes(range(256)) * 9000  # 2.3 MB: many frames, backpressure
    down = b"pages" * 300_000

    def serve(conn: Conn) -> Any:
        handle = start_relay(conn, idle_timeout=5)
        got = _criu_side(handle.criu_sock, down)
        stats = handle.wait(30)
        conn.send({"after": "relay"})  # the channel carries messages again
        return got, stats

    srv = Server(b, serve)
    with connect("127.0.0.1", srv.port, home=a) as conn:
        ours, criu = socket.socketpair()
        result: dict[str, Any] = {}
        t = threading.Thread(target=lambda: result.update(got=_criu_side(criu, up)))
        t.start()
        stats = relay(conn, ours, idle_timeout=5)
        t.join(30)
        assert conn.recv() == {"after": "relay"}
    srv.join()
    assert result["got"] == down
    assert (stats.sent, stats.received) == (len(up), len(down))
    got, server_stats = srv.handled
    assert got == up
    assert (server_stats.sent, server_stats.received) == (len(down), len(up))


def test_relay_reports_a_broken_link(homes: tuple[Path, Path]) -> None:
    a, b = homes

    def cut(conn: Conn) -> None:
        conn.sock.sendall(_channel._HEADER.pack(b"D", 3) + b"abc")
        conn.sock.close()

    srv = Server(b, cut)
    with connect("127.0.0.1", srv.port, home=a) as conn:
        ours, criu = socket.socketpair()
        criu.shutdown(socket.SHUT_WR)
        with pytest.raises(ChannelError) as info:
            relay(conn, ours, idle_timeout=5)
        # An unclean close (no TLS close_notify) or a clean one: either way a broken relay.
        assert info.value.msg in (
            "peer 'b' closed the channel mid-relay",
            "relay with peer 'b' broke: EOF occurred in violation of protocol (_ssl.c:2427)",
        )
    srv.join()


def test_relay_refuses_a_message_mid_relay(homes: tuple[Path, Path]) -> None:
    a, b = homes
    srv = Server(b, lambda conn: conn.send({"type": "run"}))
    with connect("127.0.0.1", srv.port, home=a) as conn:
        ours, criu = socket.socketpair()
        with pytest.raises(ChannelError) as info:
            relay(conn, ours, idle_timeout=5)
        assert info.value.msg == "peer 'b' sent a bad relay frame (b'M', 14 bytes)"
        criu.close()
    srv.join()
