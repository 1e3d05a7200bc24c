#!/usr/bin/env python3
"""Where the torch app's time goes AFTER its resume (issue 10): restored copies, asked at once.

The torch app (``lazy_app.py torch``) is started and checkpointed once (torpor's dump, as
``bench_restore.py --lazy`` does). Then ``--reps`` rounds, every variant once per round in an
order that rotates, after an untimed warm-up round; each variant is a bare CRIU restore of the
image (``criu restore -d``, so the restored root is known and nothing of torpor's command path
is timed), and as soon as ``criu restore`` has returned (the copy runs) the copy is asked
``ASK`` three times. Per answer: its wall time, and from ``/proc`` the copy's minor and major
faults (the faults the daemon served showed up as minor ones here, majflt stayed 0-2), its
threads' CPU time and run-queue wait (``schedstat``), its context switches (voluntary: it
slept, e.g. on a fault; involuntary: preempted), the daemon's CPU time and the whole
machine's busy time (``/proc/stat``) meanwhile. The original process is asked the same way
before the dump (its inference alone).

Variants:

- ``full``           ``criu restore -d``
- ``lazy -v2``       ``criu lazy-pages`` (CRIU's default log level) + ``restore --lazy-pages``
- ``lazy -v4``       the same daemon at ``-v4``, as torpor runs it (it logs every fault)
- ``full+prefault``  ``full``, then ``prefault.prefault`` of the copy before the first answer
- ``lazy -v4+prefault``  likewise
- ``lazy -v4 warm``  from a warm image (``_eager.warm_image``), its warm set kept across the
                     rounds as torpor keeps one (each restore's faults added)
- ``... resident``   the daemon waited for (every page in) before the first ``ASK``: the floor
                     without the background push
- ``... stop``       the push held (``pause.PushPause``, window ``pause.WINDOW``) from the
                     moment ``criu restore`` returned, faults still served (unsafe: see
                     ``bench/pause.py``)
- ``... nice`` / ``... idle``  the daemon at nice 19 / ``SCHED_IDLE``

``prefault`` (``bench/prefault.py``) maps the copy's file-backed pages; its own time is
reported apart and counts in the variant's total. The per-round differences from ``full`` and
from ``lazy -v4 warm`` are printed at the end.

    .venv/bin/python bench/bench_torch_parts.py [--reps 5] [--variants "full,lazy -v4 warm,..."]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import select
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lazy_rows
import pause as _pause
import prefault as _prefault
from bench_restore import (
    become_subreaper,
    criu_binary,
    kill,
    private_home,
    quiesce,
    reap,
    reap_orphans,
)

from torpor._lazy import _daemon, _eager, _warm
from torpor._lazy._pagemap import load_pagemaps

PAUSE = _pause.WINDOW  # seconds: the window of a "stop" variant (runs out by itself)
VARIANTS = ("full", "lazy -v4 warm", "lazy -v4 warm stop", "lazy -v4 warm resident")


def counters(pid: int) -> dict[str, int]:
    """minflt, majflt (the thread group's) and the threads' CPU and run-queue wait, ns."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
        f = fh.read().rsplit(")", 1)[1].split()
    cpu = wait = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as fh:
                a, b, _ = fh.read().split()
        except OSError:
            continue
        cpu += int(a)
        wait += int(b)
    out = {"minflt": int(f[7]), "majflt": int(f[9]), "cpu_ns": cpu, "wait_ns": wait}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
        for line in fh:
            key, _, val = line.partition(":")
            if key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                out[key[:4]] = int(val)
    return out


def busy_ns() -> int:
    """CPU time all CPUs spent not idle (``/proc/stat``), ns."""
    with open("/proc/stat", encoding="ascii") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) * 10**9 // os.sysconf("SC_CLK_TCK")


def timed_ask(port: int, pid: int, daemon: int | None = None) -> dict[str, float]:
    """One ``ASK`` of the copy: wall ms and the deltas of its counters (and of the daemon's
    CPU time, and of the whole machine's busy time)."""
    before = counters(pid)
    d0 = counters(daemon)["cpu_ns"] if daemon is not None else 0
    b0 = busy_ns()
    t0 = time.perf_counter()
    lazy_rows.ask(port)
    wall = time.perf_counter() - t0
    after = counters(pid)
    after["busy_ns"], before["busy_ns"] = busy_ns(), b0
    if daemon is not None:
        with contextlib.suppress(OSError):
            after["daemon_ns"], before["daemon_ns"] = counters(daemon)["cpu_ns"], d0
    out: dict[str, float] = {"ms": wall * 1000}
    for k in before:
        d = after[k] - before[k]
        out[k.replace("_ns", "_ms")] = d / 1e6 if k.endswith("_ns") else d
    return out


def restore(
    img: Path, wdir: Path, *, lazy: bool, verbosity: str, sched: str = ""
) -> tuple[int, Any, float]:
    """A bare restore; (root pid, daemon or None, seconds the restore took)."""
    criu = criu_binary()
    pidfile = wdir / "pid"
    cmd = [criu, "restore", "-D", str(img), "-d", "--pidfile", str(pidfile), "-W", str(wdir)]
    cmd += ["-o", "restore.log"]
    daemon = None
    t0 = time.perf_counter()
    if lazy:
        r, w = os.pipe()
        argv = [criu, "lazy-pages", "-D", str(img), "-W", str(wdir), "-o", "lazy-pages.log"]
        argv += ["--status-fd", str(w)] + ([verbosity] if verbosity else [])
        daemon = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  pass_fds=(w,), start_new_session=True)  # fmt: skip
        os.close(w)
        if sched == "nice":
            os.setpriority(os.PRIO_PROCESS, daemon.pid, 19)
        elif sched == "idle":
            os.sched_setscheduler(daemon.pid, os.SCHED_IDLE, os.sched_param(0))
        ready, _, _ = select.select([r], [], [], 10.0)
        ok = bool(ready) and os.read(r, 1) == b"\0"
        os.close(r)
        if not ok:
            raise RuntimeError(f"criu lazy-pages never got ready; see {wdir}")
        cmd.append("--lazy-pages")
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return int(pidfile.read_text()), daemon, time.perf_counter() - t0


def faults_in_log(log: Path) -> int:
    try:
        return sum(1 for line in log.read_text(errors="replace").splitlines() if "#PF" in line)
    except OSError:
        return -1


class Warm:
    """A warm set kept across the rounds as torpor keeps one (``_restore._save_warm``): the
    faults of each ``warm`` restore's first ``_warm.WINDOW`` s added to the set it used."""

    def __init__(self, image: Any) -> None:
        self.image = image
        self.ranges: list[Any] = []

    def directory(self, wdir: Path) -> tuple[Path, int]:
        """The warm image to restore from (or the image itself), and its eager bytes."""
        if not self.ranges:
            return Path(self.image.path), 0
        made = _eager.warm_image(self.image, self.ranges, wdir / "warm")
        return (made[0], made[1]) if made is not None else (Path(self.image.path), 0)

    def add(self, log: Path) -> None:
        got = _eager.faults(log, load_pagemaps(Path(self.image.path)), window=_warm.WINDOW,
                            limit=_warm.MAX_BYTES)  # fmt: skip
        if got:
            merged = list(dict.fromkeys([*self.ranges, *got]))
            self.ranges = _warm.coalesce(_warm.clip(merged))


def one(
    variant: str, img: Path, port: int, work: Path, seq: int, warm: Warm | None = None
) -> dict[str, Any]:
    wdir = work / f"v{seq}"
    wdir.mkdir()
    lazy = variant.startswith("lazy")
    verbosity = "-v4" if "-v4" in variant else ""
    sched = "nice" if " nice" in variant else "idle" if " idle" in variant else ""
    eager = 0
    if " warm" in variant and warm is not None:
        img, eager = warm.directory(wdir)
    pid, daemon, restore_s = restore(img, wdir, lazy=lazy, verbosity=verbosity, sched=sched)
    row: dict[str, Any] = {"variant": variant, "restore_ms": restore_s * 1000, "warm": eager}
    pause = None
    held: list[int] = []
    try:
        t0 = time.perf_counter()
        if " resident" in variant and daemon is not None:
            daemon.wait(timeout=120)  # every page in: the floor without the push
            t0 = time.perf_counter()
        if " stop" in variant and daemon is not None:
            pidfd = os.pidfd_open(daemon.pid)
            try:
                held = [_daemon._pidfd_getfd(pidfd, fd) for fd in _daemon._uffds(daemon.pid)]
            finally:
                os.close(pidfd)
            pause = _pause.PushPause(daemon.pid, held, pid, most=PAUSE)
        if variant.endswith("+prefault"):
            st = _prefault.prefault(pid)
            row["prefault_ms"] = (time.perf_counter() - t0) * 1000
            row["prefault"] = st.__dict__
        running = daemon is not None and daemon.poll() is None
        first = timed_ask(port, pid, daemon.pid if running else None)
        row["first_total_ms"] = (time.perf_counter() - t0) * 1000
        row["asks"] = [first, timed_ask(port, pid), timed_ask(port, pid)]
        if pause is not None:  # its window runs out by itself
            pause.wait(PAUSE + 5)
            pause.close()
            row["pause_ms"] = ((pause.ended_at or 0) - pause.started_at) * 1000
            row["pause_faults"] = pause.faults
        if daemon is not None:
            daemon.wait(timeout=120)
            row["daemon_pf"] = faults_in_log(wdir / "lazy-pages.log")
            if " warm" in variant and warm is not None:
                warm.add(wdir / "lazy-pages.log")
    finally:
        if pause is not None:
            pause.close()
        for fd in held:
            os.close(fd)
        kill(pid)
        reap(pid)
        if daemon is not None and daemon.poll() is None:
            kill(daemon.pid)
            daemon.wait()
        shutil.rmtree(wdir, ignore_errors=True)
    return row


def line(row: dict[str, Any]) -> str:
    """One step, for the log."""
    a = row["asks"][0]
    return (
        f"resume→answer {row['first_total_ms']:.1f} ms (cpu {a['cpu_ms']:.1f}, run queue "
        f"{a['wait_ms']:.1f}, minflt {a['minflt']}, majflt {a['majflt']}, daemon cpu "
        f"{a.get('daemon_ms', 0):.1f}, machine busy {a['busy_ms']:.0f}, ctxt sw "
        f"{a['volu']}/{a['nonv']}), 2nd {row['asks'][1]['ms']:.1f} ms, daemon #PF "
        f"{row.get('daemon_pf')}, warm {row['warm'] >> 10} KiB, pause "
        f"{row.get('pause_ms', 0):.0f} ms / {row.get('pause_faults')} faults"
    )


def paired(rows: list[dict[str, Any]], base: str) -> list[str]:
    """Per variant: the median of its per-round difference from ``base`` (first answer after
    the resume), with a 95 % bootstrap interval."""
    by: dict[str, list[float]] = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r["first_total_ms"])
    out = []
    for v, xs in by.items():
        if v == base or base not in by:
            continue
        d = [a - b for a, b in zip(xs, by[base], strict=False)]
        rng = random.Random(1)
        boots = sorted(statistics.median(rng.choices(d, k=len(d))) for _ in range(2000))
        out.append(f"{v} minus {base}: {statistics.median(d):+.1f} ms "
                   f"[{boots[50]:+.1f}, {boots[1949]:+.1f}] ({len(d)} rounds)")  # fmt: skip
    return out


def summary(rows: list[dict[str, Any]]) -> str:
    keys = ("ms", "cpu_ms", "wait_ms", "minflt", "majflt")
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    out = ["| variant | n | prefault ms | resume→1st answer ms | 1st: " + ", ".join(keys)
           + " | 2nd: " + ", ".join(keys) + " | daemon #PF |",
           "|---|---:|---:|---:|---|---|---:|"]  # fmt: skip
    for v, rs in by.items():

        def med(xs: list[float]) -> str:
            return f"{statistics.median(xs):.1f}" if xs else "—"

        cells = [v, str(len(rs)), med([r.get("prefault_ms", 0.0) for r in rs]),
                 med([r["first_total_ms"] for r in rs])]  # fmt: skip
        for i in (0, 1):
            cells.append(" / ".join(med([r["asks"][i][k] for r in rs]) for k in keys))
        cells.append(med([r["daemon_pf"] for r in rs if "daemon_pf" in r]))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if int(Path("/proc/sys/fs/pipe-max-size").read_text()) < 4 << 20:
        subprocess.run(["sysctl", "-q", "-w", "fs.pipe-max-size=4194304"], check=True)
    become_subreaper()
    rows: list[dict[str, Any]] = []
    original: list[dict[str, float]] = []
    with private_home() as home:
        from torpor._engine import DumpOptions
        from torpor._process import _dump

        work = home / "bench"
        work.mkdir()
        port = lazy_rows.free_port()
        cmd = [sys.executable, str(lazy_rows.LAZY_APP), "--port", str(port), "torch"]
        cold, rec, _ = lazy_rows.launch(cmd, "torch-parts", port, "torch app")
        print(f"cold start to first answer: {cold:.3f} s", flush=True)
        for _ in range(8):
            original.append(timed_ask(port, rec.pid))
        image = _dump.checkpoint_pid(rec.pid, work / "img", DumpOptions(), name="torch-parts")
        reap(rec.keeper_pid)
        img = Path(image.path)
        warm = Warm(image)
        seq = 0
        try:
            for v in variants:  # warm-up round
                seq += 1
                one(v, img, port, work, seq, warm)
                reap_orphans()
            for r in range(args.reps):
                k = r % len(variants)
                for v in variants[k:] + variants[:k]:
                    seq += 1
                    time.sleep(0.3)
                    quiesce(512 << 20, work)
                    row = one(v, img, port, work, seq, warm)
                    rows.append(row)
                    print(f"round {r + 1} {v}: {line(row)}", flush=True)
                    reap_orphans()
        finally:
            reap_orphans()
    o = original[2:]
    print("\noriginal process, ASK (8, first 2 dropped): median "
          + ", ".join(f"{k} {statistics.median(x[k] for x in o):.1f}" for k in o[0]))  # fmt: skip
    print(summary(rows))
    for base in ("full", "lazy -v4 warm"):
        for text in paired(rows, base):
            print(text)
    if args.json:
        args.json.write_text(json.dumps({"original": original, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
