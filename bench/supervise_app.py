#!/usr/bin/env python3
"""The process ``bench_supervise.py`` checkpoints, crashes and restores (run under ``torpor run``).

It fills ``--size`` bytes with incompressible data (numpy PCG64 output, every page touched),
prints ``ready`` and then does one of three things, all single-threaded:

- ``mem``:   rewrites ``--change`` of its pages per second, scattered (the working set a
             periodic checkpoint has to copy again), and otherwise sleeps;
- ``serve``: answers ``ping`` on 127.0.0.1:``--port`` with ``pong <host pid> <answers>``; the host
             pid is read at each answer, so a restored copy says who it is;
- ``cpu``:   CPU-bound work units (BLAKE2b of a 256 KiB slice, then 8 bytes of the digest written
             back into it: one dirty page per unit, slices in turn) and every 50 ms writes
             ``<units> <CLOCK_MONOTONIC>`` to ``--status`` (opened and closed each time, so no
             file stays open across a dump).

SIGTERM ends it with status 0 (pid 1 of a PID namespace ignores SIGTERM without a handler).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import socket
import sys
import time
from types import FrameType

import numpy as np

SLICE = 256 << 10


def fill(size: int) -> np.ndarray:
    """``size`` bytes of incompressible data, every page touched."""
    a = np.empty(size // 8, dtype=np.uint64)
    bits = np.random.default_rng(12345).bit_generator
    step = 8 << 20
    for i in range(0, a.size, step):
        a[i : i + step] = bits.random_raw(min(step, a.size - i))
    return a


def host_pid() -> int:
    """The pid in the host's PID namespace (``/proc`` is the host's mount)."""
    return int(os.readlink("/proc/self"))


def mem_loop(a: np.ndarray, change: float) -> None:
    words_per_page = 4096 // 8
    pages = a.size // words_per_page
    rng = np.random.default_rng(7)
    per_tick = max(int(pages * change / 10), 1)
    while True:
        time.sleep(0.1)
        idx = rng.integers(0, pages, per_tick) * words_per_page
        a[idx] = rng.integers(0, 2**63, per_tick, dtype=np.uint64)


def serve_loop(port: int) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(64)
    answers = 0
    while True:
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(2.0)
            try:
                if conn.recv(16).strip() == b"ping":
                    answers += 1
                    conn.sendall(f"pong {host_pid()} {answers}\n".encode())
            except OSError:
                pass


def cpu_loop(a: np.ndarray, status: str) -> None:
    buf = a.view(np.uint8).data
    slices = len(buf) // SLICE
    units = 0
    next_report = 0.0
    while True:
        off = (units % slices) * SLICE
        digest = hashlib.blake2b(buf[off : off + SLICE], digest_size=8).digest()
        buf[off + (units * 4096) % SLICE : off + (units * 4096) % SLICE + 8] = digest
        units += 1
        now = time.monotonic()
        if now >= next_report:
            next_report = now + 0.05
            tmp = status + ".tmp"
            with open(tmp, "w", encoding="ascii") as fh:
                fh.write(f"{units} {now:.6f}\n")
            os.replace(tmp, status)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("mem", "serve", "cpu"))
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--change", type=float, default=0.01)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--status", default="")
    args = parser.parse_args()

    def on_term(signum: int, frame: FrameType | None) -> None:
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    a = fill(args.size)
    print("ready", a.nbytes, flush=True)
    if args.mode == "mem":
        mem_loop(a, args.change)
    elif args.mode == "serve":
        serve_loop(args.port)
    else:
        cpu_loop(a, args.status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
