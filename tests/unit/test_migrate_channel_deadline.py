"""The channel's timeout bounds a whole frame, not each read (``torpor._migrate._deadline``,
review finding 4: a peer sending one byte just inside each read's timeout was never timed
out; a 1 s timeout let a message dribbled a byte each 0.8 s arrive after 19 s). On real
sockets: a socket pair, and a real TLS pair, where each dribbled byte is a TLS record of its
own."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor._identity._tls import tls_identity
from torpor._identity._trust import Peer, TrustStore
from torpor._migrate import ChannelError, Conn, connect, listen
from torpor._migrate._channel import _HEADER

PEER = Peer(name="peer", fingerprint="sha256:" + "0" * 64, cert_der=None, added=0, via="test")
BODY = json.dumps({"type": "preflight", "pad": "x" * 20}).encode()
MESSAGE = _HEADER.pack(b"M", len(BODY)) + BODY  # 55 bytes
DATA = _HEADER.pack(b"D", 40) + b"d" * 40
BUDGET = 0.5  # seconds: the receiver's timeout
EVERY = 0.2  # seconds between two bytes: the whole frame takes ~10 s, each read 0.2 s


def dribble(send: socket.socket, frame: bytes, every: float) -> threading.Thread:
    """Send ``frame`` one byte at a time, ``every`` seconds apart (until the socket closes)."""

    def run() -> None:
        with contextlib.suppress(OSError):
            for byte in frame:
                send.sendall(bytes([byte]))
                time.sleep(every)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.fixture
def plain() -> Iterator[tuple[Conn, socket.socket]]:
    """A :class:`Conn` on one end of a socket pair, the raw other end."""
    a, b = socket.socketpair()
    try:
        yield Conn(a, PEER), b  # type: ignore[arg-type]
    finally:
        a.close()
        b.close()


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[tuple[Conn, socket.socket]]:
    """The server's :class:`Conn` of a real TLS pair, and the client's TLS socket."""
    a, b = tmp_path / "a", tmp_path / "b"
    for h in (a, b):
        h.mkdir(mode=0o700)
    TrustStore(a).add("b", cert_der=tls_identity(b).cert_der, via="cert")
    TrustStore(b).add("a", cert_der=tls_identity(a).cert_der, via="cert")
    with listen("127.0.0.1", 0, home=b) as listener:
        got: list[Conn] = []
        t = threading.Thread(target=lambda: got.append(listener.accept(timeout=20)))
        t.start()
        client = connect("127.0.0.1", listener.address[1], home=a)
        t.join(30)
    server = got[0]
    try:
        yield server, client.sock
    finally:
        client.close()
        server.close()


def timed_out(conn: Conn, read: str) -> tuple[float, str]:
    """Seconds until ``read`` (a message or a data frame) failed, and its error."""
    conn.settimeout(BUDGET)
    began = time.monotonic()
    with pytest.raises(ChannelError) as err:
        if read == "message":
            conn.recv()
        else:
            conn._data_into(bytearray(64))
    return time.monotonic() - began, err.value.msg


@pytest.mark.parametrize("read", ["message", "data"])
def test_a_dribbled_frame_times_out_at_its_deadline(
    plain: tuple[Conn, socket.socket], read: str
) -> None:
    conn, peer = plain
    dribble(peer, MESSAGE if read == "message" else DATA, EVERY)
    took, msg = timed_out(conn, read)
    assert msg == f"peer 'peer' sent no whole frame within {BUDGET:g} s"
    assert BUDGET - 0.05 <= took < BUDGET + 0.5, took  # not ~10 s, the dribble's end
    assert conn.sock.gettimeout() == BUDGET  # as the reader set it, for what follows


def test_a_dribbled_message_over_tls_times_out_at_its_deadline(
    tls: tuple[Conn, socket.socket],
) -> None:
    conn, peer = tls
    dribble(peer, MESSAGE, EVERY)
    took, msg = timed_out(conn, "message")
    assert msg == f"peer 'a' sent no whole frame within {BUDGET:g} s"
    assert BUDGET - 0.05 <= took < BUDGET + 0.5, took
    assert conn.sock.gettimeout() == BUDGET


def test_a_frame_in_pieces_within_the_timeout_arrives(plain: tuple[Conn, socket.socket]) -> None:
    conn, peer = plain
    conn.settimeout(2.0)
    dribble(peer, MESSAGE, 0.02)  # 55 reads in ~1.1 s: the timeout is cut, the deadline kept
    assert conn.recv() == json.loads(BODY)
    assert conn.sock.gettimeout() == 2.0
