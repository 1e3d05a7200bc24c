#!/usr/bin/env python3
"""The programs ``bench_migrate.py`` runs on the lab's nodes (stdlib, plus numpy for the app).

``app SIZE TOKEN CLIENT HB_PORT BIND PORT``
    Holds SIZE bytes of incompressible memory (PCG64 output, every page touched), then sends a
    UDP heartbeat ``TOKEN SEQ`` to ``CLIENT:HB_PORT`` every ~1 ms and answers TCP requests on
    ``BIND:PORT`` (a service address, or ``0.0.0.0``), one line each, any number per
    connection: ``ASK`` sums a 1 MiB window of the memory, ``SUM`` the whole of it (a checksum:
    the copy on the target must answer the original's). Each answer is a JSON line ``{"token",
    "answer", "net"}``; ``net`` is the inode of the app's network namespace, which says on
    which lab host the answer was made (a restored copy cannot know that otherwise: its memory,
    environment included, is the original's).
``client ADDRESS HB_PORT``
    Runs on the lab's client for the whole bench; one command per stdin line, one JSON line
    answered on stdout. ``watch TOKEN``: record the arrival time (``time.monotonic()``, the
    clock every node of the lab shares) and sender of each heartbeat of TOKEN. ``keep TOKEN
    ADDR PORT``: also keep ONE TCP connection to ADDR:PORT, asking ``ASK`` on it every ~5 ms,
    and record each answer's time and ``net`` (a broken connection is recorded and made
    again). ``peek``: the latest answer and heartbeat so far. ``stop``: end the recording;
    answers ``{"beats": [[t, sender]], "answers": [[t, net]], "errors": [...], "connections":
    N}``. ``ask ADDR PORT REQUEST``: one request on a connection of its own; its answer (or
    ``{"error"}``).
``bare-send PID DIR RECEIVER_ADDR RECEIVER_PORT [--lazy-port P] [--service ADDR/PREFIX]``
    (on the source) Bare CRIU: ``criu dump -t PID -D DIR`` (with ``--lazy-pages --port P``
    the dump keeps serving the pages; its ``--status-fd`` says when the other files are
    written; with ``--service``, ``--tcp-established --network-lock nftables`` and then the
    address taken down here), then the directory as a tar stream over one TCP connection to
    the receiver. Prints a JSON line of monotonic times; a lazy dump is then waited for (it
    exits once every page was served).
``bare-receive LISTEN_ADDR PORT DIR LOG [--lazy-from ADDR:P] [--service ADDR/PREFIX]``
    (on the target) Listens (``listening`` on stdout), receives the tar stream into DIR, then
    ``criu restore -D DIR -d`` (lazily: first ``criu lazy-pages --page-server --address ADDR
    --port P``, waited for on its status fd, then ``restore --lazy-pages``; with ``--service``:
    the address's traffic dropped by a table named as the dump's CRIU lock table, so that
    CRIU's restore lifts it when it unlocks, as torpor's target does; the address brought up
    and announced; ``--tcp-established``). LOG is the app's stdout log, made empty if missing (it is
    opened ``O_APPEND``, so CRIU checks only that it exists). Prints a JSON line of monotonic
    times and the restored pid, then (lazy) waits for the daemon, which exits once every page
    has arrived.
``cleanup ADDR/PREFIX``  (on a host) takes the address down and deletes CRIU's lock tables.

Moving the address (bring up, take down, gratuitous ARP, the target's drop table) uses the
host-side helpers of ``torpor._migrate`` (``_address``, ``_netlock``): that is not CRIU's job,
and both rows then move it the same way. The ``criu`` run is ``$CRIU`` (else ``criu``).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from typing import Any

LOCK_FILE = "bench-criu-lock"  # not CRIU's: the bare sender's note of CRIU's lock table
KEEP_INTERVAL = 0.005  # seconds between the kept connection's requests
HEARTBEAT = 0.001


def criu() -> str:
    return os.environ.get("CRIU") or shutil.which("criu") or "criu"


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


# -- the app ----------------------------------------------------------------------------------


def app(size: int, token: str, client: str, hb_port: int, bind: str, port: int) -> None:
    import numpy as np

    a = np.empty(size // 8, dtype=np.uint64)
    bits = np.random.default_rng(12345).bit_generator
    step = 8 << 20
    for i in range(0, a.size, step):
        a[i : i + step] = bits.random_raw(min(step, a.size - i))
    window = a[: (1 << 20) // 8]
    srv = socket.create_server((bind, port), backlog=64)

    def answer(conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for line in lines:
                request = line.strip().decode(errors="replace")
                part = a if request == "SUM" else window
                net = os.stat("/proc/self/ns/net").st_ino
                reply = {"token": token, "answer": int(part.sum(dtype=np.uint64)), "net": net}
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def serve() -> None:
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    hb = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    print("ready", flush=True)
    seq = 0
    while True:
        hb.sendto(f"{token} {seq}".encode(), (client, hb_port))
        seq += 1
        time.sleep(HEARTBEAT)


# -- the client -------------------------------------------------------------------------------


def ask(address: str, port: int, request: str, timeout: float) -> dict[str, Any]:
    with socket.create_connection((address, port), timeout=timeout) as sock:
        sock.sendall(request.encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            data = sock.recv(4096)
            if not data:
                raise ConnectionResetError("closed before answering")
            buf += data
    reply = json.loads(buf)
    if not isinstance(reply, dict):
        raise ValueError(reply)
    return reply


class Client:
    def __init__(self, address: str, hb_port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, hb_port))
        self.token: bytes | None = None
        self.beats: list[tuple[float, str]] = []
        self.answers: list[tuple[float, int]] = []
        self.errors: list[str] = []
        self.connections = 0
        self.lock = threading.Lock()
        self.keeper: threading.Thread | None = None
        self.keeping = False
        threading.Thread(target=self.receive, daemon=True).start()

    def receive(self) -> None:
        while True:
            data, (sender, _) = self.sock.recvfrom(256)
            now = time.monotonic()
            token = data.split(b" ", 1)[0]
            with self.lock:
                if token == self.token:
                    self.beats.append((now, sender))

    def keep(self, token: str, address: str, port: int) -> None:
        """One connection, a request every KEEP_INTERVAL; made again only if it breaks."""
        while self.keeping:
            try:
                with socket.create_connection((address, port), timeout=60) as sock:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self.connections += 1
                    lines = sock.makefile("rb")
                    while self.keeping:
                        sock.sendall(b"ASK\n")
                        reply = json.loads(lines.readline())
                        if reply.get("token") == token:
                            with self.lock:
                                self.answers.append((time.monotonic(), int(reply["net"])))
                        time.sleep(KEEP_INTERVAL)
            except (OSError, ValueError) as exc:
                with self.lock:
                    self.errors.append(f"{time.monotonic():.6f} {exc!r}")
                time.sleep(0.001)

    def command(self, words: list[str]) -> dict[str, Any]:
        if words[0] == "watch":
            with self.lock:
                self.token, self.beats = words[1].encode(), []
            return {"ok": True}
        if words[0] == "keep":
            with self.lock:
                self.answers, self.errors, self.connections = [], [], 0
            self.keeping = True
            self.keeper = threading.Thread(
                target=self.keep, args=(words[1], words[2], int(words[3])), daemon=True
            )
            self.keeper.start()
            return {"ok": True}
        if words[0] == "stop":
            self.keeping = False
            if self.keeper is not None:
                self.keeper.join()
                self.keeper = None
            with self.lock:
                out = {
                    "beats": [[round(t, 6), s] for t, s in self.beats],
                    "answers": [[round(t, 6), n] for t, n in self.answers],
                    "errors": self.errors,
                    "connections": self.connections,
                }
                self.token, self.beats, self.answers, self.errors = None, [], [], []
            return out
        if words[0] == "peek":  # the latest answer and beat: [t, net] and [t, sender]
            with self.lock:
                last = self.answers[-1] if self.answers else None
                beat = self.beats[-1] if self.beats else None
            return {"answer": last, "beat": beat}
        if words[0] == "ask":
            try:
                return ask(words[1], int(words[2]), words[3], 120.0)
            except (OSError, ValueError) as exc:
                return {"error": str(exc)}
        return {"error": f"unknown command {words[0]!r}"}


def client(address: str, hb_port: int) -> None:
    c = Client(address, hb_port)
    say(ready=True)
    for line in sys.stdin:
        if line.strip():
            say(**c.command(line.split()))


# -- bare CRIU --------------------------------------------------------------------------------


def run_with_status(cmd: list[str], what: str, log: str) -> subprocess.Popen[bytes]:
    """Start ``cmd`` with ``--status-fd``; it, once it wrote its ready byte (or fail, with
    the last error line of its ``log``)."""
    r, w = os.pipe()
    proc = subprocess.Popen([*cmd, "--status-fd", str(w)], pass_fds=(w,), stdin=subprocess.DEVNULL)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 600)
        if not ready or not os.read(r, 1):
            proc.wait()
            raise SystemExit(f"{what} never got ready (exit {proc.returncode}): {log_error(log)}")
    finally:
        os.close(r)
    return proc


def run_criu(cmd: list[str], what: str, log: str) -> None:
    """Run ``cmd`` to its end; fail with the last error line of its ``log``."""
    if subprocess.run(cmd, stdin=subprocess.DEVNULL, check=False).returncode != 0:
        raise SystemExit(f"{what} failed: {log_error(log)}")


def log_error(path: str) -> str:
    """The last ``Error`` line of a CRIU log (the first is a harmless rlimit complaint)."""
    try:
        with open(path, errors="replace") as fh:
            errors = [line.strip() for line in fh if "Error" in line]
    except OSError as exc:
        return f"(no log: {exc})"
    return errors[-1] if errors else "(no error line in its log)"


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def bare_send(a: argparse.Namespace) -> None:
    os.makedirs(a.dir)
    cmd = [criu(), "dump", "-t", str(a.pid), "-D", a.dir, "-W", a.dir, "-o", "dump.log"]
    before: set[tuple[str, str]] = set()
    if a.service:
        from torpor._migrate import _netlock

        cmd += ["--tcp-established", "--network-lock", "nftables"]
        before = _netlock.tables()
    t0 = time.monotonic()
    dump = None
    if a.lazy_port is None:
        run_criu(cmd, "criu dump", os.path.join(a.dir, "dump.log"))
    else:
        dump = run_with_status(
            [*cmd, "--lazy-pages", "--port", str(a.lazy_port)],
            "criu dump",
            os.path.join(a.dir, "dump.log"),
        )
    dumped = time.monotonic()
    if a.service:
        from torpor._migrate import _address

        _address.take_down(_address.parse(a.service))
        # The name of CRIU's lock table, for the target's own lock (see bare_receive).
        with open(os.path.join(a.dir, LOCK_FILE), "w") as fh:
            fh.write(" ".join(sorted(name for _, name in _netlock.new_criu_tables(before))))
    nbytes = dir_bytes(a.dir)
    with socket.create_connection((a.address, a.port), timeout=60) as sock:
        sock.settimeout(None)  # a socket with a timeout is non-blocking: tar would get EAGAIN
        tar = ["tar", "-c", "-C", a.dir, "--exclude", "dump.log", "."]
        subprocess.run(tar, stdout=sock.fileno(), check=True)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # the receiver closes once it has unpacked everything
    sent = time.monotonic()
    say(start=t0, dumped=dumped, sent=sent, bytes=nbytes)
    if dump is not None:
        if dump.wait() != 0:
            raise SystemExit(f"criu dump --lazy-pages failed (exit {dump.returncode})")
        say(served=time.monotonic())
    shutil.rmtree(a.dir)


def bare_receive(a: argparse.Namespace) -> None:
    os.makedirs(os.path.dirname(a.log), exist_ok=True)
    os.close(os.open(a.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
    os.makedirs(a.dir)
    srv = socket.create_server((a.listen, a.port))
    print("listening", flush=True)
    conn, _ = srv.accept()
    with conn:
        t0 = time.monotonic()
        subprocess.run(["tar", "-x", "-C", a.dir], stdin=conn.fileno(), check=True)
        received = time.monotonic()
    srv.close()
    pidfile = os.path.join(a.dir, "restored.pid")
    restore = [criu(), "restore", "-D", a.dir, "-W", a.dir, "-o", "restore.log", "-d"]
    restore += ["--pidfile", pidfile]
    daemon = None
    if a.lazy_from:
        source, port = a.lazy_from.rsplit(":", 1)
        daemon = run_with_status(
            [criu(), "lazy-pages", "-D", a.dir, "-W", a.dir, "-o", "lazy-pages.log",
             "--page-server", "--address", source, "--port", port],
            "criu lazy-pages",
            os.path.join(a.dir, "lazy-pages.log"),
        )  # fmt: skip
        restore.append("--lazy-pages")
    lock = None
    if a.service:
        from torpor._migrate import _address, _netlock

        addr = _address.parse(a.service)
        restore += ["--tcp-established", "--network-lock", "nftables"]
        with open(os.path.join(a.dir, LOCK_FILE)) as fh:
            criu_lock = fh.read().split()
        # No RST to the peer before its socket is back. Named as the dump's lock table, which
        # CRIU's restore deletes when it unlocks (before the sockets send their window probes),
        # as torpor's target does: lifted only after the restore, it would drop those probes.
        lock = _netlock.block("bare", [addr], criu=criu_lock[0] if len(criu_lock) == 1 else None)
        _address.bring_up(addr)
        _address.announce(addr)
    ready = time.monotonic()
    run_criu(restore, "criu restore", os.path.join(a.dir, "restore.log"))
    if lock is not None:
        _netlock.drop(lock)  # if the restore left it
    restored = time.monotonic()
    with open(pidfile) as fh:
        pid = int(fh.read())
    say(start=t0, received=received, ready=ready, restored=restored, pid=pid)
    if daemon is not None:
        if daemon.wait() != 0:
            raise SystemExit(f"criu lazy-pages failed (exit {daemon.returncode})")
        say(resident=time.monotonic())
    shutil.rmtree(a.dir)


def cleanup(service: str) -> None:
    from torpor._migrate import _address, _netlock

    _address.take_down(_address.parse(service))
    for table in _netlock.new_criu_tables(set()):
        _netlock.drop(table)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="kind", required=True)
    x = sub.add_parser("app")
    for name in ("size", "token", "client", "hb_port", "bind", "port"):
        x.add_argument(name)
    x = sub.add_parser("client")
    x.add_argument("address")
    x.add_argument("hb_port", type=int)
    x = sub.add_parser("bare-send")
    x.add_argument("pid", type=int)
    x.add_argument("dir")
    x.add_argument("address")
    x.add_argument("port", type=int)
    x.add_argument("--lazy-port", type=int)
    x.add_argument("--service")
    x = sub.add_parser("bare-receive")
    x.add_argument("listen")
    x.add_argument("port", type=int)
    x.add_argument("dir")
    x.add_argument("log")
    x.add_argument("--lazy-from")
    x.add_argument("--service")
    x = sub.add_parser("cleanup")
    x.add_argument("service")
    a = p.parse_args(argv)
    if a.kind == "app":
        app(int(a.size), a.token, a.client, int(a.hb_port), a.bind, int(a.port))
    elif a.kind == "client":
        client(a.address, a.hb_port)
    elif a.kind == "bare-send":
        bare_send(a)
    elif a.kind == "bare-receive":
        bare_receive(a)
    else:
        cleanup(a.service)


if __name__ == "__main__":
    main(sys.argv[1:])
