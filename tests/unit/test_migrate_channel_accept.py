"""The migration listener's handshakes run beside each other (``_channel.Listener``), real TLS
over loopback: idle or dribbling clients do not keep a trusted peer out, the handshakes are
bounded in number (the oldest given up), per source address (one address flooding does not
keep a peer at another out) and in time (one deadline each), a trust removed while a
connection waits is still refused before any byte, and ``close()`` leaves no thread and no
socket behind. The flooding clients come from other loopback addresses (127.0.0.0/8 is all
local) than the trusted one (127.0.0.1)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from torpor._identity._tls import tls_identity
from torpor._identity._trust import TrustStore
from torpor._migrate import Conn, PeerRefusedError, _channel, connect, listen


def _home(root: Path, name: str) -> Path:
    home = root / name
    home.mkdir(mode=0o700)
    return home


@pytest.fixture
def homes(tmp_path: Path) -> tuple[Path, Path]:
    a, b = _home(tmp_path, "a"), _home(tmp_path, "b")
    TrustStore(a).add("b", cert_der=tls_identity(b).cert_der, via="cert")
    TrustStore(b).add("a", cert_der=tls_identity(a).cert_der, via="cert")
    return a, b


def _ours() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("torpor-channel-")]


class Acceptor:
    """``accept`` in a loop (as ``_serve.serve`` does): refusals noted, the first
    :class:`Conn` kept (and when it came)."""

    def __init__(self, listener: _channel.Listener) -> None:
        self.listener = listener
        self.refused: list[PeerRefusedError] = []
        self.conn: Conn | None = None
        self.at = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn = self.listener.accept(timeout=30)
            except PeerRefusedError as exc:
                self.refused.append(exc)
                continue
            except OSError:
                return
            self.at = time.monotonic()
            self.conn = conn
            return


@pytest.fixture
def idle() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()


def _silent(port: int, source: str) -> socket.socket:
    """A connection to the listener from ``source`` (a loopback address) that sends nothing."""
    return socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))


def _dribble(
    port: int, stop: threading.Event, every: float, source: str = "127.0.0.1"
) -> threading.Thread:
    """A client that sends a TLS record header, then one byte every ``every`` seconds."""

    def run() -> None:
        with socket.create_connection(
            ("127.0.0.1", port), timeout=30, source_address=(source, 0)
        ) as s:
            data = b"\x16\x03\x01\x02\x00" + b"\x01" * 512
            for i in range(len(data)):
                if stop.is_set():
                    return
                try:
                    s.sendall(data[i : i + 1])
                except OSError:
                    return
                stop.wait(every)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_idle_and_dribbling_clients_do_not_delay_a_trusted_one(
    homes: tuple[Path, Path], idle: list[socket.socket]
) -> None:
    a, b = homes
    stop = threading.Event()
    with listen("127.0.0.1", 0, home=b) as listener:
        port = listener.address[1]
        acceptor = Acceptor(listener)
        for i in range(20):
            idle.append(_silent(port, f"127.0.1.{i + 1}"))
        dribbler = _dribble(port, stop, 0.2, "127.0.2.1")
        time.sleep(0.3)  # all of them in their handshakes
        started = time.monotonic()
        with connect("127.0.0.1", port, tls_identity(b).fingerprint, home=a) as conn:
            took = time.monotonic() - started
            assert conn.peer.name == "b"
            acceptor.thread.join(10)
            assert acceptor.conn is not None and acceptor.conn.peer.name == "a"
            acceptor.conn.send({"type": "x"})
            assert conn.recv() == {"type": "x"}
            acceptor.conn.close()
        stop.set()
        dribbler.join(10)
    print(f"\ntrusted connect among 20 idle + 1 dribbling clients: {took * 1000:.0f} ms")
    assert took < 1.0


def test_a_flood_beyond_the_bound_grows_no_thread_and_gives_up_the_oldest(
    homes: tuple[Path, Path], idle: list[socket.socket]
) -> None:
    a, b = homes
    base = len(_ours())
    with listen("127.0.0.1", 0, home=b) as listener:
        port = listener.address[1]
        acceptor = Acceptor(listener)
        most = pending = 0

        def sample() -> None:
            nonlocal most, pending
            most = max(most, len(_ours()) - base)
            with listener._cond:
                pending = max(pending, len(listener._pending))

        for i in range(80):
            idle.append(_silent(port, f"127.0.1.{i + 1}"))
            sample()
        time.sleep(0.5)
        sample()
        assert pending == _channel.MAX_HANDSHAKES  # handshakes at once: never more
        # Threads: those handshakes, the accepting one, and a few given up that have left
        # the bound and are closing their sockets (without the bound: one per connection).
        assert most <= 2 * _channel.MAX_HANDSHAKES
        # The oldest were given up: their clients see the end, having received nothing.
        idle[0].settimeout(5)
        assert idle[0].recv(100) == b""
        assert any("dropped in its TLS handshake" in str(e) for e in acceptor.refused)
        # A trusted peer still gets in.
        with connect("127.0.0.1", port, home=a) as conn:
            assert conn.peer.name == "b"
        acceptor.thread.join(10)
        assert acceptor.conn is not None
        acceptor.conn.close()


_FLOOD = """
import collections, socket, sys
port, source = int(sys.argv[1]), sys.argv[2]
socks = collections.deque()
while True:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    except OSError:
        continue
    socks.append(s)
    if len(socks) > 500:
        socks.popleft().close()
"""


@pytest.fixture
def flood() -> Iterator[Callable[[int, str], None]]:
    """Start a process at a source address opening silent connections as fast as it can
    (each kept open a while: a hostile client never lets go of its own); killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(port: int, source: str) -> None:
        procs.append(subprocess.Popen([sys.executable, "-c", _FLOOD, str(port), source]))

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


class FarProxy:
    """A TCP relay to the listener, from 127.0.0.1, that holds every chunk ``delay`` seconds
    each way: a trusted peer on a far network, whose handshake spans round trips during which
    a near flood could give it up."""

    def __init__(self, port: int, delay: float) -> None:
        self.sock = socket.create_server(("127.0.0.3", 0))
        self.address = self.sock.getsockname()[:2]
        self._port, self._delay = port, delay
        self._socks: list[socket.socket] = [self.sock]
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.sock.accept()
                server = socket.create_connection(("127.0.0.1", self._port), timeout=30)
                self._socks += [client, server]
                for src, dst in ((client, server), (server, client)):
                    threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                time.sleep(self._delay)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for s in self._socks:
            s.close()


def test_one_source_flooding_does_not_keep_a_peer_at_another_out(
    homes: tuple[Path, Path], idle: list[socket.socket], flood: Callable[[int, str], None]
) -> None:
    b = homes[1]
    with listen("127.0.0.1", 0, home=b) as listener:
        port = listener.address[1]
        acceptor = Acceptor(listener)
        for _ in range(_channel.MAX_HANDSHAKES):
            idle.append(_silent(port, "127.0.0.2"))
        time.sleep(0.3)  # those within its cap in their handshakes, the rest closed
        with listener._cond:
            pending = len(listener._pending)
        assert pending == _channel.MAX_PER_SOURCE
        # Beyond its cap: closed at once, before any TLS (the oldest, within it, still wait).
        idle[-1].settimeout(5)
        assert idle[-1].recv(100) == b""
        idle[0].settimeout(0.2)
        with pytest.raises(TimeoutError):
            idle[0].recv(100)
        # The same address goes on opening connections (without the cap, each would give up
        # the oldest pending handshake: soon the trusted peer's). The trusted peer, from
        # 127.0.0.1, gets in at its first try, and its command through both ways.
        for _ in range(4):
            flood(port, "127.0.0.2")
        time.sleep(0.5)
        refused = _far_peer_gets_in(listener, acceptor, homes, latency=0.25, times=2, commands=True)
    # Reported on one line for the flood (again only once a handshake of it has ended: after
    # HANDSHAKE_TIMEOUT, which a slow run may reach); none of the trusted peer's given up.
    line = (
        f"connections from 127.0.0.2 closed before TLS: {_channel.MAX_PER_SOURCE} of its "
        "handshakes are pending (more are closed unreported until one ends)"
    )
    assert refused != []
    assert {str(e) for e in refused} == {line}


def _far_peer_gets_in(
    listener: _channel.Listener,
    acceptor: Acceptor,
    homes: tuple[Path, Path],
    *,
    latency: float,
    times: int,
    commands: bool = False,
) -> list[PeerRefusedError]:
    """The trusted peer ``a``, far (a :class:`FarProxy` of ``latency`` s), connects to
    ``listener`` (``b``'s) ``times`` times, each accepted (with ``commands``: a command each
    way too); the refusals the acceptors saw meanwhile."""
    a, b = homes
    refused: list[PeerRefusedError] = []
    far = FarProxy(listener.address[1], latency)
    for _ in range(times):
        host, at = far.address
        with connect(host, at, tls_identity(b).fingerprint, home=a) as conn:
            assert conn.peer.name == "b"
            acceptor.thread.join(10)
            assert acceptor.conn is not None and acceptor.conn.peer.name == "a"
            if commands:
                conn.send({"type": "preflight"})
                assert acceptor.conn.recv() == {"type": "preflight"}
                acceptor.conn.send({"type": "ready"})
                assert conn.recv() == {"type": "ready"}
            acceptor.conn.close()
        refused += acceptor.refused
        acceptor = Acceptor(listener)
    far.close()
    return refused


def test_sources_flooding_together_give_up_their_own_before_a_peers_handshake(
    homes: tuple[Path, Path], flood: Callable[[int, str], None]
) -> None:
    """Eight addresses, none at its cap, fill every slot and keep opening connections: each
    then gives up the oldest handshake of a source holding the most, never the one of a far
    trusted peer (with the oldest given up whoever holds it, the floods' fresh connections
    soon make the peer's the oldest)."""
    b = homes[1]
    flooders = [f"127.0.0.{i}" for i in range(4, 4 + _channel.MAX_HANDSHAKES // 2)]
    with listen("127.0.0.1", 0, home=b) as listener:
        port = listener.address[1]
        acceptor = Acceptor(listener)
        for source in flooders:
            flood(port, source)
        deadline = time.monotonic() + 10
        full = False
        while not full and time.monotonic() < deadline:  # every slot taken by the floods
            time.sleep(0.05)
            with listener._cond:
                full = len(listener._pending) == _channel.MAX_HANDSHAKES
        assert full
        _far_peer_gets_in(listener, acceptor, homes, latency=0.4, times=3)


@pytest.mark.parametrize(
    ("host", "source"),
    [
        ("127.0.0.2", "127.0.0.2"),
        ("::ffff:10.0.0.7", "10.0.0.7"),
        ("fd00::1:2:3:4", "fd00::/64"),
        ("fe80::1%eth0", "fe80::/64"),
    ],
)
def test_a_source_is_an_ipv4_address_or_an_ipv6_slash_64(host: str, source: str) -> None:
    assert _channel._source(host) == source


def test_a_handshake_has_one_deadline_however_its_client_dribbles(
    homes: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, b = homes
    monkeypatch.setattr(_channel, "HANDSHAKE_TIMEOUT", 1.0)
    stop = threading.Event()
    with listen("127.0.0.1", 0, home=b) as listener:
        acceptor = Acceptor(listener)
        started = time.monotonic()
        dribbler = _dribble(listener.address[1], stop, 0.2)  # a byte well within each 1 s
        deadline = time.monotonic() + 8
        while not acceptor.refused and time.monotonic() < deadline:
            time.sleep(0.05)
        took = time.monotonic() - started
        stop.set()
        dribbler.join(10)
    assert acceptor.refused, "the dribbling client was never refused"
    assert "refused in the TLS handshake: timed out" in str(acceptor.refused[0])
    assert took < 2.5


def test_a_trust_removed_while_waiting_is_refused_before_any_byte(
    homes: tuple[Path, Path],
) -> None:
    a, b = homes
    got: list[Any] = []
    with listen("127.0.0.1", 0, home=b) as listener:
        port = listener.address[1]

        def client() -> None:
            try:
                got.append(connect("127.0.0.1", port, home=a))
            except PeerRefusedError as exc:
                got.append(exc)

        t = threading.Thread(target=client, daemon=True)
        t.start()
        deadline = time.monotonic() + 10
        while not listener._ready and time.monotonic() < deadline:
            time.sleep(0.02)  # the handshake passed; the connection waits for accept
        assert listener._ready
        TrustStore(b).remove("a")
        with pytest.raises(PeerRefusedError, match="no longer trusted"):
            listener.accept(timeout=5)
        t.join(15)
    assert isinstance(got[0], PeerRefusedError)  # no hello came


def test_close_leaves_no_thread_and_closes_pending_sockets(
    homes: tuple[Path, Path], idle: list[socket.socket]
) -> None:
    a, b = homes
    base = {t.ident for t in _ours()}
    listener = listen("127.0.0.1", 0, home=b)
    port = listener.address[1]
    for i in range(5):
        idle.append(_silent(port, f"127.0.1.{i + 1}"))
    waiting: list[Any] = []

    def client() -> None:
        try:
            waiting.append(connect("127.0.0.1", port, home=a))
        except PeerRefusedError as exc:  # closed unaccepted: no hello
            waiting.append(exc)

    t = threading.Thread(target=client, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not listener._ready and time.monotonic() < deadline:
        time.sleep(0.02)
    assert listener._ready  # an authenticated connection nobody accepted yet
    assert len(_ours()) > len(base)
    started = time.monotonic()
    listener.close()
    assert time.monotonic() - started < 2
    assert [t for t in _ours() if t.ident not in base] == []
    for s in idle:
        s.settimeout(5)
        assert s.recv(100) == b""
    with pytest.raises(OSError):
        listener.accept(timeout=1)
    listener.close()  # again: nothing
    t.join(15)
    assert isinstance(waiting[0], PeerRefusedError)


def test_a_listener_not_accepting_is_busy_not_a_refusal(homes: tuple[Path, Path]) -> None:
    a, b = homes
    listener = listen("127.0.0.1", 0, home=b)  # handshakes pass; nobody accepts
    try:
        with pytest.raises(_channel.ChannelError) as info:
            connect("127.0.0.1", listener.address[1], home=a, timeout=1.0)
    finally:
        listener.close()
    assert not isinstance(info.value, PeerRefusedError)
    assert "did not take the connection in time" in str(info.value)
