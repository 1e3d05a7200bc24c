"""The demo app: a service with a slow, realistic warm-up, worth restoring instead of restarting.

Run as ``python app.py --port PORT`` (``torpor demo`` does it under ``torpor run``). It imports
numpy and pandas, builds an in-memory index (a DataFrame of synthetic order rows, a groupby-built
lookup dict per SKU and a numpy matrix of SKU feature vectors), draws a random warm-up token, and
only then listens on ``127.0.0.1:PORT`` with ``SO_REUSEPORT``, so several restored copies of one
image can listen at once.

Line protocol, one request per line, one JSON answer per line, any number per connection:

- ``STATS`` -> ``{"token", "served", "rows", "keys", "warmup_seconds", "digest", "pid"}``:
  the warm-up token, how many LOOKUPs were served so far (STATS itself is not counted, so reading
  the state does not change it), the index size, how long the warm-up took, a digest of the index,
  and the host pid of the answering process (to tell restored copies apart; not part of the state).
- ``LOOKUP KEY`` -> the SKU's order count, units and revenue, and its most similar SKU.
- anything else -> ``{"error": ...}``.

The app is built to be checkpointed: no terminal, no file open for writing except the stdout and
stderr its keeper gives it (appended to a log), no threads of its own (OpenBLAS starts some; CRIU
dumps threads fine), ``poll`` rather than an epoll object, and every client connection closed by
the time its client has seen EOF. This file uses only the
standard library, numpy and pandas: it never imports torpor.
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()

import argparse  # noqa: E402 - the warm-up clock starts before any import
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import secrets  # noqa: E402
import selectors  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # type: ignore[import-untyped,unused-ignore]  # noqa: E402

DEFAULT_ROWS = 1_000_000
ROWS_PER_KEY = 20
FEATURES = 32


@dataclass
class Index:
    """What the warm-up builds: the rows, a per-SKU lookup dict and SKU feature vectors."""

    frame: Any  # a pandas DataFrame (pandas ships no type information)
    lookup: dict[str, tuple[int, int, float]]
    keys: list[str]
    features: np.ndarray[Any, np.dtype[np.float32]]
    digest: str


def build_index(rows: int, seed: int) -> Index:
    """Synthetic orders (SKU, store, units, price), aggregated per SKU, plus feature vectors.

    Deterministic for a given ``rows`` and ``seed``: every cold start builds the same index (its
    ``digest`` is equal); only the warm-up token tells two cold starts apart.
    """
    rng = np.random.default_rng(seed)
    n_keys = max(rows // ROWS_PER_KEY, 1)
    keys = [f"sku-{i:06d}" for i in range(n_keys)]
    key_of_row = rng.integers(0, n_keys, rows)
    frame = pd.DataFrame(
        {
            "sku": np.asarray(keys, dtype=object)[key_of_row],
            "store": rng.integers(0, 400, rows, dtype=np.int32),
            "units": rng.integers(1, 12, rows, dtype=np.int32),
            "price": np.round(rng.gamma(2.0, 15.0, rows), 2),
        }
    )
    frame["revenue"] = frame["units"] * frame["price"]
    per_key = frame.groupby("sku", sort=True).agg(
        orders=("units", "size"), units=("units", "sum"), revenue=("revenue", "sum")
    )
    lookup = {
        str(k): (int(o), int(u), round(float(r), 2))
        for k, o, u, r in zip(
            per_key.index, per_key["orders"], per_key["units"], per_key["revenue"], strict=True
        )
    }
    features = rng.standard_normal((n_keys, FEATURES)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    digest = hashlib.sha256()
    digest.update(features.tobytes())
    digest.update(json.dumps(sorted(lookup.items())).encode())
    return Index(frame, lookup, keys, features, digest.hexdigest()[:16])


def host_pid() -> int:
    """Our pid as the host sees it: /proc is the host's mount even inside our PID namespace,
    and it changes across a restore, so it is read on every request, never cached."""
    return int(os.readlink("/proc/self"))


@dataclass
class Service:
    """The warmed-up state and the request handlers."""

    index: Index
    token: str
    warmup_seconds: float
    served: int = 0
    _key_pos: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._key_pos = {k: i for i, k in enumerate(self.index.keys)}

    def answer(self, line: str) -> dict[str, Any]:
        """The answer to one request line."""
        verb, _, arg = line.strip().partition(" ")
        if verb == "STATS":
            return {
                "token": self.token,
                "served": self.served,
                "rows": len(self.index.frame),
                "keys": len(self.index.keys),
                "warmup_seconds": self.warmup_seconds,
                "digest": self.index.digest,
                "pid": host_pid(),
            }
        if verb == "LOOKUP":
            key = arg.strip()
            pos = self._key_pos.get(key)
            if pos is None:
                return {"error": f"unknown key {key!r}"}
            self.served += 1
            orders, units, revenue = self.index.lookup.get(key, (0, 0, 0.0))
            scores = self.index.features @ self.index.features[pos]
            scores[pos] = -np.inf
            similar = self.index.keys[int(np.argmax(scores))]
            return {
                "key": key,
                "orders": orders,
                "units": units,
                "revenue": revenue,
                "similar": similar,
            }
        return {"error": f"unknown request {verb!r} (STATS, LOOKUP KEY)"}


def serve(service: Service, port: int) -> None:
    """Answer requests on 127.0.0.1:``port`` until killed."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(128)
    listener.setblocking(False)
    # poll(2) keeps no kernel object between calls; an epoll fd would be one more thing to dump.
    sel = selectors.PollSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    buffers: dict[socket.socket, bytes] = {}
    print(
        f"ready on 127.0.0.1:{port}: {len(service.index.frame)} rows, "
        f"{len(service.index.keys)} keys, warm-up {service.warmup_seconds:.3f}s, "
        f"token {service.token}",
        flush=True,
    )
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is listener:
                try:
                    conn, _addr = listener.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(True)
                sel.register(conn, selectors.EVENT_READ, None)
                buffers[conn] = b""
                continue
            try:
                data = sock.recv(65536)
            except ConnectionError:
                data = b""
            if not data:  # the client is done: close now, so a checkpoint finds no connection
                sel.unregister(sock)
                buffers.pop(sock, None)
                sock.close()
                continue
            pending = buffers[sock] + data
            *lines, buffers[sock] = pending.split(b"\n")
            replies = b"".join(
                json.dumps(service.answer(raw.decode(errors="replace"))).encode() + b"\n"
                for raw in lines
                if raw.strip()
            )
            try:
                sock.sendall(replies)
            except ConnectionError:
                sel.unregister(sock)
                buffers.pop(sock, None)
                sock.close()


def _stop(signum: int, frame: Any) -> None:
    # As pid 1 of its PID namespace the app would ignore SIGTERM without a handler.
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    """Warm up, then serve."""
    parser = argparse.ArgumentParser(description="torpor's demo app")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    parser.add_argument("--seed", type=int, default=20240601)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    index = build_index(args.rows, args.seed)
    service = Service(
        index=index,
        token=secrets.token_hex(8),
        warmup_seconds=round(time.perf_counter() - _STARTED, 4),
    )
    serve(service, args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
