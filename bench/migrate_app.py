#!/usr/bin/env python3
"""The programs ``bench_migrate.py`` runs on the lab's nodes (stdlib, plus numpy for the app).

``app SIZE TOKEN CLIENT HB_PORT PORT``
    Holds SIZE bytes of incompressible memory (PCG64 output, every page touched), then sends a
    UDP heartbeat ``TOKEN SEQ TIME_NS`` to ``CLIENT:HB_PORT`` every ~1 ms and answers TCP
    requests on ``0.0.0.0:PORT``, one line per connection: ``ASK`` sums a 1 MiB window of the
    memory, ``SUM`` the whole of it (a checksum: the copy on the target must answer the
    original's). Each answer is a JSON line ``{"token", "answer", "request"}``. The listening
    socket is bound to the wildcard address, so a copy restores on a host whose address differs.
``client ADDRESS HB_PORT``
    Runs on the lab's client for the whole bench; one command per stdin line, one JSON line
    answered on stdout. ``watch TOKEN``: record the arrival time (``time.monotonic()``, the
    clock every node of the lab shares) and sender of each heartbeat of TOKEN. ``poll TOKEN
    PORT ADDR...``: instead, ask ``ASK`` every ~5 ms over a new TCP connection, trying the
    addresses in turn (the one that last answered first), and record each successful answer.
    ``stop``: end the recording; answers ``{"arrivals": [[t, sender], ...]}``. ``ask ADDR PORT
    REQUEST``: one request, its answer (or ``{"error"}``).
``bare-send PID DIR RECEIVER_ADDR RECEIVER_PORT [LAZY_PORT]``  (on the source)
    Bare CRIU: ``criu dump -t PID -D DIR`` (with ``--lazy-pages --port LAZY_PORT``: the dump
    keeps serving the pages; its ``--status-fd`` says when the other files are written), then
    the directory as a tar stream over one TCP connection to the receiver. Prints a JSON line
    of monotonic times; a lazy dump is then waited for (it exits once every page was served).
``bare-receive LISTEN_ADDR PORT DIR LOG [SOURCE_ADDR LAZY_PORT]``  (on the target)
    Listens (``listening`` on stdout), receives the tar stream into DIR, then ``criu restore -D
    DIR -d`` (lazily: first ``criu lazy-pages --page-server --address SOURCE_ADDR --port
    LAZY_PORT``, waited for on its status fd, then ``restore --lazy-pages``). LOG is the app's
    stdout log, made empty if missing (it is opened ``O_APPEND``, so CRIU checks only that it
    exists). Prints a JSON line of monotonic times and the restored pid, then (lazy) waits for
    the daemon, which exits once every page has arrived.

The ``criu`` run is ``$CRIU`` (else ``criu`` on the PATH).
"""

from __future__ import annotations

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

POLL_INTERVAL = 0.005  # seconds between the TCP client's requests
ASK_TIMEOUT = 0.02  # seconds a TCP request may take before the next address is tried
HEARTBEAT = 0.001


def criu() -> str:
    return os.environ.get("CRIU") or shutil.which("criu") or "criu"


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


# -- the app ----------------------------------------------------------------------------------


def app(size: int, token: str, client: str, hb_port: int, port: int) -> None:
    import numpy as np

    a = np.empty(size // 8, dtype=np.uint64)
    bits = np.random.default_rng(12345).bit_generator
    step = 8 << 20
    for i in range(0, a.size, step):
        a[i : i + step] = bits.random_raw(min(step, a.size - i))
    window = a[: (1 << 20) // 8]
    srv = socket.create_server(("0.0.0.0", port), backlog=64)

    def serve() -> None:
        while True:
            conn, _ = srv.accept()
            with conn:
                request = conn.recv(64).strip().decode(errors="replace")
                part = a if request == "SUM" else window
                answer = int(part.sum(dtype=np.uint64))
                reply = {"token": token, "answer": answer, "request": request}
                conn.sendall(json.dumps(reply).encode() + b"\n")

    threading.Thread(target=serve, daemon=True).start()
    hb = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    print("ready", flush=True)
    seq = 0
    while True:
        hb.sendto(f"{token} {seq} {time.time_ns()}".encode(), (client, hb_port))
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
        self.arrivals: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.poller: threading.Thread | None = None
        self.polling = False
        threading.Thread(target=self.receive, daemon=True).start()

    def receive(self) -> None:
        while True:
            data, (sender, _) = self.sock.recvfrom(256)
            now = time.monotonic()
            token = data.split(b" ", 1)[0]
            with self.lock:
                if token == self.token:
                    self.arrivals.append((now, sender))

    def poll(self, token: str, port: int, addresses: list[str]) -> None:
        current = 0
        while self.polling:
            address = addresses[current]
            try:
                reply = ask(address, port, "ASK", ASK_TIMEOUT)
            except (OSError, ValueError):
                current = (current + 1) % len(addresses)
                continue
            if reply.get("token") == token:
                with self.lock:
                    self.arrivals.append((time.monotonic(), address))
            time.sleep(POLL_INTERVAL)

    def command(self, words: list[str]) -> dict[str, Any]:
        if words[0] == "watch":
            with self.lock:
                self.token, self.arrivals = words[1].encode(), []
            return {"ok": True}
        if words[0] == "poll":
            with self.lock:
                self.token, self.arrivals = None, []
            self.polling = True
            self.poller = threading.Thread(
                target=self.poll, args=(words[1], int(words[2]), words[3:]), daemon=True
            )
            self.poller.start()
            return {"ok": True}
        if words[0] == "stop":
            self.polling = False
            if self.poller is not None:
                self.poller.join()
                self.poller = None
            with self.lock:
                got, self.token, self.arrivals = self.arrivals, None, []
            return {"arrivals": [[round(t, 6), s] for t, s in got]}
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


def wait_status(r: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 600) -> None:
    """Wait for CRIU's ``--status-fd`` byte (it is ready), or fail if it ends first."""
    ready, _, _ = select.select([r], [], [], timeout)
    if not ready or not os.read(r, 1):
        proc.wait()
        raise SystemExit(f"{what} never got ready (exit {proc.returncode})")


def run_with_status(cmd: list[str], what: str) -> subprocess.Popen[bytes]:
    r, w = os.pipe()
    proc = subprocess.Popen([*cmd, "--status-fd", str(w)], pass_fds=(w,), stdin=subprocess.DEVNULL)
    os.close(w)
    try:
        wait_status(r, proc, what)
    finally:
        os.close(r)
    return proc


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def bare_send(pid: int, images: str, address: str, port: int, lazy_port: int | None) -> None:
    os.makedirs(images)
    cmd = [criu(), "dump", "-t", str(pid), "-D", images, "-W", images, "-o", "dump.log"]
    t0 = time.monotonic()
    dump = None
    if lazy_port is None:
        subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)
    else:
        dump = run_with_status([*cmd, "--lazy-pages", "--port", str(lazy_port)], "criu dump")
    dumped = time.monotonic()
    nbytes = dir_bytes(images)
    with socket.create_connection((address, port), timeout=60) as sock:
        sock.settimeout(None)  # a socket with a timeout is non-blocking: tar would get EAGAIN
        tar = ["tar", "-c", "-C", images, "--exclude", "dump.log", "."]
        subprocess.run(tar, stdout=sock.fileno(), check=True)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # the receiver closes once it has unpacked everything
    sent = time.monotonic()
    say(start=t0, dumped=dumped, sent=sent, bytes=nbytes)
    if dump is not None:
        if dump.wait() != 0:
            raise SystemExit(f"criu dump --lazy-pages failed (exit {dump.returncode})")
        say(served=time.monotonic())
    shutil.rmtree(images)


def bare_receive(
    listen: str, port: int, images: str, log: str, source: str | None, lazy_port: int | None
) -> None:
    os.makedirs(os.path.dirname(log), exist_ok=True)
    os.close(os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
    os.makedirs(images)
    srv = socket.create_server((listen, port))
    print("listening", flush=True)
    conn, _ = srv.accept()
    with conn:
        t0 = time.monotonic()
        subprocess.run(["tar", "-x", "-C", images], stdin=conn.fileno(), check=True)
        received = time.monotonic()
    srv.close()
    pidfile = os.path.join(images, "restored.pid")
    restore = [criu(), "restore", "-D", images, "-W", images, "-o", "restore.log", "-d"]
    restore += ["--pidfile", pidfile]
    daemon = None
    if lazy_port is not None:
        assert source is not None
        daemon = run_with_status(
            [
                criu(),
                "lazy-pages",
                "-D",
                images,
                "-W",
                images,
                "-o",
                "lazy-pages.log",
                "--page-server",
                "--address",
                source,
                "--port",
                str(lazy_port),
            ],
            "criu lazy-pages",
        )
        restore.append("--lazy-pages")
    daemon_ready = time.monotonic()
    subprocess.run(restore, check=True, stdin=subprocess.DEVNULL)
    restored = time.monotonic()
    with open(pidfile) as fh:
        pid = int(fh.read())
    say(start=t0, received=received, daemon_ready=daemon_ready, restored=restored, pid=pid)
    if daemon is not None:
        if daemon.wait() != 0:
            raise SystemExit(f"criu lazy-pages failed (exit {daemon.returncode})")
        say(resident=time.monotonic())
    shutil.rmtree(images)


def main(argv: list[str]) -> None:
    kind, args = argv[0], argv[1:]
    if kind == "app":
        app(int(args[0]), args[1], args[2], int(args[3]), int(args[4]))
    elif kind == "client":
        client(args[0], int(args[1]))
    elif kind == "bare-send":
        lazy = int(args[4]) if len(args) > 4 else None
        bare_send(int(args[0]), args[1], args[2], int(args[3]), lazy)
    elif kind == "bare-receive":
        source, lazy = (args[4], int(args[5])) if len(args) > 4 else (None, None)
        bare_receive(args[0], int(args[1]), args[2], args[3], source, lazy)
    else:
        raise SystemExit(f"unknown program {kind!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
