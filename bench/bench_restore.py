#!/usr/bin/env python3
"""Restore benchmark: torpor against a cold start and against bare CRIU, side by side in one run.

(a) The demo app (numpy + pandas, a 1M-row index; ``src/torpor/_demo/app.py``), time from the
    start of each method until the app answers its first ``STATS``:

    - ``cold start``        ``_manage.run`` of the app (what a restart costs)
    - ``torpor restore``    the CLI as a user runs it (``torpor restore IMAGE``), a subprocess:
                            handed to the agent (``torpor agent start``, started by this
                            script), and with ``TORPOR_AGENT=off`` (in-process, no agent)
    - ``_manage.restore``   torpor's API (checksums verified, the default)
    - ``... verify=False``  the API without checksum verification (where the time goes)
    - ``criu restore``      bare ``criu restore -D IMAGE -d`` of the same image (default -v2)
    - ``criu restore -v4``  the same at torpor's log level (where the time goes)

(b) A process holding 100 MiB / 500 MiB / 2 GiB of touched, incompressible memory: dump time and
    restore time and GB/s (image bytes / seconds), torpor's API and ``torpor restore`` (through
    the agent) against bare ``criu``.

(c) ``--lazy``: lazy (post-copy) restore, ``torpor restore --lazy`` against a full ``torpor
    restore``, bare ``criu restore`` and bare ``criu lazy-pages`` + ``criu restore --lazy-pages``:
    time to first answer and to fully resident of the demo app, a torch app and a 1 GiB app whose
    answer touches 20 MiB, optionally also from a real Ceph pool (``--ceph``); see
    ``bench/lazy_rows.py``. Only (c): ``--lazy --no-demo --sizes ''``; ``--quick`` for few rounds.

Repetitions are interleaved (every method once per round, in rotating order) after an untimed
warm-up round; each figure is the median and the min of N rounds. In (b) every timed step starts
from warm memory and a clean page cache (see :func:`quiesce`: this VM returns idle memory to its
host, and touching it again is ~20x slower). Markdown tables go to stdout;
raw samples (JSON), the tables and a plot go to ``bench/out/`` (gitignored); ``--publish`` copies
the plot to ``bench/restore.png``.

Run as root, from the repo: ``.venv/bin/python bench/bench_restore.py [--reps N] [--publish]``.
State lives in a temporary ``TORPOR_HOME`` that is removed at the end; every process started is
stopped by pid.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "out"
VENV_BIN = Path(sys.executable).parent
TORPOR_CLI = VENV_BIN / "torpor"

PR_SET_CHILD_SUBREAPER = 36
READY_TIMEOUT = 120.0

# The memory process for (b): fills N bytes with PCG64 output (incompressible) in 64 MiB steps,
# says so on stdout, then sleeps. As pid 1 of its PID namespace it is stopped with SIGKILL.
MEM_APP = """\
import signal, sys
import numpy as np
n = int(sys.argv[1])
a = np.empty(n // 8, dtype=np.uint64)
bits = np.random.default_rng(12345).bit_generator
step = 8 << 20
for i in range(0, a.size, step):
    a[i : i + step] = bits.random_raw(min(step, a.size - i))
print("ready", a.nbytes, flush=True)
while True:
    signal.pause()
"""

DEMO_METHODS = (
    "cold start",
    "torpor restore (CLI, agent)",
    "torpor restore (CLI, no agent)",
    "_manage.restore (API)",
    "_manage.restore verify=False",
    "criu restore -d",
    "criu restore -d -v4",
)
BARE = "criu restore -d"


# -- processes --------------------------------------------------------------------------------


def become_subreaper() -> None:
    """Orphans (the roots ``criu restore -d`` leaves, keepers of finished CLI runs) become our
    children, so we reap them at once: this VM's init reaps late."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def reap(pid: int, timeout: float = 30.0) -> None:
    """Wait for ``pid`` to end; reap it if it is our child."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            if not alive(pid):
                return
        else:
            if done == pid:
                return
        time.sleep(0.005)
    raise RuntimeError(f"pid {pid} did not end within {timeout:.0f}s")


def kill(pid: int) -> None:
    """SIGKILL ``pid`` (if still there)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def reap_orphans() -> None:
    """Reap every ended child (call only when no ``subprocess.Popen`` is pending)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def stop_managed(pid: int, keeper_pid: int) -> None:
    """Stop a keeper-managed process and wait for its keeper to record it and exit."""
    kill(pid)
    reap(keeper_pid)


_CRIU: list[str] = []


def criu_binary() -> str:
    """The CRIU torpor would use, looked up without filling torpor's per-process cache: the
    keepers forked from here must pay for their own lookup, as they do for any API user."""
    from torpor._engine import find_criu

    if not _CRIU:
        _CRIU.append(find_criu.__wrapped__())
    return _CRIU[0]


def forget_criu() -> None:
    """Empty torpor's CRIU lookup cache here (an in-process checkpoint fills it), so that each
    API restore costs what it costs a process that only restores: the keeper forked for it
    looks CRIU up again (``criu --version``)."""
    from torpor._engine import find_criu

    find_criu.cache_clear()


# -- the demo app (a) -------------------------------------------------------------------------


@dataclass
class DemoBench:
    """The demo app's image and how to bring it up each way."""

    rows: int
    port: int
    image: Any  # torpor Image
    token: str
    work: Path
    seq: int = 0

    def _name(self, kind: str) -> str:
        self.seq += 1
        return f"bench-{kind}-{self.seq}"

    def wait_answer(self, since: float) -> tuple[float, int]:
        """Seconds from ``since`` until the app answers STATS with the image's token; the
        answering host pid."""
        from torpor._demo import _runner

        # Any pid: a bare or CLI restore's pid is known only once it runs.
        elapsed, stats = _runner.wait_ready(self.port, None, since=since, timeout=READY_TIMEOUT)
        if stats.token != self.token:
            raise RuntimeError(f"pid {stats.pid} answered with another token")
        return elapsed, stats.pid

    def cold(self) -> float:
        from torpor._demo import _runner
        from torpor._process import _manage

        t0 = time.perf_counter()
        rec = _manage.run(_runner.app_command(self.port, self.rows), name=self._name("cold"))
        seconds, _ = _runner.wait_ready(self.port, [rec.pid], since=t0, log_path=rec.log_path)
        stop_managed(rec.pid, rec.keeper_pid)
        return seconds

    def api(self, *, verify: bool = True) -> float:
        from torpor._process import _manage

        forget_criu()
        t0 = time.perf_counter()
        [rec] = _manage.restore(self.image, names=[self._name("api")], verify=verify)
        seconds, pid = self.wait_answer(t0)
        assert pid == rec.pid, (pid, rec.pid)
        stop_managed(rec.pid, rec.keeper_pid)
        return seconds

    def cli(self, *, agent: bool) -> float:
        from torpor._process import _registry

        name = self._name("cli")
        env = dict(os.environ, TORPOR_AGENT="on" if agent else "off")
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [str(TORPOR_CLI), "-q", "restore", str(self.image.path), "--name", name],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        seconds, pid = self.wait_answer(t0)
        out, err = proc.communicate(timeout=READY_TIMEOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"torpor restore failed: {err.decode()}")
        assert out.split() == [name.encode(), str(pid).encode()], out
        stop_managed(pid, _registry.load(name).keeper_pid)
        return seconds

    def bare(self, *, verbose: bool = False) -> float:
        self.seq += 1
        pidfile = self.work / f"bare-{self.seq}.pid"
        cmd = [criu_binary(), "restore", "-D", str(self.image.path), "-d"]
        cmd += ["--pidfile", str(pidfile), "-W", str(self.work), "-o", f"restore-{self.seq}.log"]
        if verbose:
            cmd.append("-v4")
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        seconds, pid = self.wait_answer(t0)
        if proc.wait(timeout=READY_TIMEOUT) != 0:
            raise RuntimeError(f"criu restore failed; see {self.work}")
        assert int(pidfile.read_text()) == pid
        kill(pid)
        reap(pid)  # we are the subreaper its criu parent left it to
        return seconds

    def run(self, method: str) -> float:
        """One timed bring-up by ``method`` (one of DEMO_METHODS)."""
        fn: dict[str, Callable[[], float]] = {
            "cold start": self.cold,
            "torpor restore (CLI, agent)": lambda: self.cli(agent=True),
            "torpor restore (CLI, no agent)": lambda: self.cli(agent=False),
            "_manage.restore (API)": self.api,
            "_manage.restore verify=False": lambda: self.api(verify=False),
            "criu restore -d": self.bare,
            "criu restore -d -v4": lambda: self.bare(verbose=True),
        }
        return fn[method]()


def make_demo_image(rows: int, work: Path) -> DemoBench:
    """Start the demo app, give it some state, checkpoint it: the image every restore uses."""
    from torpor._demo import _runner
    from torpor._engine import DumpOptions
    from torpor._process import _dump, _manage

    _runner.warm_page_cache()
    port = _runner.free_port()
    t0 = time.perf_counter()
    rec = _manage.run(_runner.app_command(port, rows), name="bench-demo")
    _runner.wait_ready(port, [rec.pid], since=t0, log_path=rec.log_path)
    client = _runner.connect(port)
    try:
        for key in _runner.KEYS:
            client.ask(f"LOOKUP {key}")
        token = client.stats().token
    finally:
        client.close()
    image = _dump.checkpoint_pid(rec.pid, work / "demo-image", DumpOptions(), name="demo-image")
    reap(rec.keeper_pid)
    return DemoBench(rows=rows, port=port, image=image, token=token, work=work)


def bench_demo(rows: int, reps: int, work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    demo = make_demo_image(rows, work)
    log(f"demo image: {demo.image.manifest.total_bytes / 2**20:.1f} MiB; warm-up round")
    for method in DEMO_METHODS:
        demo.run(method)
        reap_orphans()
    samples: dict[str, list[float]] = {m: [] for m in DEMO_METHODS}
    # Each bring-up starts from the same state: the last one's exits settled (the agent refills
    # its spare workers 0.3 s after a command), and memory for the app freshly touched (see
    # quiesce: memory this VM has handed back to its host is ~20x slower to fault in, which
    # otherwise decides the figures).
    warm_bytes = 512 << 20
    for r in range(reps):
        k = r % len(DEMO_METHODS)
        order = DEMO_METHODS[k:] + DEMO_METHODS[:k]
        for method in order:
            time.sleep(0.5)
            quiesce(warm_bytes, work)
            samples[method].append(demo.run(method))
            reap_orphans()
        log(f"demo round {r + 1}/{reps}: " + ", ".join(f"{samples[m][-1]:.3f}" for m in order))
    return {
        "rows": rows,
        "image_bytes": demo.image.manifest.total_bytes,
        "samples": samples,
    }


# -- memory processes (b) ---------------------------------------------------------------------


@dataclass
class Target:
    """A live process holding the memory: managed by a keeper, or a bare-restored root."""

    pid: int
    keeper_pid: int | None = None

    def reap_after_dump(self) -> None:
        # A dump stops the process; whoever parents it must reap it before the next restore.
        reap(self.keeper_pid if self.keeper_pid is not None else self.pid)


@dataclass
class MemSamples:
    image_bytes: list[int] = field(default_factory=list)
    dump_torpor: list[float] = field(default_factory=list)
    dump_bare: list[float] = field(default_factory=list)
    restore_torpor: list[float] = field(default_factory=list)
    restore_torpor_noverify: list[float] = field(default_factory=list)
    restore_cli: list[float] = field(default_factory=list)
    restore_bare: list[float] = field(default_factory=list)


def launch_mem_app(size: int, script: Path, name: str) -> tuple[Target, Path]:
    """Start a memory process (it fills its memory in the background); its log."""
    from torpor._paths import logs_dir
    from torpor._process import _manage

    rec = _manage.run([sys.executable, str(script), str(size)], name=name)
    return Target(rec.pid, rec.keeper_pid), logs_dir() / f"{name}.log"


def wait_mem_app(target: Target, log_path: Path) -> Target:
    """Wait until the memory process has filled its memory."""
    deadline = time.monotonic() + 600
    while not (log_path.exists() and "ready" in log_path.read_text()):
        if not alive(target.pid) or time.monotonic() > deadline:
            raise RuntimeError(f"the memory process did not come up; see {log_path}")
        time.sleep(0.05)
    return target


def dump_torpor(target: Target, dest: Path) -> tuple[float, Any]:
    from torpor._engine import DumpOptions
    from torpor._process import _dump

    t0 = time.perf_counter()
    image = _dump.checkpoint_pid(target.pid, dest, DumpOptions(), name=dest.name)
    seconds = time.perf_counter() - t0
    target.reap_after_dump()
    return seconds, image


def dump_bare(target: Target, dest: Path, work: Path) -> float:
    dest.mkdir()
    cmd = [criu_binary(), "dump", "-t", str(target.pid), "-D", str(dest)]
    cmd += ["-W", str(work), "-o", f"dump-{dest.name}.log"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    target.reap_after_dump()
    return seconds


def restore_torpor(image: Any, name: str, *, verify: bool = True) -> tuple[float, Target]:
    from torpor._process import _manage

    forget_criu()
    t0 = time.perf_counter()
    [rec] = _manage.restore(image, names=[name], verify=verify)
    return time.perf_counter() - t0, Target(rec.pid, rec.keeper_pid)


def restore_cli(src: Path, name: str) -> Target:
    """``torpor restore`` as a user runs it, handed to the agent; the restored process (the
    command returns once it runs)."""
    from torpor._process import _registry

    subprocess.run(
        [str(TORPOR_CLI), "-q", "restore", str(src), "--name", name],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        env=dict(os.environ, TORPOR_AGENT="on"),
    )
    rec = _registry.load(name)
    return Target(rec.pid, rec.keeper_pid)


def restore_bare(src: Path, work: Path) -> tuple[float, Target]:
    pidfile = work / f"{src.name}.pid"
    pidfile.unlink(missing_ok=True)
    cmd = [criu_binary(), "restore", "-D", str(src), "-d", "--pidfile", str(pidfile)]
    cmd += ["-W", str(work), "-o", f"restore-{src.name}.log"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0, Target(int(pidfile.read_text()))


def check_rss(target: Target, size: int) -> None:
    """The restored process really holds the memory (guards against timing an empty restore)."""
    with open(f"/proc/{target.pid}/status", encoding="ascii") as fh:
        rss_kb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    if rss_kb * 1024 < size * 0.95:
        raise RuntimeError(f"pid {target.pid} holds {rss_kb} KiB, expected {size >> 10}")


def huge_fraction(target: Target) -> float:
    """The share of the process's resident memory in transparent huge pages."""
    fields: dict[str, int] = {}
    with open(f"/proc/{target.pid}/smaps_rollup", encoding="ascii") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("Rss", "AnonHugePages"):
                fields[key] = int(rest.split()[0])
    return fields.get("AnonHugePages", 0) / max(fields.get("Rss", 1), 1)


def stop_target(target: Target) -> None:
    kill(target.pid)
    reap(target.keeper_pid if target.keeper_pid is not None else target.pid)


def quiesce(nbytes: int, work: Path, *, page_cache: bool = False) -> None:
    """Before each timed step: ``nbytes`` of memory freshly touched and freed (as anonymous
    memory, or also as page cache written to a scratch file when ``page_cache``), and no dirty
    pages left to write back.

    This VM hands memory that stayed free for more than ~2 s back to its host (free page
    reporting); the next touch of it is ~20x slower (measured: touching 2 GiB took 0.15 s when it
    was freed 1 s earlier, 3.4 s after 3 s, 6-7 s after 10 s). Touching anonymous memory alone
    did not warm what a dump's page cache then got: the first dump after the restores took
    3.1 s instead of 0.5-0.7 s unless a scratch file had been written first. Without this,
    whichever step came first after a pause paid for it, and the figures measured the VM.
    """
    if page_cache:
        scratch = work / "scratch"
        block = b"\x02" * (64 << 20)
        with open(scratch, "wb") as fh:
            for _ in range(max(nbytes // len(block), 1)):
                fh.write(block)
        scratch.unlink()
    os.sync()
    time.sleep(0.1)
    warm = b"\x01" * nbytes  # memset: every page touched
    del warm


MEM_RESTORES = ("torpor", "torpor-noverify", "torpor-cli", "criu")
MEM_DUMPS = ("torpor", "criu")


def bench_memory(size: int, reps: int, work: Path, log: Callable[[str], None]) -> MemSamples:
    """Dumps and restores of a process holding ``size`` bytes, interleaved, after a warm-up.

    Restores: one torpor image R (untimed dump) is restored each round by torpor (verify on),
    torpor (verify off) and bare criu, in rotating order; each copy's memory is checked, then it
    is stopped. Dumps: each round a fresh process fills its memory and is dumped by torpor, and
    another by bare criu, in alternating order (the same sequence for each); each image is deleted
    at once (its dirty pages are dropped, never written back). Dumps are of fresh processes, as a
    user dumps a running app (a restored copy differs: numpy backs big arrays with transparent
    huge pages, and a restore brings them back as 4 KiB pages).
    """
    script = work / "memapp.py"
    script.write_text(MEM_APP)
    s = MemSamples()
    label = f"{size >> 20} MiB"
    tag = f"{size >> 20}m"
    log(f"{label}: filling")
    target = wait_mem_app(*launch_mem_app(size, script, f"bench-mem-{tag}"))
    _, image = dump_torpor(target, work / f"ref-{size}")
    # Warm-up, untimed: every method once (touches fresh memory, settles the page cache).
    for method in MEM_RESTORES:
        stop_target(restore_one(method, image, work, f"bench-warm-{tag}-{method}"))
    for method in MEM_DUMPS:
        victim = wait_mem_app(*launch_mem_app(size, script, f"bench-warm-{tag}-d{method}"))
        dump_one(method, victim, work / f"warm-dump-{size}-{method}", work)
    seq = 0
    thp: dict[str, list[float]] = {m: [] for m in MEM_DUMPS}
    for r in range(reps):
        k = r % len(MEM_RESTORES)
        times: dict[str, float] = {}
        for method in MEM_RESTORES[k:] + MEM_RESTORES[:k]:
            seq += 1
            time.sleep(0.5)  # the agent refills its spare workers 0.3 s after a command
            quiesce(size + size // 4 + (64 << 20), work)
            t0 = time.perf_counter()
            copy = restore_one(method, image, work, f"bench-r-{tag}-{seq}")
            times[f"restore {method}"] = time.perf_counter() - t0
            check_rss(copy, size)
            stop_target(copy)
        order = MEM_DUMPS if r % 2 == 0 else MEM_DUMPS[::-1]
        for method in order:
            seq += 1
            victim = wait_mem_app(*launch_mem_app(size, script, f"bench-d-{tag}-{seq}"))
            thp[method].append(huge_fraction(victim))
            quiesce(size + size // 4 + (64 << 20), work, page_cache=True)
            times[f"dump {method}"] = dump_one(method, victim, work / f"dump-{size}-{seq}", work)
        s.image_bytes.append(image.manifest.total_bytes)
        s.restore_torpor.append(times["restore torpor"])
        s.restore_torpor_noverify.append(times["restore torpor-noverify"])
        s.restore_cli.append(times["restore torpor-cli"])
        s.restore_bare.append(times["restore criu"])
        s.dump_torpor.append(times["dump torpor"])
        s.dump_bare.append(times["dump criu"])
        reap_orphans()
        log(
            f"{label} round {r + 1}/{reps}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in times.items())
            + " (dumped memory in huge pages: "
            + ", ".join(f"{m} {v[-1]:.0%}" for m, v in thp.items())
            + ")"
        )
    shutil.rmtree(image.path)
    return s


def restore_one(method: str, image: Any, work: Path, name: str) -> Target:
    """Restore ``image`` by ``method`` (one of MEM_RESTORES); the restored process."""
    if method == "criu":
        return restore_bare(image.path, work)[1]
    if method == "torpor-cli":
        return restore_cli(image.path, name)
    return restore_torpor(image, name, verify=method == "torpor")[1]


def dump_one(method: str, victim: Target, dest: Path, work: Path) -> float:
    """Dump ``victim`` by ``method`` (one of MEM_DUMPS) into ``dest``, then delete the image;
    the seconds the dump took."""
    try:
        if method == "criu":
            return dump_bare(victim, dest, work)
        return dump_torpor(victim, dest)[0]
    finally:
        shutil.rmtree(dest, ignore_errors=True)


# -- report -----------------------------------------------------------------------------------


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def pct(a: float, b: float) -> str:
    return f"{(a - b) / b * 100:+.1f} %"


def paired(xs: list[float], bare: list[float]) -> tuple[float, float, float]:
    """The median of the per-round differences ``xs[i] - bare[i]`` (both measured in the same
    round, so slow spells of the VM hit both), with a 95 % bootstrap interval."""
    import random

    diffs = [x - b for x, b in zip(xs, bare, strict=True)]
    rng = random.Random(1)
    boots = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(2000))
    return statistics.median(diffs), boots[50], boots[1949]


def demo_table(d: dict[str, Any]) -> str:
    s = d["samples"]
    bare_med, bare_min = med(s[BARE]), min(s[BARE])
    cold = med(s["cold start"])
    lines = [
        f"Demo app ({d['rows']:,}-row index, image {d['image_bytes'] / 2**20:.1f} MiB), "
        f"start -> first answer, {len(s[BARE])} interleaved rounds:",
        "",
        "| method | median s | min s | vs bare criu (median) | vs bare criu (min) "
        "| paired Δ vs bare, median [95 % CI] | cold / this |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in DEMO_METHODS:
        xs = s[m]
        vs = "—" if m in (BARE, "cold start") else pct(med(xs), bare_med)
        vs_min = "—" if m in (BARE, "cold start") else pct(min(xs), bare_min)
        if m in (BARE, "cold start"):
            delta = "—"
        else:
            d_med, lo, hi = paired(xs, s[BARE])
            delta = (
                f"{d_med * 1000:+.1f} ms ({d_med / bare_med * 100:+.1f} %) "
                f"[{lo * 1000:+.1f}, {hi * 1000:+.1f}]"
            )
        lines.append(
            f"| {m} | {med(xs):.3f} | {min(xs):.3f} | {vs} | {vs_min} | {delta} "
            f"| {cold / med(xs):.1f}x |"
        )
    return "\n".join(lines)


def memory_table(results: dict[int, MemSamples]) -> str:
    lines = [
        "Touched incompressible memory: dump and restore, torpor API vs bare criu "
        "(GB/s = image bytes / median seconds, 1 GB = 1e9 B):",
        "",
        "| memory | image | dump torpor s | dump criu s | torpor over criu | dump GB/s t / c "
        "| restore torpor s | restore torpor (no verify) s | `torpor restore` (CLI, agent) s "
        "| restore criu s | API over criu | CLI over criu "
        "| restore GB/s API / CLI / criu |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size, s in results.items():
        img = med([float(b) for b in s.image_bytes])
        dt, db = med(s.dump_torpor), med(s.dump_bare)
        rt, rnv, rb = med(s.restore_torpor), med(s.restore_torpor_noverify), med(s.restore_bare)
        rc = med(s.restore_cli)
        lines.append(
            f"| {size >> 20} MiB | {img / 2**20:.0f} MiB "
            f"| {dt:.3f} (min {min(s.dump_torpor):.3f}) | {db:.3f} (min {min(s.dump_bare):.3f}) "
            f"| {pct(dt, db)} | {img / dt / 1e9:.2f} / {img / db / 1e9:.2f} "
            f"| {rt:.3f} (min {min(s.restore_torpor):.3f}) | {rnv:.3f} "
            f"| {rc:.3f} (min {min(s.restore_cli):.3f}) "
            f"| {rb:.3f} (min {min(s.restore_bare):.3f}) | {pct(rt, rb)} | {pct(rc, rb)} "
            f"| {img / rt / 1e9:.2f} / {img / rc / 1e9:.2f} / {img / rb / 1e9:.2f} |"
        )
    return "\n".join(lines)


def plot(demo: dict[str, Any] | None, mem: dict[int, MemSamples], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (demo is not None) + bool(mem)
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.8), squeeze=False)
    col = 0
    if demo is not None:
        ax = axes[0][col]
        col += 1
        s = demo["samples"]
        names = list(DEMO_METHODS)
        meds = [med(s[m]) for m in names]
        colors = ["#999999", "#1f77b4", "#6a8fb8", "#4c9be0", "#9cc7ee", "#d62728", "#f08080"]
        ax.barh(range(len(names)), meds, color=colors)
        for i, m in enumerate(names):
            ax.plot(s[m], [i] * len(s[m]), "k.", ms=3, alpha=0.6)
            ax.text(max(s[m]), i, f"  median {meds[i]:.3f}s", va="center", fontsize=8)
        ax.set_xlim(0, max(max(v) for v in s.values()) * 1.35)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("seconds to first answer (bar: median, dots: rounds)")
        ax.set_title(f"demo app ({demo['image_bytes'] / 2**20:.0f} MiB image)", fontsize=10)
    if mem:
        ax = axes[0][col]
        sizes = list(mem)
        series: list[tuple[str, Callable[[MemSamples], list[float]], str]] = [
            ("dump torpor", lambda s: s.dump_torpor, "#1f77b4"),
            ("dump criu", lambda s: s.dump_bare, "#d62728"),
            ("restore torpor", lambda s: s.restore_torpor, "#4c9be0"),
            ("restore torpor, no verify", lambda s: s.restore_torpor_noverify, "#9cc7ee"),
            ("torpor restore (CLI, agent)", lambda s: s.restore_cli, "#6a8fb8"),
            ("restore criu", lambda s: s.restore_bare, "#f08080"),
        ]
        width = 0.8 / len(series)
        for j, (label, get, color) in enumerate(series):
            rates = [
                med([float(b) for b in mem[z].image_bytes]) / med(get(mem[z])) / 1e9 for z in sizes
            ]
            xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(sizes))]
            ax.bar(xs, rates, width, label=label, color=color)
        ax.set_xticks(range(len(sizes)), [f"{z >> 20} MiB" for z in sizes])
        ax.set_ylabel("GB/s (image bytes / median seconds)")
        ax.set_title("dump and restore throughput", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"torpor vs bare CRIU — {platform.node()}, {time.strftime('%Y-%m-%d')}", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "?")
    criu = subprocess.run(
        [criu_binary(), "--version"], capture_output=True, text=True, check=False
    ).stdout.split("\n")[0]
    with open("/proc/meminfo", encoding="ascii") as fh:
        mem_kb = int(fh.readline().split()[1])
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpu": f"{cpu} x{os.cpu_count()}",
        "memory": f"{mem_kb / 2**20:.1f} GiB",
        "python": platform.python_version(),
        "criu": criu,
    }


# -- main ---------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


@contextlib.contextmanager
def private_home() -> Iterator[Path]:
    home = Path(tempfile.mkdtemp(prefix="torpor-bench-"))
    os.environ["TORPOR_HOME"] = str(home)
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def stop_agent(pid: int | None, log: Callable[[str], None]) -> None:
    """``torpor agent stop``; if it refuses (it found the agent not holding its socket), the
    agent this script started is killed by its pid."""
    from torpor import _agent
    from torpor._errors import TorporError

    try:
        _agent.stop()
    except TorporError as exc:
        log(f"agent stop: {exc}; killing the agent (pid {pid}) we started")
        if pid is not None:
            kill(pid)


def run_lazy(
    args: argparse.Namespace, home: Path, work: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    """Part (c), with a real Ceph pool started for it (``--ceph``) and stopped after."""
    import lazy_rows

    def go(pool: str | None) -> dict[str, Any]:
        return lazy_rows.bench_lazy(
            [a.strip() for a in args.lazy_apps.split(",") if a.strip()],
            args.lazy_reps,
            args.rows,
            parse_size(args.lazy_size),
            parse_size(args.lazy_touch),
            work,
            log,
            pool,
        )

    if not args.ceph:
        return go(None)
    if not lazy_rows.pool_lazy_supported():
        log("--ceph: this tree has no lazy restore from a pool (NAME@POOL --lazy): local only")
        return go(None)
    with lazy_rows.ceph_pool(home / "ceph", log) as pool:
        return go(pool)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=9, help="timed rounds for the demo app")
    parser.add_argument(
        "--mem-reps", type=int, default=6, help="timed rounds per memory size (even: balanced)"
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="demo app index rows")
    parser.add_argument("--sizes", default="100M,500M,2G", help="memory sizes ('' for none)")
    parser.add_argument("--no-demo", action="store_true", help="skip part (a)")
    parser.add_argument("--publish", action="store_true", help="copy the plot to bench/")
    parser.add_argument("--lazy", action="store_true", help="part (c): lazy restore rows")
    parser.add_argument(
        "--lazy-apps", default="demo,torch,1g", help="(c) apps: demo, torch, 1g (comma-separated)"
    )
    parser.add_argument("--lazy-reps", type=int, default=9, help="(c) timed rounds per app")
    parser.add_argument("--lazy-size", default="1G", help="(c) memory of the big app")
    parser.add_argument("--lazy-touch", default="20M", help="(c) what its answer touches")
    parser.add_argument(
        "--ceph", action="store_true", help="(c) also restore from a real Ceph pool"
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 rounds everywhere, smaller demo (development)"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_restore: needs root (CRIU)", file=sys.stderr)
        return 2
    if args.quick:
        args.reps = args.mem_reps = args.lazy_reps = 3
        args.rows = min(args.rows, 200_000)

    def log(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    OUT.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    become_subreaper()
    with private_home() as home:
        from torpor import _agent

        work = home / "bench"
        work.mkdir()
        info = machine()
        agent, _ = _agent.start()
        try:  # the agent is stopped also on a failure or Ctrl-C
            log(f"agent {agent.pid} serving {agent.socket}")
            log(f"machine: {info}")
            demo = None if args.no_demo else bench_demo(args.rows, args.reps, work, log)
            sizes = [parse_size(z) for z in args.sizes.split(",") if z.strip()]
            mem = {size: bench_memory(size, args.mem_reps, work, log) for size in sizes}
            lazy = run_lazy(args, home, work, log) if args.lazy else None
        finally:
            stop_agent(agent.pid, log)
            reap_orphans()

    report = ["Machine: " + "; ".join(f"{k}: {v}" for k, v in info.items()), ""]
    if demo is not None:
        report += [demo_table(demo), ""]
    if mem:
        report += [memory_table(mem), ""]
    if lazy is not None:
        import lazy_rows

        report += [lazy_rows.lazy_tables(lazy), ""]
    text = "\n".join(report)
    print(text)
    (OUT / f"results-{stamp}.md").write_text(text)
    raw = {
        "machine": info,
        "demo": demo,
        "memory": {str(k): v.__dict__ for k, v in mem.items()},
        "lazy": lazy,
        "args": {k: v for k, v in vars(args).items()},
    }
    (OUT / f"results-{stamp}.json").write_text(json.dumps(raw, indent=2))
    png = OUT / f"restore-{stamp}.png"
    if demo is not None or mem:
        plot(demo, mem, png)
        log(f"wrote {png} and {OUT}/results-{stamp}.{{md,json}}")
    if lazy is not None:
        import lazy_rows

        lazy_png = OUT / f"lazy-{stamp}.png"
        lazy_rows.lazy_plot(lazy, lazy_png)
        log(f"wrote {lazy_png}")
        if args.publish:
            shutil.copyfile(lazy_png, BENCH / "lazy.png")
            runs = BENCH / "runs"
            runs.mkdir(exist_ok=True)
            shutil.copyfile(OUT / f"results-{stamp}.json", runs / f"lazy-{stamp}.json")
    if args.publish and (demo is not None or mem):
        shutil.copyfile(png, BENCH / "restore.png")
        log(f"copied the plot to {BENCH / 'restore.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
