#!/usr/bin/env python3
"""Backend benchmark: push/pull throughput of the ``dir``, ``ceph`` and ``s3`` drivers.

Each driver stores and reads back objects of each size (4 MiB and 64 MiB by default) of
incompressible bytes, side by side in one run: ``put_stream`` (push) and ``get`` (pull), each
repeated until ``--mib`` MiB have moved (at least ``--reps`` times), after one warm-up round.
Reported: MiB/s of the median round, as a markdown table on stdout.

- ``dir``: files in a temporary directory (fsync'd: every put is durable).
- ``ceph``: a RADOS pool on a throw-away single-node cluster (``scripts/ceph-cluster``:
  one memstore OSD, so no disk is involved) through librados, 4 MiB stripes.
- ``s3``: a bucket on the same cluster's RGW through boto3 (8 MiB multipart parts, 4 at once).

Run from the repo: ``.venv/bin/python bench/bench_backends.py [--sizes 4,64] [--mib 256]``.
The cluster is started in a temporary directory and always stopped at the end, by the pids it
recorded; the directory is then removed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torpor._pools._backend import Backend
from torpor._pools._dir import DirBackend
from torpor._pools._rados import RadosBackend
from torpor._pools._s3 import S3Backend

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20


@contextmanager
def cluster(directory: Path) -> Iterator[dict[str, Any]]:
    """A Ceph cluster started by scripts/ceph-cluster in ``directory``, stopped on exit."""
    script = [sys.executable, str(REPO / "scripts" / "ceph-cluster")]
    try:
        res = subprocess.run(
            [*script, "start", str(directory)], capture_output=True, text=True, check=False
        )
        if res.returncode != 0:
            sys.exit(f"bench_backends: {res.stderr.strip()}")
        yield json.loads(res.stdout)
    finally:
        if (directory / "daemons.json").exists():
            subprocess.run([*script, "stop", str(directory)], check=True)


def rounds(size: int, mib: int, reps: int) -> int:
    return max(reps, mib * MIB // size)


def measure(action: Callable[[int], None], n: int) -> float:
    """Seconds of the median of ``n`` rounds of ``action(round)``, after one warm-up."""
    action(-1)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        action(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(backend: Backend, size: int, n: int) -> tuple[float, float]:
    """(push, pull) MiB/s for ``size``-byte objects."""
    data = os.urandom(size)
    key = f"bench/{size}"

    def push(i: int) -> None:
        backend.put_stream(f"{key}/{i}", io.BytesIO(data), size)

    def pull(i: int) -> None:
        if len(backend.get(f"{key}/{i}")) != size:
            raise SystemExit(f"bench_backends: short read of {key}/{i}")

    push_s = measure(push, n)
    pull_s = measure(pull, n)
    for k in list(backend.list(key + "/")):
        backend.delete(k)
    return size / MIB / push_s, size / MIB / pull_s


def machine() -> str:
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
         if ln.startswith("model name")), platform.processor(),
    )  # fmt: skip
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    return f"{platform.node()}: {os.cpu_count()} CPUs ({cpu}), {mem} GiB RAM, {platform.release()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="4,64", help="object sizes in MiB (default 4,64)")
    parser.add_argument("--mib", type=int, default=256, help="MiB moved per cell (default 256)")
    parser.add_argument("--reps", type=int, default=3, help="at least this many rounds")
    args = parser.parse_args()
    sizes = [int(s) * MIB for s in args.sizes.split(",")]

    with tempfile.TemporaryDirectory(prefix="torpor-bench-backends-") as tmp:
        with cluster(Path(tmp) / "ceph") as info:
            backends: dict[str, Callable[[], Backend]] = {
                "dir": lambda: DirBackend(Path(tmp) / "dir"),
                "ceph": lambda: RadosBackend(
                    info["conf"], info["cluster"], info["rados_user"], "bench", 8
                ),
                "s3": lambda: S3Backend(
                    info["s3_endpoint"], "bench", None, info["s3_access_key"],
                    info["s3_secret_key"],
                ),
            }  # fmt: skip
            results: dict[tuple[str, int], tuple[float, float]] = {}
            for name, make in backends.items():
                backend = make()
                try:
                    for size in sizes:
                        n = rounds(size, args.mib, args.reps)
                        results[name, size] = bench(backend, size, n)
                        print(f"bench_backends: {name} {size // MIB} MiB x{n}: "
                              f"push {results[name, size][0]:.0f} MiB/s, "
                              f"pull {results[name, size][1]:.0f} MiB/s",
                              file=sys.stderr, flush=True)  # fmt: skip
                finally:
                    backend.close()
        shutil.rmtree(Path(tmp) / "ceph", ignore_errors=True)

    print(f"Backends, {time.strftime('%Y-%m-%d')}, {machine()}\n")
    print("| driver | object | push MiB/s | pull MiB/s |")
    print("|---|---:|---:|---:|")
    for (name, size), (push, pull) in results.items():
        print(f"| {name} | {size // MIB} MiB | {push:.0f} | {pull:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
