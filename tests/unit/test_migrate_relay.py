"""The lazy migration's relay on CRIU's own sockets (``_relay``): real TLS over loopback.

On the source the relay writes the target daemon's requests to CRIU's page server only whole
and never ends CRIU's socket; on the target it runs on the daemon's connection, handed over by
the keeper with ``SCM_RIGHTS``, shuts it down only after the daemon's close, and otherwise
tells the keeper why while the connection stays open.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from torpor._identity._tls import tls_identity
from torpor._identity._trust import TrustStore
from torpor._migrate import ChannelError, Conn, _channel, connect, listen
from torpor._migrate._closehold import DAEMON_FAILED, DAEMON_OK
from torpor._migrate._lazy_dump import FAIL_COMMAND, Guard
from torpor._migrate._relay import (
    Gate,
    RelayHandle,
    RelayStats,
    receive_socket,
    relay,
    send_socket,
    start_relay,
    verdict,
)

PSI = struct.Struct("<I4xQQQ")
GET = PSI.pack(7, 1, 0x7F0000, 42)
GET2 = PSI.pack(7, 16, 0x7F1000, 42)
CLOSE = PSI.pack(0x1023, 0, 0, 0)


@pytest.fixture
def homes(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(mode=0o700)
    b.mkdir(mode=0o700)
    TrustStore(a).add("b", cert_der=tls_identity(b).cert_der, via="cert")
    TrustStore(b).add("a", cert_der=tls_identity(a).cert_der, via="cert")
    return a, b


class Peer:
    """B's end of a channel, ``handler`` run on it in a thread (its result or exception in
    :attr:`handled`)."""

    def __init__(self, home: Path, handler: Callable[[Conn], Any]) -> None:
        self.listener = listen("127.0.0.1", 0, home=home)
        self.port = self.listener.address[1]
        self.handled: Any = None
        self._handler = handler
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = self.listener.accept(timeout=20)
        try:
            self.handled = self._handler(conn)
        except BaseException as exc:
            self.handled = exc
        finally:
            conn.close()

    def join(self) -> Any:
        self._thread.join(30)
        assert not self._thread.is_alive()
        self.listener.close()
        return self.handled


def readable(sock: socket.socket, timeout: float = 0.3) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


def recv_exact(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, f"EOF after {len(got)} of {n} bytes"
        got += chunk
    return got


def data(payload: bytes) -> bytes:
    return _channel._HEADER.pack(b"D", len(payload)) + payload


END = _channel._HEADER.pack(b"E", 0)


def test_source_writes_requests_to_criu_only_whole_and_never_ends_its_socket(
    homes: tuple[Path, Path],
) -> None:
    a, b = homes
    step = threading.Event()
    go = threading.Event()

    def target(conn: Conn) -> None:
        conn.sock.sendall(data(GET[:20]))  # a request split across two frames
        step.set()
        go.wait(10)
        conn.sock.sendall(data(GET[20:] + GET2) + END)
        while conn.sock.recv(1 << 16):  # the source's pages, then its E, until it closes
            pass

    peer = Peer(b, target)
    criu, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    guard = Guard(ours)
    with connect("127.0.0.1", peer.port, home=a) as conn:
        result: dict[str, Any] = {}
        t = threading.Thread(
            target=lambda: result.update(stats=relay(conn, guard.criu, idle_timeout=5, gate=guard))
        )
        t.start()
        assert step.wait(10)
        assert not readable(criu)  # 20 bytes of a request: nothing reaches CRIU yet
        go.set()
        assert recv_exact(criu, 64) == GET + GET2
        t.join(10)
        assert not t.is_alive()
        assert result["stats"].received == 64
    peer.join()
    # The relay ended, without the daemon's close: CRIU sees no EOF (it would kill the
    # original), and the failure command when torpor decides.
    assert not guard.closed_by_target
    assert not readable(criu)
    guard.fail_criu()
    assert recv_exact(criu, 32) == FAIL_COMMAND
    guard.close()
    assert criu.recv(10) == b""


def test_fail_criu_completes_a_request_written_in_part() -> None:
    criu, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    guard = Guard(ours)
    guard.take(GET + GET2)
    ours.sendall(guard.out[:44])  # as a relay whose send took 44 bytes, then broke
    guard.written = 44
    del guard.out[:44]
    guard.fail_criu()
    guard.close()
    got = b""
    while chunk := criu.recv(1 << 16):
        got += chunk
    assert got == GET + GET2[:12] + GET2[12:] + FAIL_COMMAND  # whole, then the command


def test_gate_notes_a_close_split_across_reads() -> None:
    gate = Gate(requests_to_plain=False)
    stream = GET + CLOSE
    for i in range(0, len(stream), 7):
        assert not gate.closed
        gate.take(memoryview(stream)[i : i + 7])
    assert gate.closed
    assert gate.out == b""  # the target passes requests on as they come: nothing kept


class Keeper:
    """The keeper's part: accepts the daemon's connection, hands it to the server's relay
    over ``local`` and waits for the verdict, keeping its own descriptor open."""

    def __init__(self, local: socket.socket) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.local = local
        self.conn: socket.socket | None = None
        self.why: Any = "no verdict"
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.conn, _ = self.listener.accept()
        send_socket(self.local, self.conn)
        self.why = verdict(self.local)

    def join(self) -> Any:
        self._thread.join(20)
        assert not self._thread.is_alive()
        return self.why


def fake_criu(sock: socket.socket, answer: bytes) -> None:
    """CRIU's page server on the source: reads two requests, answers, then ends."""
    recv_exact(sock, 64)
    sock.sendall(answer)
    sock.close()


def criu_answering_the_close(sock: socket.socket, pages: bytes, got_close: threading.Event) -> None:
    """CRIU's page server on the source: answers a request with ``pages``, then the close
    with its status, then ends."""
    assert recv_exact(sock, 32) == GET
    sock.sendall(pages)
    assert recv_exact(sock, 32) == CLOSE
    got_close.set()
    sock.sendall(b"\0\0\0\0")
    sock.close()


def criu_source(
    pages: bytes, got_close: threading.Event, *, idle: float = 5.0
) -> Callable[[Conn], Any]:
    """The source's side: its relay to CRIU's page server (:func:`criu_answering_the_close`)."""

    def source(conn: Conn) -> Any:
        ours, criu = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        threading.Thread(
            target=criu_answering_the_close, args=(criu, pages, got_close), daemon=True
        ).start()
        return relay(conn, ours, idle_timeout=idle)

    return source


@contextlib.contextmanager
def on_target(port: int, home: Path) -> Iterator[tuple[Conn, RelayHandle, Keeper, socket.socket]]:
    """The target's side: its channel to the source, the relay on the daemon's connection
    (handed over by the keeper), the keeper, and the daemon's end of that connection."""
    with connect("127.0.0.1", port, home=home) as conn:
        handle = start_relay(conn, idle_timeout=5, daemon_socket=True)
        keeper = Keeper(handle.criu_sock)
        daemon = socket.create_connection(keeper.listener.getsockname())
        daemon.settimeout(10)
        yield conn, handle, keeper, daemon


def test_target_relays_on_the_daemons_socket_and_shuts_it_after_the_close(
    homes: tuple[Path, Path],
) -> None:
    """The daemon's close is answered on the target and passed to the source (whose CRIU
    then kills the original) only once the keeper says the daemon exited 0."""
    a, b = homes
    pages = b"pages" * 5000
    got_close = threading.Event()

    peer = Peer(a, criu_source(pages, got_close))
    with on_target(peer.port, b) as (_conn, handle, keeper, daemon):
        daemon.sendall(GET)
        assert recv_exact(daemon, len(pages)) == pages
        daemon.sendall(CLOSE)
        assert recv_exact(daemon, 4) == b"\0\0\0\0"  # answered here
        daemon.shutdown(socket.SHUT_WR)  # the daemon got its status and closes
        time.sleep(0.3)
        assert not got_close.is_set()  # held back until the keeper's word
        handle.criu_sock.send(DAEMON_OK)  # the keeper: the daemon exited 0
        stats = handle.wait(10)
        assert got_close.is_set()
        assert (stats.sent, stats.received) == (64, len(pages) + 4)
        assert keeper.join() is None  # K: ended well
        assert daemon.recv(10) == b""  # nothing more for the daemon: the source's status
    assert peer.join().received == 64


def test_a_daemon_failing_after_its_close_never_lets_the_source_have_it(
    homes: tuple[Path, Path],
) -> None:
    """``criu lazy-pages`` sends its close also when its loop ended on an error: the keeper
    says the daemon failed, the relay fails, and the source, which never got the close
    (its CRIU would kill the original), takes its original back."""
    a, b = homes
    pages = b"pages" * 100
    peer = Peer(a, _source_reading_until_the_end(pages))
    with on_target(peer.port, b) as (conn, handle, keeper, daemon):
        daemon.sendall(GET)
        assert recv_exact(daemon, len(pages)) == pages
        daemon.sendall(CLOSE)
        assert recv_exact(daemon, 4) == b"\0\0\0\0"
        daemon.close()
        handle.criu_sock.send(DAEMON_FAILED)
        with pytest.raises(ChannelError) as info:
            handle.wait(10)
        assert info.value.msg == (
            "the lazy-pages daemon ended on an error after its close: its pages are not all "
            "here (the source keeps its original)"
        )
        assert keeper.join() == info.value.msg  # F: the keeper kills the copy
        conn.close()
    assert data(CLOSE) not in peer.join()


def test_target_keeps_the_daemons_connection_open_when_the_source_ends_early(
    homes: tuple[Path, Path],
) -> None:
    a, b = homes
    answer = b"some pages"

    def source(conn: Conn) -> Any:
        ours, criu = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        threading.Thread(target=fake_criu, args=(criu, answer), daemon=True).start()
        with pytest.raises(ChannelError):
            relay(conn, ours, idle_timeout=5)  # the target gives up: no E comes back

    peer = Peer(a, source)
    with on_target(peer.port, b) as (_conn, handle, keeper, daemon):
        daemon.sendall(GET + GET2)  # no close: pages are still due
        assert recv_exact(daemon, len(answer)) == answer
        with pytest.raises(ChannelError) as info:
            handle.wait(10)
        assert "ended the transfer before the last page" in info.value.msg
        why = keeper.join()
        assert "ended the transfer before the last page" in why
        # The server's relay is gone, but the connection is open while the keeper holds
        # it: a fault waits (the copy is killed first), it does not read an EOF.
        assert not readable(daemon)
        assert keeper.conn is not None
        keeper.conn.shutdown(socket.SHUT_RDWR)  # the keeper, once the copy is dead
        assert daemon.recv(10) == b""
    peer.join()


def test_no_socket_from_the_keeper_ends_the_relay_at_once(homes: tuple[Path, Path]) -> None:
    a, b = homes

    def source(conn: Conn) -> Any:
        ours, criu = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        criu.shutdown(socket.SHUT_WR)
        return relay(conn, ours, idle_timeout=5)

    peer = Peer(a, source)
    with connect("127.0.0.1", peer.port, home=b) as conn:
        handle = start_relay(conn, idle_timeout=5, daemon_socket=True)
        handle.criu_sock.close()  # the restore failed before the daemon connected
        assert handle.wait(10) == handle.wait(0)
    assert peer.join().sent == 0


def test_receive_socket_refuses_a_datagram_socket() -> None:
    local, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    send_socket(other, udp)
    assert receive_socket(local) is None


def test_a_keeper_handing_nothing_over_fails_the_relay(
    homes: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from torpor._migrate import _relay

    monkeypatch.setattr(_relay, "HANDOVER_TIMEOUT", 0.5)
    a, b = homes
    peer = Peer(a, lambda conn: conn.sock.recv(10))
    with connect("127.0.0.1", peer.port, home=b) as conn:
        handle = start_relay(conn, idle_timeout=5, daemon_socket=True)
        with pytest.raises(ChannelError) as info:
            handle.wait(10)  # the keeper holds its end and says nothing
        assert info.value.msg == "the keeper handed over no connection in 0.5 s"
        assert verdict(handle.criu_sock) == info.value.msg  # F: the keeper kills the copy
    peer.join()


def _source_that_breaks_after_the_close(answer: bytes) -> Callable[[Conn], Any]:
    """The source's side: answers the daemon's request with its pages, reads the daemon's
    close (as CRIU's page server would), then the link breaks (a reset) before CRIU's status
    and the end frame go."""

    def source(conn: Conn) -> Any:
        frame = _channel._HEADER.size + 32
        assert recv_exact(conn.sock, frame) == data(GET)
        conn.sock.sendall(data(answer))
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        assert recv_exact(conn.sock, frame) == data(CLOSE)
        time.sleep(0.1)  # its TCP acknowledges what it read (delayed ACKs: under 40 ms)
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.sock.close()

    return source


def test_target_keeps_a_copy_whose_close_reached_the_source_when_the_link_breaks(
    homes: tuple[Path, Path],
) -> None:
    """The source acknowledged the daemon's close (every page is in; CRIU there kills the
    original): a break then must not kill the copy too. The daemon gets the status of 0 the
    source's CRIU would have sent, its socket is shut down, and the keeper hears K."""
    a, b = homes
    answer = b"pages" * 100
    peer = Peer(a, _source_that_breaks_after_the_close(answer))
    with on_target(peer.port, b) as (_conn, handle, keeper, daemon):
        daemon.sendall(GET)
        assert recv_exact(daemon, len(answer)) == answer
        daemon.sendall(CLOSE)  # every page is in
        assert recv_exact(daemon, 4) == b"\0\0\0\0"  # answered here
        handle.criu_sock.send(DAEMON_OK)  # the daemon exited 0: the close goes on
        assert daemon.recv(10) == b""  # shut down: the daemon ends as after any transfer
        assert handle.wait(10) == RelayStats(sent=64, received=len(answer))
        assert keeper.join() is None  # K: the copy is not killed
    peer.join()


def test_target_kills_a_copy_whose_close_the_source_may_not_have(
    homes: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same break, but the source's TCP had not acknowledged the close: the source may
    never have had it and takes its original back, so the copy here is killed (F)."""
    from torpor._migrate import _relay

    monkeypatch.setattr(_relay, "_written", lambda sock: 1 << 62)  # never acknowledged
    a, b = homes
    answer = b"pages" * 100
    peer = Peer(a, _source_that_breaks_after_the_close(answer))
    with on_target(peer.port, b) as (_conn, handle, keeper, daemon):
        daemon.sendall(GET)
        assert recv_exact(daemon, len(answer)) == answer
        daemon.sendall(CLOSE)
        assert recv_exact(daemon, 4) == b"\0\0\0\0"
        handle.criu_sock.send(DAEMON_OK)
        with pytest.raises(ChannelError):
            handle.wait(10)
        assert keeper.join() == "peer 'a' closed the channel mid-relay"
        assert not readable(daemon)  # left open: the keeper kills the copy first
    peer.join()


def test_acked_counts_the_bytes_the_peer_acknowledged() -> None:
    """``_relay._acked`` reads struct tcp_info's tcpi_bytes_acked (at its offset in this
    kernel's struct): it grows by exactly what the peer's TCP received, and is still there
    once the connection is reset."""
    from torpor._migrate import _relay

    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        with client, peer:
            before = _relay._acked(client)
            client.sendall(b"x" * 123_457)
            assert recv_exact(peer, 123_457) == b"x" * 123_457
            deadline = time.monotonic() + 5
            while _relay._acked(client) - before < 123_457 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert _relay._acked(client) - before == 123_457
            assert _relay._written(client) == _relay._acked(client)  # nothing left unacked
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.close()
            time.sleep(0.05)
            with pytest.raises(ConnectionResetError):
                client.send(b"y")
            assert _relay._acked(client) - before == 123_457


def _source_reading_until_the_end(pages: bytes) -> Callable[[Conn], Any]:
    """The source's side: answers the daemon's request with ``pages``, then keeps what else
    comes until the channel ends (a close must never be among it)."""

    def source(conn: Conn) -> Any:
        frame = _channel._HEADER.size + 32
        assert recv_exact(conn.sock, frame) == data(GET)
        conn.sock.sendall(data(pages))
        got = b""
        conn.sock.settimeout(15)
        with contextlib.suppress(OSError):
            while chunk := conn.sock.recv(4096):
                got += chunk
        return got

    return source


@pytest.mark.parametrize("how", ["failed", "keeper-gone", "no-word"])
def test_a_close_sent_with_the_request_before_it_is_held_all_the_same(
    homes: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The daemon's close in the same write as a request (an answer still due): the request
    goes, the close is held; then the daemon failed, the keeper ended without a word, or no
    word came in HOLD_LIMIT: the relay fails and the source never has the close."""
    from torpor._migrate import _closehold

    monkeypatch.setattr(_closehold, "HOLD_LIMIT", 0.5)
    a, b = homes
    pages = b"pages" * 100
    peer = Peer(a, _source_reading_until_the_end(pages))
    with on_target(peer.port, b) as (conn, handle, keeper, daemon):
        daemon.sendall(GET + CLOSE)
        assert recv_exact(daemon, 4) == b"\0\0\0\0"  # answered at once; the pages dropped
        daemon.close()
        if how == "failed":
            handle.criu_sock.send(DAEMON_FAILED)
        elif how == "keeper-gone":
            handle.criu_sock.shutdown(socket.SHUT_WR)
        with pytest.raises(ChannelError) as info:
            handle.wait(10)
        why = (
            "no word of the lazy-pages daemon's end 0.5 s after its close (the source keeps "
            "its original)"
            if how == "no-word"
            else "the lazy-pages daemon ended on an error after its close: its pages are not "
            "all here (the source keeps its original)"
        )
        assert info.value.msg == why
        assert keeper.join() == why  # F: the keeper kills the copy
        conn.close()
    assert data(CLOSE) not in peer.join()


def test_a_break_while_the_close_is_held_kills_the_copy(
    homes: tuple[Path, Path],
) -> None:
    """The daemon's request and close in one write; the request goes (and is acknowledged),
    the close is held, and the link breaks before the keeper's word: the source never had
    the close and takes its original back, so the copy here is killed (F, never K: the
    request's frame is not the close's)."""
    a, b = homes

    def source(conn: Conn) -> Any:
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        assert recv_exact(conn.sock, _channel._HEADER.size + 32) == data(GET)
        time.sleep(0.1)  # acknowledged
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.sock.close()  # the link breaks before the close

    peer = Peer(a, source)
    with on_target(peer.port, b) as (_conn, handle, keeper, daemon):
        daemon.sendall(GET + CLOSE)
        assert recv_exact(daemon, 4) == b"\0\0\0\0"
        peer.join()
        time.sleep(0.2)
        with contextlib.suppress(OSError):
            handle.criu_sock.send(DAEMON_OK)
        with pytest.raises(ChannelError):
            handle.wait(10)
        assert keeper.join() == "peer 'a' closed the channel mid-relay"  # F


def test_the_close_is_marked_at_its_own_frame_not_the_requests_before_it(
    homes: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TCP bytes a break is judged by (``finish_close``) are marked once the frame
    holding the close is written: not at the frame of the request read with it, sent while
    the close was held (a mark there would take an acknowledged request for the close)."""
    from torpor._migrate import _relay

    marked: list[str] = []
    written = _relay._written
    monkeypatch.setattr(_relay, "_written", lambda sock: marked.append("mark") or written(sock))
    a, b = homes
    pages = b"pages" * 100
    got_close = threading.Event()

    peer = Peer(a, criu_source(pages, got_close))
    with on_target(peer.port, b) as (_conn, handle, keeper, daemon):
        daemon.sendall(GET + CLOSE)
        assert recv_exact(daemon, 4) == b"\0\0\0\0"
        daemon.shutdown(socket.SHUT_WR)
        time.sleep(0.3)  # the request's frame has gone, the close is held
        assert marked == []
        handle.criu_sock.send(DAEMON_OK)
        handle.wait(10)
        assert marked == ["mark"]
        assert keeper.join() is None
    peer.join()


def test_a_held_close_keeps_the_sources_relay_waiting_for_the_word(
    homes: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keeper's word may come only once its restore is done: while the close is held,
    empty frames keep the source's relay (which gives up after its idle time of silence)
    from giving up; the close then goes as ever."""
    from torpor._migrate import _closehold

    monkeypatch.setattr(_closehold, "KEEPALIVE", 0.2)
    a, b = homes
    pages = b"pages" * 100
    got_close = threading.Event()

    peer = Peer(a, criu_source(pages, got_close, idle=0.7))
    with on_target(peer.port, b) as (_conn, handle, keeper, daemon):
        daemon.sendall(GET)
        assert recv_exact(daemon, len(pages)) == pages
        daemon.sendall(CLOSE)
        assert recv_exact(daemon, 4) == b"\0\0\0\0"
        daemon.shutdown(socket.SHUT_WR)
        time.sleep(2.0)  # the keeper's restore, say: thrice the source's idle time
        handle.criu_sock.send(DAEMON_OK)
        handle.wait(10)
        assert got_close.is_set()
        assert keeper.join() is None
    assert peer.join().received == 64
