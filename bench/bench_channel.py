"""The migration channel's data path on loopback: how fast, and against what (issue 9).

Two processes (this one and a fork), two temporary torpor homes trusting each other by
certificate (as ``tests/unit/test_migrate_channel.py`` makes them), a real channel between them
(``torpor._migrate.listen`` / ``connect``: mutual TLS 1.3). Files live on tmpfs (``/dev/shm``),
filled with random bytes; every received file is compared by SHA-256 with the sent one.

Rows (``--runs N`` of each, median [min, max] MB/s, MB = 10**6 bytes):

- ``channel file``: ``_wire.send_file`` -> ``_wire.receive_file`` (what copy mode does per file),
  timed from the sender's start to the receiver's end (one ``CLOCK_MONOTONIC`` for both).
- ``relay a->b`` / ``relay b->a``: ``_channel.relay`` on both ends, a local socket pair on each
  (what lazy mode's page traffic goes through), the bytes fed with ``os.sendfile`` into one
  plain end and drained from the other.
- ``tcp sendfile``: the same bytes over plain TCP, ``os.sendfile`` in, ``recv_into`` + ``write``
  out (the kernel's ceiling here, about what ``tar | nc`` gets).
- ``ssl bare``: Python's ``ssl`` with the channel's own TLS contexts, ``readinto`` + ``sendall``
  of 1 MiB, ``recv_into`` + ``write`` (TLS without torpor's framing and hashing).

``--lazy`` adds the page-fault round trip of lazy mode: a fake source CRIU page server (answers
each 32-byte ``page_server_iov`` request with a header and ``nr_pages`` pages) behind a
``_lazy_dump.Guard`` and a relay; the target's relay thread (``start_relay``) and, in a forked
"keeper" as in a real migration, ``_lazy_target.RelayedPages`` and a fake lazy-pages daemon
asking for pages. Reported: the round trip of a 1-page request (idle), and of a 1-page request
sent right behind a 4 MiB one (the daemon's background push: the fault waits for it), against
the same fake daemon talking to the fake page server over plain loopback TCP.

    .venv/bin/python bench/bench_channel.py [--runs 3] [--sizes 256M,1G] [--lazy] [--only ROWS]
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import shutil
import socket
import ssl
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from torpor._identity._tls import tls_identity
from torpor._identity._trust import TrustStore
from torpor._migrate import _channel, _wire
from torpor._migrate._channel import Conn, connect, listen, relay, start_relay

SHM = Path("/dev/shm")
BUF = 1 << 20
PSI = struct.Struct("<I4xQQQ")
PS_IOV_GET, PS_IOV_CLOSE = 3, 0x1023
PAGE = 4096


def parse_size(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * mult[s[-1].upper()] if s[-1].upper() in mult else int(s)


def make_homes(root: Path) -> tuple[Path, Path]:
    a, b = root / "a", root / "b"
    for h in (a, b):
        h.mkdir(mode=0o700)
    TrustStore(a).add("b", cert_der=tls_identity(b).cert_der, via="cert")
    TrustStore(b).add("a", cert_der=tls_identity(a).cert_der, via="cert")
    return a, b


def random_file(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        block = os.urandom(BUF)
        n = 0
        while left:
            # distinct blocks (a counter in front) without paying urandom for every byte
            chunk = n.to_bytes(8, "little") + block[8 : min(left, BUF)]
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
            n += 1
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(BUF):
            h.update(chunk)
    return h.hexdigest()


# -- two processes --


def _child(fn: Callable[..., Any], args: tuple[Any, ...], out: Any) -> None:
    try:
        out.send(("ok", fn(*args)))
    except BaseException as exc:  # reported to the parent, which raises it
        out.send(("error", repr(exc)))
    finally:
        out.close()
        os._exit(0)


class Far:
    """``fn(*args)`` run in a forked process; :meth:`result` waits for what it returned."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        ctx = mp.get_context("fork")
        self._rx, tx = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_child, args=(fn, args, tx))
        self._proc.start()
        tx.close()

    def result(self, timeout: float = 170) -> Any:
        if not self._rx.poll(timeout):
            self._proc.kill()
            raise RuntimeError("the far side did not finish in time")
        status, value = self._rx.recv()
        self._proc.join(5)
        if status != "ok":
            raise RuntimeError(f"the far side failed: {value}")
        return value


def channel_pair(home_a: Path, home_b: Path, far: Callable[[Conn], Any]) -> tuple[Conn, Far]:
    """A channel from ``home_a`` (here) to ``home_b`` (a fork running ``far(conn)``)."""
    lst = listen("127.0.0.1", 0, home=home_b)
    port = lst.address[1]

    def serve() -> Any:
        with lst.accept(timeout=20) as conn:
            return far(conn)

    proc = Far(serve)
    lst.close()
    return connect("127.0.0.1", port, home=home_a), proc


# -- throughput rows --


def row_channel_file(homes: tuple[Path, Path], src: Path, size: int, digest: str) -> float:
    dst = src.with_name(src.name + ".out")

    def far(conn: Conn) -> Any:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            conn.send({"type": "ready"})
            got = _wire.receive_file(conn, fd, size)
        finally:
            os.close(fd)
        conn.send({"t": time.monotonic(), "sha": got})
        return got

    conn, proc = channel_pair(*homes, far)
    with conn:
        assert conn.recv()["type"] == "ready"
        fd = os.open(src, os.O_RDONLY)
        try:
            t0 = time.monotonic()
            sent = _wire.send_file(conn, fd, size)
        finally:
            os.close(fd)
        end = conn.recv()
    proc.result()
    assert sent == digest == end["sha"], "hash mismatch"
    assert sha256_file(dst) == digest, "the received file differs"
    dst.unlink()
    return size / (end["t"] - t0) / 1e6


def _drain(sock: socket.socket) -> tuple[int, float]:
    buf = bytearray(BUF)
    n = 0
    while got := sock.recv_into(buf):
        n += got
    return n, time.monotonic()


def _feed(sock: socket.socket, path: Path, size: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        while off < size:
            off += os.sendfile(sock.fileno(), fd, off, size - off)
    finally:
        os.close(fd)
    sock.shutdown(socket.SHUT_WR)


def row_relay(homes: tuple[Path, Path], src: Path, size: int, a_to_b: bool) -> float:
    def far(conn: Conn) -> Any:
        ours, plain = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.send({"type": "ready"})
        worker: dict[str, Any] = {}
        if a_to_b:
            plain.shutdown(socket.SHUT_WR)
            t = threading.Thread(target=lambda: worker.update(r=_drain(plain)))
        else:
            assert conn.recv()["type"] == "go"
            worker["t0"] = time.monotonic()
            t = threading.Thread(target=lambda: (_feed(plain, src, size), _drain(plain)))
        t.start()
        stats = relay(conn, ours, idle_timeout=30)
        t.join()
        conn.send({"r": worker.get("r"), "t0": worker.get("t0"), "stats": stats.received})
        return None

    conn, proc = channel_pair(*homes, far)
    with conn:
        assert conn.recv()["type"] == "ready"
        ours, plain = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        result: dict[str, Any] = {}
        if a_to_b:
            t0 = time.monotonic()
            t = threading.Thread(target=lambda: (_feed(plain, src, size), _drain(plain)))
        else:
            conn.send({"type": "go"})
            plain.shutdown(socket.SHUT_WR)
            t = threading.Thread(target=lambda: result.update(r=_drain(plain)))
        t.start()
        relay(conn, ours, idle_timeout=30)
        t.join()
        end = conn.recv()
    proc.result()
    if a_to_b:
        n, t1 = end["r"]
    else:
        n, t1 = result["r"]
        t0 = end["t0"]
    assert n == size, f"relayed {n} of {size} bytes"
    return size / (t1 - t0) / 1e6


def _receive_plain(sock: socket.socket, dst: Path, size: int) -> tuple[float, str]:
    buf = bytearray(BUF)
    view = memoryview(buf)
    h = hashlib.sha256()
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        left = size
        while left:
            n = sock.recv_into(buf, min(left, BUF))
            if not n:
                raise RuntimeError("the sender ended early")
            h.update(view[:n])
            os.write(fd, view[:n])
            left -= n
    finally:
        os.close(fd)
    return time.monotonic(), h.hexdigest()


def row_tcp(src: Path, size: int, digest: str) -> float:
    dst = src.with_name(src.name + ".out")
    lst = socket.create_server(("127.0.0.1", 0))
    port = lst.getsockname()[1]

    def far() -> Any:
        conn, _ = lst.accept()
        with conn:
            return _receive_plain(conn, dst, size)

    proc = Far(far)
    lst.close()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        t0 = time.monotonic()
        _feed(sock, src, size)
        t1, got = proc.result()
    assert got == digest
    dst.unlink()
    return size / (t1 - t0) / 1e6


def row_ssl(homes: tuple[Path, Path], src: Path, size: int, digest: str) -> float:
    a, b = homes
    dst = src.with_name(src.name + ".out")
    ia, ib = tls_identity(a), tls_identity(b)
    server_ctx = _channel._context(ib, server=True, trusted=[ia.cert_der])
    client_ctx = _channel._context(ia, server=False, trusted=[])
    lst = socket.create_server(("127.0.0.1", 0))
    port = lst.getsockname()[1]

    def far() -> Any:
        raw, _ = lst.accept()
        with server_ctx.wrap_socket(raw, server_side=True) as tls:
            tls.sendall(b"!")
            return _receive_plain(tls, dst, size)

    proc = Far(far)
    lst.close()
    with client_ctx.wrap_socket(socket.create_connection(("127.0.0.1", port))) as tls:
        assert tls.recv(1) == b"!"
        buf = bytearray(BUF)
        view = memoryview(buf)
        with src.open("rb", buffering=0) as f:
            t0 = time.monotonic()
            while n := f.readinto(buf):
                tls.sendall(view[:n])
        t1, got = proc.result()
    assert got == digest
    dst.unlink()
    return size / (t1 - t0) / 1e6


# -- lazy page round trips --


def fake_page_server(sock: socket.socket) -> None:
    """Answer each request as CRIU's page server answers PS_IOV_GET: the header, the pages."""
    pages = bytes(PAGE) * 1024
    pending = bytearray()
    try:
        while True:
            while len(pending) < PSI.size:
                data = sock.recv(65536)
                if not data:
                    return
                pending += data
            cmd, nr, vaddr, dst = PSI.unpack_from(pending)
            del pending[: PSI.size]
            if cmd & 0xFFFF == PS_IOV_CLOSE:
                sock.sendall(b"\0" * 4)
                sock.shutdown(socket.SHUT_WR)
                return
            sock.sendall(PSI.pack(cmd, nr, vaddr, dst))
            left = nr * PAGE
            while left:
                n = min(left, len(pages))
                sock.sendall(memoryview(pages)[:n])
                left -= n
    except OSError:
        return


def fake_daemon(sock: socket.socket, idle: int, behind: int) -> dict[str, list[float]]:
    """Ask for pages; the round trips (ms) of 1-page requests, idle and behind a 4 MiB one."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(BUF)

    def read(n: int) -> None:
        while n:
            got = sock.recv_into(buf, min(n, BUF))
            if not got:
                raise RuntimeError("the page server ended")
            n -= got

    out: dict[str, list[float]] = {"idle": [], "behind 4 MiB": []}
    for i in range(idle):
        t = time.perf_counter()
        sock.sendall(PSI.pack(PS_IOV_GET, 1, i * PAGE, 1))
        read(PSI.size + PAGE)
        out["idle"].append((time.perf_counter() - t) * 1000)
    for i in range(behind):
        t = time.perf_counter()
        sock.sendall(PSI.pack(PS_IOV_GET, 1024, 0, 1) + PSI.pack(PS_IOV_GET, 1, i * PAGE, 1))
        read(2 * PSI.size + 1025 * PAGE)
        out["behind 4 MiB"].append((time.perf_counter() - t) * 1000)
    sock.sendall(PSI.pack(PS_IOV_CLOSE, 0, 0, 0))
    read(4)
    return out


def lazy_relayed(homes: tuple[Path, Path], idle: int, behind: int) -> dict[str, list[float]]:
    from torpor._migrate._lazy_dump import Guard
    from torpor._migrate._lazy_target import RelayedPages

    class FakeImage:
        path = Path("/nonexistent/image")

    def target(conn: Conn) -> Any:  # the migration server: its relay thread, a keeper apart
        handle = start_relay(conn, idle_timeout=30)
        fd = handle.criu_sock.fileno()

        def keeper() -> Any:
            errors: list[object] = []
            pages = RelayedPages(FakeImage(), os.getpid, errors.append, fd, "a")  # type: ignore[arg-type]
            pages.start()
            with socket.create_connection(("127.0.0.1", pages.port)) as daemon:
                out = fake_daemon(daemon, idle, behind)
            pages.close()
            assert not errors, errors
            return out

        k = Far(keeper)
        handle.criu_sock.close()
        out = k.result()
        handle.wait(30)
        return out

    conn, proc = channel_pair(*homes, target)
    with conn:
        criu, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        guard = Guard(ours)
        guard.start()
        t = threading.Thread(target=fake_page_server, args=(criu,), daemon=True)
        t.start()
        relay(conn, guard.relay_sock, idle_timeout=30)
        guard.close()
    return proc.result()  # type: ignore[no-any-return]


def lazy_direct(idle: int, behind: int) -> dict[str, list[float]]:
    lst = socket.create_server(("127.0.0.1", 0))
    port = lst.getsockname()[1]

    def serve() -> None:
        conn, _ = lst.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            fake_page_server(conn)

    proc = Far(serve)
    lst.close()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        out = fake_daemon(sock, idle, behind)
    proc.result()
    return out


# -- the report --


def cell(xs: list[float], fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(statistics.median(xs))} [{fmt.format(min(xs))}, {fmt.format(max(xs))}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--sizes", default="256M,1G")
    p.add_argument("--only", default="file,relay,tcp,ssl", help="rows: file,relay,tcp,ssl")
    p.add_argument("--lazy", action="store_true", help="also the lazy page round trips")
    p.add_argument("--profile", help="cProfile the sender's side of one 'file' run into this")
    args = p.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    rows = set(args.only.split(","))
    root = Path(tempfile.mkdtemp(prefix="bench-channel-", dir=SHM))
    print(f"{time.strftime('%H:%M:%S')} runs {args.runs}, load {os.getloadavg()[0]:.2f}, "
          f"python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}", flush=True)  # fmt: skip
    try:
        homes = make_homes(root)
        table: list[tuple[str, str, str]] = []
        for size in sizes:
            if not rows & {"file", "relay", "tcp", "ssl"}:
                break
            src = root / f"src-{size}"
            digest = random_file(src, size)
            label = f"{size >> 20} MiB"
            runs: dict[str, list[float]] = {}
            for _ in range(args.runs):  # rows interleaved: the machine's weather hits all alike
                if "file" in rows:
                    runs.setdefault("channel file", []).append(
                        row_channel_file(homes, src, size, digest)
                    )
                if "relay" in rows:
                    runs.setdefault("relay a->b", []).append(row_relay(homes, src, size, True))
                    runs.setdefault("relay b->a", []).append(row_relay(homes, src, size, False))
                if "tcp" in rows:
                    runs.setdefault("tcp sendfile", []).append(row_tcp(src, size, digest))
                if "ssl" in rows:
                    runs.setdefault("ssl bare", []).append(row_ssl(homes, src, size, digest))
            for name, xs in runs.items():
                table.append((name, label, cell(xs)))
                print(f"  {name:14} {label:>9}  {cell(xs)} MB/s  {[round(x) for x in xs]}",
                      flush=True)  # fmt: skip
            if args.profile and "file" in rows:
                import cProfile

                prof = cProfile.Profile()
                prof.enable()
                row_channel_file(homes, src, size, digest)
                prof.disable()
                prof.dump_stats(args.profile)
            src.unlink()
        if table:
            print(f"\n| row | size | MB/s, median [min, max] of {args.runs} |\n|---|---:|---:|")
            for r in table:
                print(f"| {' | '.join(r)} |")
        if args.lazy:
            lat: dict[str, dict[str, list[float]]] = {"relayed": {}, "direct tcp": {}}
            for _ in range(args.runs):
                for k, v in lazy_relayed(homes, 500, 20).items():
                    lat["relayed"].setdefault(k, []).extend(v)
                for k, v in lazy_direct(500, 20).items():
                    lat["direct tcp"].setdefault(k, []).extend(v)
            print(f"\n| page round trip, ms | path | median | p90 | max | n ({args.runs} runs) |")
            print("|---|---|---:|---:|---:|---:|")
            for path, kinds in lat.items():
                for kind, xs in kinds.items():
                    xs.sort()
                    p90 = xs[int(len(xs) * 0.9)]
                    print(f"| {kind} | {path} | {statistics.median(xs):.3f} | {p90:.3f} | "
                          f"{max(xs):.3f} | {len(xs)} |")  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
