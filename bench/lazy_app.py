#!/usr/bin/env python3
"""The apps of the lazy-restore rows of ``bench_restore.py`` (issue 10): warm up, then answer.

Each listens on ``127.0.0.1:PORT`` and answers one line per connection: ``ASK`` gets a JSON line
``{"pid": ..., "token": ..., "answer": ...}`` (the token is drawn at start, so an answer proves
which warm-up it comes from); ``ALL`` gets a checksum of the whole state (to check, once fully
resident, that a restored copy holds the original's memory).

``mem SIZE TOUCH``  holds SIZE bytes of incompressible memory (PCG64 output); ``ASK`` sums TOUCH
                    bytes of it (a fixed window in the middle), so the first answer after a lazy
                    restore faults in about TOUCH bytes and no more.
``torch``           a small transformer encoder (4 layers, d_model 256, ~3.2 M parameters) built
                    and warmed up with a few inferences; ``ASK`` is one inference on a fixed
                    input. One intra-op thread: the machine has 2 shared cores.

Run: ``python lazy_app.py --port P mem 1G 20M`` or ``python lazy_app.py --port P torch``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Callable


def parse_size(text: str) -> int:
    """``1G``, ``20M``, ``512K`` or bytes."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def mem_app(size: int, touch: int) -> tuple[Callable[[], object], Callable[[], object]]:
    """(ask, all) of the memory app."""
    import numpy as np

    a = np.empty(size // 8, dtype=np.uint64)
    bits = np.random.default_rng(12345).bit_generator
    step = 8 << 20
    for i in range(0, a.size, step):
        a[i : i + step] = bits.random_raw(min(step, a.size - i))
    lo = max(a.size // 2 - touch // 16, 0)
    window = a[lo : lo + touch // 8]

    def ask() -> object:
        return int(window.sum(dtype=np.uint64))

    def everything() -> object:
        return int(a.sum(dtype=np.uint64))

    return ask, everything


def torch_app() -> tuple[Callable[[], object], Callable[[], object]]:
    """(ask, all) of the torch app."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=256, nhead=4, dim_feedforward=1024)
    model = torch.nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False).eval()
    x = torch.randn(32, 8, 256, generator=torch.Generator().manual_seed(1))

    def ask() -> object:
        with torch.inference_mode():
            return round(float(model(x).sum()), 3)

    for _ in range(3):  # warm-up: the first inferences allocate and pick kernels
        ask()

    def everything() -> object:
        return round(float(sum(float(p.double().sum()) for p in model.parameters())), 6)

    return ask, everything


def serve(port: int, ask: Callable[[], object], everything: Callable[[], object]) -> None:
    """Answer one request per connection, forever."""
    token = os.urandom(8).hex()
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(16)
    print("ready", token, flush=True)
    while True:
        conn, _ = srv.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buf = b""
            while b"\n" not in buf:
                data = conn.recv(256)
                if not data:
                    break
                buf += data
            request = buf.split(b"\n", 1)[0].strip()
            answer = everything() if request == b"ALL" else ask()
            reply = {"pid": os.getpid(), "token": token, "answer": answer}
            conn.sendall(json.dumps(reply).encode() + b"\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    sub = parser.add_subparsers(dest="kind", required=True)
    m = sub.add_parser("mem")
    m.add_argument("size")
    m.add_argument("touch")
    sub.add_parser("torch")
    args = parser.parse_args()
    if args.kind == "mem":
        ask, everything = mem_app(parse_size(args.size), parse_size(args.touch))
    else:
        ask, everything = torch_app()
    serve(args.port, ask, everything)
    return 0


if __name__ == "__main__":
    sys.exit(main())
