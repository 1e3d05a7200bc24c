#!/usr/bin/env python3
"""Pool benchmark: what deduplicated checkpoints cost, and what restoring from a pool costs.

(a) A process with a working set of ``--size-mb`` MiB (200 by default) changes ``--change`` of
    its pages (1 %, scattered) between checkpoints. Each of ``--checkpoints`` (10) real
    ``criu dump --leave-running`` images is pushed to a ``dir`` pool (and to ``ceph`` and ``s3``
    pools on a throw-away local cluster). Printed: per-checkpoint new bytes and push time,
    the total stored vs one full image (target < 1.5x), then what ``prune --keep 3`` + ``gc``
    leave.

(b) The last checkpoint restored with ``criu restore -d``: from its local image directory
    (verify + restore), and from each pool with a cold local cache (pull, which verifies every
    chunk and file, + restore) and a warm one (the cached copy re-verified + restore); each way
    once per round for ``--reps`` rounds after a warm-up restore, medians reported.

``--content random`` fills the working set with incompressible bytes (the default: dedup alone
has to do the work), ``--content text`` with word soup (zstd shrinks it ~3x, so the fixed costs
per checkpoint weigh more). Markdown tables go to stdout.

Run as root from the repo: ``.venv/bin/python bench/bench_pools.py [--no-cluster]``. Everything
lives in a temporary directory (TORPOR_HOME, images, the cluster) removed at the end; every
process started is stopped by pid.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PR_SET_CHILD_SUBREAPER = 36

# The working-set process: fills SIZE bytes, then on each SIGUSR1 rewrites 16 random bytes in
# CHANGE of its pages (scattered) and writes the generation number to STATUS (opened and closed
# each time: no file stays open across a dump).
APP = """\
import os, random, signal, sys, time
size, change, content, status = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
rng = random.Random(42)
if content == "random":
    data = bytearray(os.urandom(size))
else:
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randrange(2, 10)))
             for _ in range(5000)]
    data = bytearray()
    while len(data) < size:
        data += b" ".join(rng.choices(words, k=8192))
    del data[size:]
pages = size // 4096
gen = 0
pending = False
def on_usr1(signum, frame):
    global pending
    pending = True
signal.signal(signal.SIGUSR1, on_usr1)
def report():
    with open(status, "w") as fh:
        fh.write(str(gen))
report()
while True:
    if pending:
        pending = False
        for p in rng.sample(range(pages), int(pages * change)):
            off = p * 4096 + rng.randrange(4096 - 16)
            data[off:off + 16] = os.urandom(16)
        gen += 1
        report()
    time.sleep(0.01)
"""


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f}"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def wait_gen(status: Path, want: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if int(status.read_text() or -1) >= want:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    raise SystemExit(f"the working-set process did not reach generation {want}")


def gone(pid: int, timeout: float = 10.0) -> None:
    """Reap ``pid`` (we are its parent or subreaper)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.01)
    raise SystemExit(f"pid {pid} did not exit")


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    gone(pid)


def criu(*args: str, work: Path) -> float:
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    res = subprocess.run(
        ["criu", *args, "-W", str(work), "-o", f"{args[0]}.log"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    elapsed = time.perf_counter() - t
    if res.returncode != 0:
        log = (work / f"{args[0]}.log").read_text(errors="replace")[-2000:]
        raise SystemExit(f"criu {args[0]} failed:\n{log}")
    return elapsed


def dump(pid: int, dest: Path, work: Path) -> Any:
    from torpor._images import _manifest
    from torpor._images._image import staging
    from torpor._process._proc import facts

    with staging(dest) as st:
        criu("dump", "-t", str(pid), "-D", str(st.path), "--leave-running", work=work)
        cmdline, rss = facts(pid)
        return st.commit(
            lambda entries: _manifest.build(
                name=dest.name, pid=pid, files=entries, criu_version="4.2.1",
                cmdline=cmdline, rss_bytes=rss,
            )
        )  # fmt: skip


def restore(image_dir: Path, pid: int, work: Path) -> float:
    """``criu restore -d`` of ``image_dir``; the restored process is killed and reaped."""
    elapsed = criu("restore", "-D", str(image_dir), "-d", work=work)
    kill(pid)
    return elapsed


@contextmanager
def cluster(root: Path) -> Iterator[dict[str, Any]]:
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "ceph-cluster"), "start", str(root)],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    if res.returncode != 0:
        raise SystemExit(f"ceph-cluster start failed: {res.stderr.strip()}")
    try:
        yield json.loads(res.stdout)
    finally:
        subprocess.run(
            [sys.executable, str(REPO / "scripts" / "ceph-cluster"), "stop", str(root)],
            capture_output=True, timeout=180, check=False,
        )  # fmt: skip


def stored(pool: Any) -> int:
    return sum(pool.backend.size(k) for k in pool.backend.list(""))


def run(args: argparse.Namespace, tmp: Path, info: dict[str, Any] | None) -> None:
    from torpor._pools import create_pool, open_pool

    pools = ["default"]
    if info is not None:
        create_pool(
            "ceph", "ceph",
            {"ceph.conf": info["conf"], "ceph.user.name": info["rados_user"],
             "ceph.osd.pool_name": "bench", "ceph.osd.pg_num": "8"},
        )  # fmt: skip
        create_pool(
            "s3", "s3",
            {"s3.bucket": "bench", "s3.endpoint": info["s3_endpoint"], "s3.region": "us-east-1",
             "s3.access_key": info["s3_access_key"], "s3.secret_key": info["s3_secret_key"]},
        )  # fmt: skip
        pools += ["ceph", "s3"]
    opened = {name: open_pool(name) for name in pools}
    status = tmp / "status"
    size = args.size_mb << 20
    proc = subprocess.Popen(
        [sys.executable, "-c", APP, str(size), str(args.change), args.content, str(status)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True,
    )  # fmt: skip
    rows: list[list[Any]] = []
    first_raw = first_stored = 0
    last = None
    try:
        wait_gen(status, 0)
        for i in range(args.checkpoints):
            if i:
                os.kill(proc.pid, signal.SIGUSR1)
                wait_gen(status, i)
            t = time.perf_counter()
            image = dump(proc.pid, tmp / "images" / f"c{i}", tmp / "work")
            dump_s = time.perf_counter() - t
            row: list[Any] = [i, mib(image.manifest.total_bytes), f"{dump_s:.2f}"]
            for name, pool in opened.items():
                t = time.perf_counter()
                pushed = pool.push(image, f"c{i}")
                row += [mib(pushed.stored_bytes), f"{time.perf_counter() - t:.2f}"]
                if name == "default" and i == 0:
                    first_raw, first_stored = image.manifest.total_bytes, pushed.stored_bytes
            rows.append(row)
            if last is not None:
                shutil.rmtree(last.path)
            last = image
    finally:
        kill(proc.pid)
    assert last is not None
    headers = ["ckpt", "image MiB", "dump s"]
    for name in opened:
        headers += [f"new MiB ({name})", f"push s ({name})"]
    print(
        f"\n### (a) {args.checkpoints} checkpoints, {args.size_mb} MiB working set "
        f"({args.content}), {args.change:.0%} of its pages changed between them\n"
    )
    print(table(headers, rows))
    totals = [[n, mib(stored(p)), f"{stored(p) / first_stored:.3f}", f"{stored(p) / first_raw:.3f}"]
              for n, p in opened.items()]  # fmt: skip
    print()
    print(table(["pool", "stored MiB (all objects)", "÷ first push", "÷ full image (raw)"], totals))
    print(f"\nfull image: {mib(first_raw)} MiB raw, first push stored {mib(first_stored)} MiB")

    # (b) restore from the local directory, then from each pool (cold and warm cache);
    # every way once per round, after an untimed warm-up restore; medians of the rounds.
    from torpor._images._image import Image
    from torpor._paths import cache_dir

    pid = last.manifest.pid
    work = tmp / "work"
    name = f"c{args.checkpoints - 1}"
    restore(last.path, pid, work)
    samples: dict[str, list[tuple[float, float, float]]] = {}

    def local() -> tuple[float, float, float]:
        t = time.perf_counter()
        Image.open(last.path).verify()
        return 0.0, time.perf_counter() - t, restore(last.path, pid, work)

    def from_pool(pool: Any, cold: bool) -> tuple[float, float, float]:
        if cold:
            shutil.rmtree(cache_dir(), ignore_errors=True)
        t = time.perf_counter()
        pulled = pool.pull(name)
        spent = time.perf_counter() - t
        pull_s, verify_s = (spent, 0.0) if cold else (0.0, spent)
        return pull_s, verify_s, restore(pulled.path, pid, work)

    for _ in range(args.reps):
        samples.setdefault("local image directory", []).append(local())
        for pname, pool in opened.items():
            for cold in (True, False):
                label = f"{pname} pool, {'cold' if cold else 'warm'} cache"
                samples.setdefault(label, []).append(from_pool(pool, cold))
    rrows = []
    for label, runs in samples.items():
        pull_s, verify_s, restore_s = (statistics.median(x) for x in zip(*runs, strict=True))
        rrows.append([label, f"{pull_s:.2f}" if pull_s else "-",
                      f"{verify_s:.2f}" if verify_s else "(in pull)", f"{restore_s:.2f}",
                      f"{pull_s + verify_s + restore_s:.2f}"])  # fmt: skip
    print(
        f"\n### (b) restoring checkpoint {name} ({mib(last.manifest.total_bytes)} MiB), "
        f"median of {args.reps}\n"
    )
    print(table(["from", "pull s", "verify s", "criu restore s", "total s"], rrows))

    # what prune + gc leave
    grows = []
    for pname, pool in opened.items():
        before = stored(pool)
        pool.prune(3)
        t = time.perf_counter()
        stats = pool.gc()
        grows.append([pname, mib(before), mib(stored(pool)), stats.packs_deleted,
                      stats.packs_repacked, f"{time.perf_counter() - t:.2f}"])  # fmt: skip
    print("\n### prune --keep 3, then gc\n")
    print(table(["pool", "stored MiB before", "after", "packs deleted", "packs repacked",
                 "gc s"], grows))  # fmt: skip
    for pool in opened.values():
        pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--change", type=float, default=0.01)
    parser.add_argument("--checkpoints", type=int, default=10)
    parser.add_argument("--content", choices=("random", "text"), default="random")
    parser.add_argument("--reps", type=int, default=3, help="rounds of (b)")
    parser.add_argument("--no-cluster", action="store_true", help="dir pool only")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (criu)")
    # Restored processes become our children, so we reap them and their pids free at once.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-pools-"))
    os.environ["TORPOR_HOME"] = str(tmp / "home")
    try:
        if args.no_cluster:
            run(args, tmp, None)
        else:
            with cluster(tmp / "ceph") as info:
                run(args, tmp, info)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
