"""The channel's relay and the image's wire (``torpor._migrate._relay.relay``,
``torpor._migrate._wire``), through their public functions, on real sockets and a real TLS pair.

- The relay holds a bounded amount whatever one side does: a side that floods while the other
  does not read is simply not read any further (what was accepted is bounded by the sockets'
  buffers and a frame or two per relay, and so is the memory), and once the other side reads,
  every byte arrives, in order, both ways at once.
- An error in the helper thread of :func:`send_file` or :func:`receive_file` (the file cannot
  be read, it shrinks, it cannot be written, the peer goes away) is raised in the caller, at
  once, and leaves no thread behind; a byte changed on the way gives a hash that is not the
  sender's, and the bytes written are those hashed.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from torpor._identity._tls import tls_identity
from torpor._identity._trust import Peer, TrustStore
from torpor._migrate import ChannelError, Conn, RelayStats, connect, listen, relay
from torpor._migrate._channel import MAX_DATA
from torpor._migrate._wire import WireError, receive_file, recv_bytes, send_bytes, send_file

PEER = Peer(name="peer", fingerprint="sha256:" + "0" * 64, cert_der=None, added=0, via="test")
SMALL_BUF = 64 << 10  # socket buffers asked for, so that a flood stalls early
CHUNK = 64 << 10  # what a flooding side writes at a time


# -- plumbing ------------------------------------------------------------------------------------


class Thread:
    """``fn`` in a daemon thread; :meth:`join` gives its result or raises its error."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self._t = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._t.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.value = fn()
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = 30) -> Any:
        self._t.join(timeout)
        assert not self._t.is_alive(), f"still running after {timeout} s: a hang"
        if self.error is not None:
            raise self.error
        return self.value

    @property
    def alive(self) -> bool:
        return self._t.is_alive()


@pytest.fixture
def tls_pair(tmp_path: Path) -> Iterator[tuple[Conn, Conn]]:
    """Two homes trusting each other, connected over loopback: (client, server)."""
    a, b = tmp_path / "a", tmp_path / "b"
    for h in (a, b):
        h.mkdir(mode=0o700)
    TrustStore(a).add("b", cert_der=tls_identity(b).cert_der, via="cert")
    TrustStore(b).add("a", cert_der=tls_identity(a).cert_der, via="cert")
    with listen("127.0.0.1", 0, home=b) as listener:
        accepted = Thread(lambda: listener.accept(timeout=20))
        client = connect("127.0.0.1", listener.address[1], home=a)
        server = accepted.join()
    try:
        yield client, server
    finally:
        client.close()
        server.close()


@pytest.fixture
def plain_pair() -> Iterator[tuple[Conn, Conn]]:
    """Two :class:`Conn` on a socket pair (the channel's framing without TLS)."""
    a, b = socket.socketpair()
    try:
        yield Conn(a, PEER), Conn(b, PEER)  # type: ignore[arg-type]
    finally:
        a.close()
        b.close()


def small_buffers(*socks: socket.socket) -> None:
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUF)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUF)


def buffered(*socks: socket.socket) -> int:
    """What the kernel may hold in these sockets' buffers, as it reports them."""
    return sum(
        s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        + s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        for s in socks
    )


class Flood:
    """Writes ``total`` bytes of a known stream into ``sock`` (blocking, :data:`CHUNK` at a
    time) in a thread, counting what the socket accepted; then half-closes it."""

    def __init__(self, sock: socket.socket, total: int, seed: int) -> None:
        self.sock, self.total = sock, total
        self.block = hashlib.sha256(seed.to_bytes(8, "little")).digest() * (CHUNK // 32)
        self.accepted = 0
        self.thread = Thread(self._run)

    def _run(self) -> None:
        while self.accepted < self.total:
            self.sock.sendall(self.block)
            self.accepted += CHUNK
        self.sock.shutdown(socket.SHUT_WR)

    def digest(self) -> str:
        h = hashlib.sha256()
        for _ in range(self.total // CHUNK):
            h.update(self.block)
        return h.hexdigest()

    def stalled(self, quiet: float = 1.0, limit: float = 20.0) -> int:
        """What the socket had accepted once nothing more was for ``quiet`` seconds (the
        flood finished: the whole of it)."""
        deadline = time.monotonic() + limit
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline and self.thread.alive:
            if self.accepted != last:
                last, since = self.accepted, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return last
            time.sleep(0.05)
        return self.accepted


def drain(sock: socket.socket) -> Thread:
    """Read ``sock`` to its end in a thread: the SHA-256 and length of what came."""

    def run() -> tuple[str, int]:
        h, n = hashlib.sha256(), 0
        while chunk := sock.recv(1 << 20):
            h.update(chunk)
            n += len(chunk)
        return h.hexdigest(), n

    return Thread(run)


class Chain:
    """CRIU's socket on host a, a's relay, the TLS channel, b's relay, CRIU's socket on b,
    every socket with small buffers; ``a`` and ``b`` are the CRIU ends."""

    def __init__(self, pair: tuple[Conn, Conn]) -> None:
        self.a, ours_a = socket.socketpair()
        self.b, ours_b = socket.socketpair()
        self.tls = [pair[0].sock, pair[1].sock]
        self.socks = [self.a, ours_a, self.b, ours_b, *self.tls]
        small_buffers(*self.socks)
        self.relays = [
            Thread(lambda: relay(pair[0], ours_a, idle_timeout=20)),
            Thread(lambda: relay(pair[1], ours_b, idle_timeout=20)),
        ]
        self._ours = (ours_a, ours_b)

    def bound(self) -> int:
        """What the chain may hold: its sockets' buffers and two frames a relay each way."""
        return buffered(*self.socks) + 8 * (MAX_DATA + 64) + (1 << 20)

    def join(self) -> list[RelayStats]:
        try:
            return [r.join() for r in self.relays]
        finally:
            for s in (*self._ours, self.a, self.b):
                s.close()


# -- the relay -----------------------------------------------------------------------------------


def test_a_flood_the_other_side_does_not_read_is_not_read_without_bound(
    tls_pair: tuple[Conn, Conn],
) -> None:
    chain = Chain(tls_pair)
    bound = chain.bound()
    total = (2 * bound + (16 << 20)) // CHUNK * CHUNK
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        flood = Flood(chain.a, total, seed=1)  # CRIU on a writes; CRIU on b reads nothing yet
        accepted = flood.stalled()
        held = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert accepted < total, f"the whole flood of {total} bytes was taken in, unread"
    assert accepted <= bound, f"{accepted} bytes taken in, more than the chain's {bound}"
    # The relays' memory: their frame buffers, not the flood (the kernel holds the rest).
    assert held <= 8 * (MAX_DATA + 64) + (2 << 20), f"{held} bytes of Python memory held"
    got = drain(chain.b)  # b reads: everything arrives, in order
    flood.thread.join()
    got_a = drain(chain.a)
    chain.b.shutdown(socket.SHUT_WR)
    assert got.join() == (flood.digest(), total)
    assert got_a.join()[1] == 0
    stats_a, stats_b = chain.join()
    assert (stats_a.sent, stats_a.received) == (total, 0)
    assert (stats_b.sent, stats_b.received) == (0, total)


def test_both_ways_flooded_at_once_neither_blocks_the_other(tls_pair: tuple[Conn, Conn]) -> None:
    chain = Chain(tls_pair)
    bound = chain.bound()
    total = (bound + (8 << 20)) // CHUNK * CHUNK
    up, down = Flood(chain.a, total, seed=2), Flood(chain.b, total, seed=3)
    up.stalled()
    assert down.stalled() < total and up.accepted < total
    at_b, at_a = drain(chain.b), drain(chain.a)  # now both read
    assert at_b.join() == (up.digest(), total)
    assert at_a.join() == (down.digest(), total)
    up.thread.join()
    down.thread.join()
    stats = chain.join()
    assert [(s.sent, s.received) for s in stats] == [(total, total), (total, total)]


def test_a_peer_flooding_frames_is_not_read_while_criu_does_not_read(
    tls_pair: tuple[Conn, Conn],
) -> None:
    """The peer is not a relay: it writes ``D`` frames as fast as it can."""
    ours, peer = tls_pair
    plain, criu = socket.socketpair()
    small_buffers(plain, criu, ours.sock, peer.sock)
    bound = buffered(plain, criu, ours.sock, peer.sock) + 4 * (MAX_DATA + 64) + (1 << 20)
    frames = (2 * bound + (16 << 20)) // MAX_DATA
    block = os.urandom(MAX_DATA)
    sent = [0]

    def flood() -> None:
        for _ in range(frames):
            send_bytes(peer, block)
            sent[0] += MAX_DATA

    flooding = Thread(flood)
    relaying = Thread(lambda: relay(ours, plain, idle_timeout=20))
    last, since = -1, time.monotonic()
    while time.monotonic() - since < 1.0 and flooding.alive:
        if sent[0] != last:
            last, since = sent[0], time.monotonic()
        time.sleep(0.05)
    assert flooding.alive, f"all {frames} frames were taken in while CRIU read nothing"
    assert sent[0] <= bound, f"{sent[0]} bytes taken in, more than {bound}"
    criu.close()  # CRIU goes away: the relay fails cleanly, the peer's writes break
    with pytest.raises(ChannelError) as info:
        relaying.join()
    assert "\n" not in info.value.msg
    ours.close()  # unread data in its buffer: a reset, and the peer's blocked write fails
    with pytest.raises(ChannelError):
        flooding.join()


# -- the wire: errors of the helper threads -------------------------------------------------------


def at_once(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a thread, which must end (return or raise) within 10 s: a helper's error
    that never reaches the caller would leave it waiting."""
    return Thread(fn).join(10)


def helpers() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("torpor-")}


@pytest.fixture
def no_helper_left() -> Iterator[None]:
    before = helpers()
    yield
    deadline = time.monotonic() + 5
    while helpers() - before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert helpers() - before == set(), "a helper thread outlived its call"


def big_file(path: Path, size: int = 5 * MAX_DATA + 123) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


@pytest.mark.usefixtures("no_helper_left")
def test_a_file_that_cannot_be_read_fails_the_send_at_once(
    plain_pair: tuple[Conn, Conn], tmp_path: Path
) -> None:
    src, _ = plain_pair
    big_file(tmp_path / "f")
    fd = os.open(tmp_path / "f", os.O_WRONLY)  # every read fails: EBADF
    try:
        with pytest.raises(OSError) as info:
            at_once(lambda: send_file(src, fd, 5 * MAX_DATA + 123))
        assert info.value.errno == errno.EBADF
    finally:
        os.close(fd)


@pytest.mark.usefixtures("no_helper_left")
def test_a_file_that_shrinks_mid_send_fails_it(
    plain_pair: tuple[Conn, Conn], tmp_path: Path
) -> None:
    src, dst = plain_pair
    data = big_file(tmp_path / "f")
    fd = os.open(tmp_path / "f", os.O_RDWR)
    reader = drain(dst.sock)

    def progress(n: int) -> None:
        os.ftruncate(fd, MAX_DATA)  # after the first frame is out

    try:
        with pytest.raises(WireError) as info:
            at_once(lambda: send_file(src, fd, len(data), progress=progress))
        assert info.value.msg.startswith("an image file shrank while it was sent (")
    finally:
        os.close(fd)
        src.sock.shutdown(socket.SHUT_WR)
    reader.join()


@pytest.mark.usefixtures("no_helper_left")
def test_the_peer_going_away_fails_the_send_at_once(
    plain_pair: tuple[Conn, Conn], tmp_path: Path
) -> None:
    src, dst = plain_pair
    data = big_file(tmp_path / "f", 40 * MAX_DATA)  # more than the socket holds
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        sending = Thread(lambda: send_file(src, fd, len(data)))
        time.sleep(0.2)
        dst.sock.close()
        with pytest.raises(ChannelError) as info:
            sending.join(10)
        assert info.value.msg.startswith("channel to peer 'peer' broke: ")
    finally:
        os.close(fd)


def _send_in_thread(conn: Conn, data: bytes, tmp: Path) -> Thread:
    (tmp / "sent").write_bytes(data)

    def run() -> str:
        fd = os.open(tmp / "sent", os.O_RDONLY)
        try:
            return send_file(conn, fd, len(data))
        finally:
            os.close(fd)

    return Thread(run)


@pytest.mark.usefixtures("no_helper_left")
def test_a_full_disk_fails_the_receive_at_once(
    plain_pair: tuple[Conn, Conn], tmp_path: Path
) -> None:
    src, dst = plain_pair
    data = os.urandom(6 * MAX_DATA)
    sending = _send_in_thread(src, data, tmp_path)
    fd = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
    try:
        with pytest.raises(OSError) as info:
            at_once(lambda: receive_file(dst, fd, len(data)))
        assert info.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
        dst.sock.close()  # the sender, still sending, hears the channel go
    with pytest.raises(ChannelError):
        sending.join(10)


@pytest.mark.usefixtures("no_helper_left")
def test_a_write_failing_mid_file_fails_the_receive(
    plain_pair: tuple[Conn, Conn], tmp_path: Path
) -> None:
    src, dst = plain_pair
    data = os.urandom(8 * MAX_DATA)
    sending = _send_in_thread(src, data, tmp_path)
    r, w = os.pipe()
    taken = [0]

    def read_some() -> None:  # takes three frames' worth, then goes: the next write fails
        while taken[0] < 3 * MAX_DATA:
            taken[0] += len(os.read(r, 1 << 16))
        os.close(r)

    reader = Thread(read_some)
    try:
        with pytest.raises(BrokenPipeError):
            at_once(lambda: receive_file(dst, w, len(data)))
        reader.join()
    finally:
        os.close(w)
        dst.sock.close()
    with pytest.raises(ChannelError):
        sending.join(10)


@pytest.mark.usefixtures("no_helper_left")
def test_the_sender_going_away_fails_the_receive_at_once(
    plain_pair: tuple[Conn, Conn], tmp_path: Path
) -> None:
    src, dst = plain_pair

    def send_half() -> None:  # 3 of the 6 frames announced, then the end of the stream
        for frame in range(3):
            send_bytes(src, bytes([frame]) * MAX_DATA)
        src.sock.shutdown(socket.SHUT_WR)

    sending = Thread(send_half)
    with open(tmp_path / "got", "wb") as out, pytest.raises(ChannelError) as info:
        at_once(lambda: receive_file(dst, out.fileno(), 6 * MAX_DATA))
    assert info.value.msg == "peer 'peer' closed the channel"
    sending.join()


@pytest.mark.usefixtures("no_helper_left")
def test_a_byte_changed_on_the_way_gives_another_hash_of_what_was_written(
    plain_pair: tuple[Conn, Conn], tmp_path: Path
) -> None:
    src, dst = plain_pair
    data = bytearray(os.urandom(4 * MAX_DATA + 7))
    sums = hashlib.sha256(data).hexdigest()  # the sender's
    data[2 * MAX_DATA + 3] ^= 1

    def send() -> None:  # the file as frames, the changed byte among them
        for p in range(0, len(data), MAX_DATA):
            send_bytes(src, bytes(data[p : p + MAX_DATA]))

    sent = Thread(send)
    with open(tmp_path / "got", "wb") as out:
        got = at_once(lambda: receive_file(dst, out.fileno(), len(data)))
    sent.join()
    written = (tmp_path / "got").read_bytes()
    assert got != sums and got == hashlib.sha256(written).hexdigest()
    assert written == bytes(data)


@pytest.mark.usefixtures("no_helper_left")
def test_a_whole_file_goes_and_its_hashes_agree(
    plain_pair: tuple[Conn, Conn], tmp_path: Path
) -> None:
    """The harness itself: an honest file arrives whole, on both sides the same hash."""
    src, dst = plain_pair
    data = os.urandom(5 * MAX_DATA + 1)
    sending = _send_in_thread(src, data, tmp_path)
    with open(tmp_path / "got", "wb") as out:
        got = at_once(lambda: receive_file(dst, out.fileno(), len(data)))
    assert got == sending.join() == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "got").read_bytes() == data
    send_bytes(src, b"next")  # the channel goes on at the next frame
    assert recv_bytes(dst) == b"next"
