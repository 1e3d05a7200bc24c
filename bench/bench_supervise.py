#!/usr/bin/env python3
"""Supervision benchmark (issue 8): what periodic checkpoints and automatic restore cost, side by
side in one run.

(1) Frozen time per checkpoint of a process holding ``--sizes`` (100 MiB and 1 GiB) of touched,
    incompressible memory that rewrites 1 % of its pages a second: ``torpor checkpoint NAME
    --leave-running --pool default --json`` (its ``frozen_ms``) against bare ``criu dump
    --leave-running -t PID -D <tmpfs dir>`` of the same running process (``frozen_time`` from
    the ``stats-dump`` CRIU writes). Target: torpor <= 1.1x bare CRIU.
(2) Crash to answering: a supervised server (``torpor run --checkpoint-every 1s``) is SIGKILLed
    at a random moment of its period; the time until it answers on its port again, against a
    plain ``torpor restore IMAGE@default`` of the checkpoint the supervisor restored, from the
    start of the command to the first answer. Target: <= restore + 50 ms.
(3) Throughput of a CPU-bound process holding 1 GiB, in work units per second over a fixed
    window (``--window``, 60 s), unsupervised and supervised at 1 s / 10 s / 60 s intervals;
    the loss is against the unsupervised window of the same round. Target: <= 5 % at 10 s.

Rounds are interleaved: in (1) the two methods alternate in order on the same process, in (3)
every configuration runs once per round in rotating order; in (2) each round is one fresh
supervised server, crashed, then restored by hand (the port is the server's, so the two cannot
run at once). The figures are medians over rounds with 95 % bootstrap intervals of the paired
(same-round) differences or ratios. Raw samples (JSON), tables and a plot go to ``bench/out/``;
``--publish`` also writes ``bench/RESULTS-supervise.md``, ``bench/supervise.png`` and the raw
samples to ``bench/runs/``.

Run as root from the repo: ``.venv/bin/python bench/bench_supervise.py [--quick] [--publish]``.
To measure the code as committed while others edit the checkout, run it from an export::

    d=$(mktemp -d) && git archive HEAD src bench | tar -x -C $d
    git rev-parse --short HEAD >$d/COMMIT
    PYTHONPATH=$d/src .venv/bin/python $d/bench/bench_supervise.py --publish --publish-dir bench

Everything lives in a temporary ``TORPOR_HOME`` (and a tmpfs directory for bare CRIU's images)
removed at the end, also on Ctrl-C; every process started is stopped by pid (pidfd).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_restore import (
    TORPOR_CLI,
    alive,
    become_subreaper,
    criu_binary,
    machine,
    med,
    paired,
    parse_size,
    private_home,
    quiesce,
    reap_orphans,
)

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "out"
APP = BENCH / "supervise_app.py"
INTERVALS = ("1s", "10s", "60s")
UNSUPERVISED = "unsupervised"
READY_TIMEOUT = 300.0


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- CRIU's stats-dump ------------------------------------------------------------------------


def frozen_ms(image_dir: Path) -> float:
    """``frozen_time`` of the CRIU ``stats-dump`` in ``image_dir``, in ms (torpor's parser)."""
    from torpor._images._stats import read_dump_stats_at

    stats = read_dump_stats_at(image_dir)
    if stats is None:
        raise RuntimeError(f"no readable stats-dump in {image_dir}")
    return stats.frozen_us / 1000.0


# -- processes --------------------------------------------------------------------------------


def signal_pid(pid: int, sig: int) -> None:
    """Send ``sig`` to ``pid`` through a pidfd (never to a process that reused the pid)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, sig)
    finally:
        os.close(fd)


def wait_gone(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"pid {pid} did not end within {timeout:.0f}s")
        reap_orphans()
        time.sleep(0.01)


def torpor(*args: str, check: bool = True, timeout: float = 600.0) -> str:
    """Run the torpor CLI as a user does; its stdout."""
    proc = subprocess.run(
        [str(TORPOR_CLI), "-q", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"torpor {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def has_option(command: str, option: str) -> bool:
    return option in torpor(command, "--help", check=False)


def managed_pid(name: str) -> int:
    from torpor._process import _registry

    return _registry.load(name).pid


@dataclass
class Janitor:
    """What this run started, to be stopped and removed at the end whatever happens."""

    names: list[str] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)

    def run(self, name: str, command: list[str], *, every: str | None = None) -> int:
        """``torpor run`` ``command`` as ``name`` (supervised every ``every``); its pid."""
        self.names.append(name)
        opts = ["--checkpoint-every", every] if every else []
        torpor("run", "--name", name, *opts, "--", *command)
        return managed_pid(name)

    def stop(self, name: str) -> None:
        """End ``name``: supervision first (so the kill is not a crash to restore), then it."""
        if name not in self.names:
            return
        self.names.remove(name)
        try:
            pid: int | None = managed_pid(name)
        except Exception:  # no record: it is gone already
            pid = None
        torpor("unsupervise", name, check=False)
        if pid is not None:
            signal_pid(pid, signal.SIGKILL)
            wait_gone(pid)
        torpor("kill", name, check=False)

    def cleanup(self) -> None:
        for name in list(self.names):
            try:
                self.stop(name)
            except Exception as exc:  # keep cleaning up the rest
                log(f"cleanup of {name}: {exc}")
        torpor("supervisor", "stop", check=False, timeout=60)
        with contextlib.suppress(Exception):
            from torpor import _agent

            _agent.stop()
        reap_orphans()
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


def staging_dir(home: Path) -> Path:
    """The tmpfs directory torpor stages ``--pool`` checkpoints of ``home`` in (see
    ``_process._topool.memory_staging``; it stays once made, and this home goes away)."""
    import hashlib

    tag = hashlib.sha256(os.fsencode(str(home))).hexdigest()[:12]
    return Path("/dev/shm") / f"torpor-{os.geteuid()}-{tag}"


def wait_log(name: str, word: str, pid: int, timeout: float = READY_TIMEOUT) -> None:
    from torpor._paths import logs_dir

    path = logs_dir() / f"{name}.log"
    deadline = time.monotonic() + timeout
    while not (path.exists() and word in path.read_text(errors="replace")):
        if not alive(pid) or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not come up; see {path}")
        time.sleep(0.05)


def app(mode: str, size: int, *extra: str) -> list[str]:
    return [sys.executable, str(APP), mode, "--size", str(size), *extra]


def events(name: str, kind: str) -> list[dict[str, Any]]:
    """The fields of ``name``'s supervision events of ``kind``, oldest first."""
    from torpor._supervise import _events  # type: ignore[attr-defined, unused-ignore]

    return [dict(e.fields) | {"time": e.time} for e in _events.read(name) if e.kind == kind]


# -- (1) frozen time per checkpoint -----------------------------------------------------------


@dataclass
class Frozen:
    """Per size: frozen ms and wall seconds of each method, one entry per round."""

    torpor_ms: list[float] = field(default_factory=list)
    criu_ms: list[float] = field(default_factory=list)
    torpor_s: list[float] = field(default_factory=list)
    criu_s: list[float] = field(default_factory=list)
    # Control: bare criu at torpor's log level (-v4), to tell the log's share of the freeze.
    criu_v4_ms: list[float] = field(default_factory=list)
    torpor_json: list[dict[str, Any]] = field(default_factory=list)


FROZEN_METHODS = ("torpor", "criu", "criu -v4")


def torpor_checkpoint(
    name: str, dest: Path, use_json: bool, outputs: list[dict[str, Any]]
) -> tuple[float, float]:
    """Frozen ms and wall seconds of one ``torpor checkpoint --leave-running``: into the
    default pool with ``--json`` when the CLI has it (its output appended to ``outputs``),
    else into a local image ``dest`` (whose stats-dump is read)."""
    t0 = time.perf_counter()
    if use_json:
        out = torpor("checkpoint", name, "--leave-running", "--pool", "default", "--json")
        seconds = time.perf_counter() - t0
        outputs.append(json.loads(out))
        frozen = outputs[-1]["frozen_ms"]
        if frozen is None:
            raise RuntimeError(f"torpor checkpoint --json gave no frozen_ms: {out.strip()}")
        return float(frozen), seconds
    torpor("checkpoint", name, "--leave-running", "-o", str(dest))
    seconds = time.perf_counter() - t0
    try:
        return frozen_ms(dest), seconds
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def criu_checkpoint(pid: int, dest: Path, *, v4: bool = False) -> tuple[float, float]:
    """Frozen ms and wall seconds of one bare ``criu dump --leave-running`` into ``dest``."""
    dest.mkdir()
    # CRIU's defaults, like torpor's: the log (dump.log) and stats-dump go to the image dir.
    cmd = [criu_binary(), "dump", "--leave-running", "-t", str(pid), "-D", str(dest)]
    cmd += ["-v4"] if v4 else []
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, check=False)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"criu dump failed: {proc.stderr.decode().strip()}")
        return frozen_ms(dest), seconds
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def bench_frozen(
    size: int, rounds: int, janitor: Janitor, work: Path, shm: Path, use_json: bool
) -> Frozen:
    tag = f"{size >> 20}m"
    name = f"bench-frz-{tag}"
    log(f"(1) {tag}: filling")
    pid = janitor.run(name, app("mem", size, "--change", "0.01"))
    wait_log(name, "ready", pid)
    seq = 0

    def one(method: str) -> tuple[float, float]:
        nonlocal seq
        seq += 1
        time.sleep(0.5)
        quiesce(size + size // 4 + (64 << 20), work, page_cache=True)
        if method == "torpor":
            return torpor_checkpoint(name, work / f"ck-{tag}-{seq}", use_json, s.torpor_json)
        return criu_checkpoint(pid, shm / f"ck-{tag}-{seq}", v4=method == "criu -v4")

    s = Frozen()
    for method in FROZEN_METHODS:  # warm-up, untimed: the first image in the pool
        one(method)
    s.torpor_json.clear()
    for r in range(rounds):
        k = r % len(FROZEN_METHODS)
        got = {m: one(m) for m in FROZEN_METHODS[k:] + FROZEN_METHODS[:k]}
        s.torpor_ms.append(got["torpor"][0])
        s.torpor_s.append(got["torpor"][1])
        s.criu_ms.append(got["criu"][0])
        s.criu_s.append(got["criu"][1])
        s.criu_v4_ms.append(got["criu -v4"][0])
        log(
            f"(1) {tag} round {r + 1}/{rounds}: frozen "
            + ", ".join(f"{m} {v[0]:.0f} ms ({v[1]:.2f} s)" for m, v in got.items())
        )
    janitor.stop(name)
    return s


# -- (2) crash to answering -------------------------------------------------------------------


def ask(port: int) -> int | None:
    """The host pid of whoever answers ``ping`` on ``port`` now, or None."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as conn:
            conn.sendall(b"ping\n")
            words = conn.recv(64).split()
    except OSError:
        return None
    if len(words) == 3 and words[0] == b"pong":
        return int(words[1])
    return None


def wait_answer(port: int, since: float, not_pids: set[int], timeout: float = 60.0) -> float:
    """Seconds from ``since`` until a process other than ``not_pids`` answers on ``port``."""
    deadline = since + timeout
    while time.perf_counter() < deadline:
        pid = ask(port)
        if pid is not None and pid not in not_pids:
            return time.perf_counter() - since
        time.sleep(0.001)
    raise RuntimeError(f"nothing new answered on port {port} within {timeout:.0f}s")


def wait_event(name: str, kind: str, count: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        got = events(name, kind)
        if len(got) >= count:
            return got
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: {count} {kind} event(s) not seen within {timeout:.0f}s")
        time.sleep(0.02)


@dataclass
class Crash:
    crash_s: list[float] = field(default_factory=list)
    # The plain restore with the local pull cache emptied first (as the supervisor finds it:
    # the checkpoint was pushed, never pulled), and again with the copy it then left there.
    restore_s: list[float] = field(default_factory=list)
    restore_warm_s: list[float] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    # Where the supervised time goes, from the supervisor's events: kill -> its crash event,
    # kill -> its restore event (the restore command done), and that command's own duration.
    to_crash_event_s: list[float] = field(default_factory=list)
    to_restore_event_s: list[float] = field(default_factory=list)
    restore_command_s: list[float] = field(default_factory=list)


def crash_round(r: int, size: int, janitor: Janitor, crash: Crash) -> None:
    from torpor._demo._runner import free_port

    port = free_port()
    name = f"bench-sup-{r}"
    pid0 = janitor.run(name, app("serve", size, "--port", str(port)), every="1s")
    wait_answer(port, time.perf_counter(), set(), timeout=READY_TIMEOUT)
    wait_event(name, "checkpoint", 2)
    time.sleep(random.uniform(0.0, 1.0))  # a random moment of the period
    t0, wall0 = time.perf_counter(), time.time()
    signal_pid(pid0, signal.SIGKILL)
    crash_s = wait_answer(port, t0, {pid0})
    [restore] = wait_event(name, "restore", 1)[-1:]
    [crashed] = wait_event(name, "crash", 1)[-1:]
    crash.to_crash_event_s.append(event_wall(crashed) - wall0)
    crash.to_restore_event_s.append(event_wall(restore) - wall0)
    crash.restore_command_s.append(float(restore.get("duration_s") or "nan"))
    image = str(restore.get("image") or "")
    if not image:
        raise RuntimeError(f"{name}: the restore event names no image: {restore}")
    pids = {pid0, managed_pid(name)}
    janitor.stop(name)
    source = image if "@" in image else f"{image}@default"
    from torpor._paths import cache_dir

    # This run's private home: its pull cache holds only what this bench pulled.
    shutil.rmtree(cache_dir() / "images", ignore_errors=True)
    cold = plain_restore(source, f"bench-plain-{r}", port, pids, janitor)
    warm = plain_restore(source, f"bench-warm-{r}", port, pids, janitor)
    crash.crash_s.append(crash_s)
    crash.restore_s.append(cold)
    crash.restore_warm_s.append(warm)
    crash.images.append(source)
    log(
        f"(2) round {r + 1}: crash->answer {crash_s:.3f} s, plain restore {cold:.3f} s "
        f"(cache emptied), {warm:.3f} s (cached)"
    )


def plain_restore(source: str, name: str, port: int, pids: set[int], janitor: Janitor) -> float:
    """Seconds from the start of ``torpor restore SOURCE`` until the copy answers on ``port``
    (the copy is stopped after)."""
    janitor.names.append(name)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [str(TORPOR_CLI), "-q", "restore", source, "--name", name],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    seconds = wait_answer(port, t0, pids)
    _, err = proc.communicate(timeout=READY_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"torpor restore {source}: {err.decode().strip()}")
    pids.add(managed_pid(name))
    janitor.stop(name)
    return seconds


def last_events(r: int) -> str:
    """The last supervision events of round ``r``'s server, for the report of a failure."""
    from torpor._supervise import _events

    try:
        got = _events.read(f"bench-sup-{r}")[-6:]
    except Exception as exc:
        return f"(unreadable: {exc})"
    return "; ".join(f"{e.kind} {dict(e.fields)}" for e in got)


def event_wall(event: dict[str, Any]) -> float:
    """An event's time as a Unix time (events are written in ISO 8601, UTC, ms)."""
    from datetime import datetime

    return datetime.fromisoformat(str(event["time"])).timestamp()


# -- (3) throughput ---------------------------------------------------------------------------


def read_status(path: Path) -> tuple[int, float]:
    units, when = path.read_text().split()
    return int(units), float(when)


@dataclass
class Window:
    rate: float
    checkpoints: int
    frozen_ms: list[float]
    # checkpoint-failed events in the window, and the first one's error (a failed checkpoint
    # costs a freeze too, and says why fewer checkpoints landed than the interval asks).
    failed: int = 0
    failed_error: str = ""


def tp_window(
    label: str, every: str | None, size: int, window: float, janitor: Janitor, shm: Path, r: int
) -> Window:
    name = f"bench-tp-{r}-{label}"
    status = shm / f"{name}.status"
    pid = janitor.run(name, app("cpu", size, "--status", str(status)), every=every)
    wait_log(name, "ready", pid)
    while not status.exists():
        time.sleep(0.05)
    time.sleep(2.0)  # past the first reports (and a supervised app's first checkpoint start)
    u0, t0 = read_status(status)
    time.sleep(window)
    u1, t1 = read_status(status)
    lo, hi = iso_utc(t0), iso_utc(t1)

    def in_window(kind: str) -> list[dict[str, Any]]:
        return [e for e in events(name, kind) if lo <= str(e["time"])[:23] <= hi] if every else []

    ckpts, failed = in_window("checkpoint"), in_window("checkpoint-failed")
    janitor.stop(name)
    frozen = [float(e["frozen_ms"]) for e in ckpts if e.get("frozen_ms") is not None]
    error = str(failed[0].get("error", "")) if failed else ""
    return Window((u1 - u0) / (t1 - t0), len(ckpts), frozen, len(failed), error)


def iso_utc(monotonic: float) -> str:
    """The UTC ISO time (ms) of a CLOCK_MONOTONIC reading, as event times are written."""
    wall = time.time() - (time.monotonic() - monotonic)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}"


def bench_throughput(
    size: int, intervals: tuple[str, ...], rounds: int, window: float, janitor: Janitor, shm: Path
) -> dict[str, list[Window]]:
    configs = (UNSUPERVISED, *intervals)
    got: dict[str, list[Window]] = {c: [] for c in configs}
    for r in range(rounds):
        k = r % len(configs)
        for label in configs[k:] + configs[:k]:
            every = None if label == UNSUPERVISED else label
            w = tp_window(label, every, size, window, janitor, shm, r)
            got[label].append(w)
            log(
                f"(3) round {r + 1}/{rounds} {label}: {w.rate:.0f} units/s, "
                f"{w.checkpoints} checkpoints in the window, {w.failed} failed {w.failed_error}"
            )
    return got


# -- report -----------------------------------------------------------------------------------


def ci(values: list[float]) -> tuple[float, float, float]:
    """Median of ``values`` (one per round) with a 95 % bootstrap interval."""
    return paired(values, [0.0] * len(values))


def fmt_ci(values: list[float], scale: float = 1.0, unit: str = "", digits: int = 1) -> str:
    m, lo, hi = ci(values)
    return f"{m * scale:.{digits}f}{unit} [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"


def frozen_table(frozen: dict[int, Frozen], mode: str) -> str:
    lines = [
        f"(1) Frozen time per checkpoint (CRIU's stats-dump frozen_time), torpor `{mode}` vs "
        "bare `criu dump --leave-running -D <tmpfs>` of the same running process; medians, "
        "ratio = median of the per-round torpor/criu ratios [95 % bootstrap CI]:",
        "",
        "| RSS | rounds | torpor frozen ms | criu frozen ms | torpor / criu (target <= 1.1x) "
        "| torpor command s | criu dump s | control: criu -v4 frozen ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size, s in frozen.items():
        ratios = [t / c for t, c in zip(s.torpor_ms, s.criu_ms, strict=True)]
        lines.append(
            f"| {size >> 20} MiB | {len(ratios)} | {med(s.torpor_ms):.0f} "
            f"(min {min(s.torpor_ms):.0f}) | {med(s.criu_ms):.0f} (min {min(s.criu_ms):.0f}) "
            f"| {fmt_ci(ratios, unit='x', digits=2)} | {med(s.torpor_s):.2f} "
            f"| {med(s.criu_s):.2f} | {med(s.criu_v4_ms):.0f} |"
        )
    return "\n".join(lines)


def crash_table(c: Crash, size: int) -> str:
    diffs = [a - b for a, b in zip(c.crash_s, c.restore_s, strict=True)]
    warm = [a - b for a, b in zip(c.crash_s, c.restore_warm_s, strict=True)]
    return "\n".join(
        [
            f"(2) Crash to answering, a {size >> 20} MiB server supervised at 1 s: SIGKILL -> "
            "it answers on its port again, vs a plain `torpor restore IMAGE@default` of the "
            "same checkpoint (start of the command -> first answer); medians:",
            "",
            "| rounds | crash -> answering s | plain restore -> answering s (cache emptied "
            "first, as the supervisor finds it) | paired Δ ms [95 % CI] (target <= +50 ms) "
            "| plain restore, image cached s | paired Δ vs cached ms |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {len(diffs)} | {med(c.crash_s):.3f} (min {min(c.crash_s):.3f}) "
            f"| {med(c.restore_s):.3f} (min {min(c.restore_s):.3f}) "
            f"| {fmt_ci(diffs, scale=1000.0, unit=' ms')} "
            f"| {med(c.restore_warm_s):.3f} (min {min(c.restore_warm_s):.3f}) "
            f"| {fmt_ci(warm, scale=1000.0, unit=' ms')} |",
            "",
            "Where the supervised time goes (medians, from the supervisor's events, ms "
            "resolution): SIGKILL -> crash event "
            f"{med(c.to_crash_event_s) * 1000:.0f} ms; SIGKILL -> restore event (its "
            f"`torpor restore` done) {med(c.to_restore_event_s) * 1000:.0f} ms; that "
            f"command's own duration {med(c.restore_command_s) * 1000:.0f} ms.",
            *(
                ["", f"Failed rounds ({len(c.failures)}, not in the figures above):"]
                + [f"- {f}" for f in c.failures]
                if c.failures
                else []
            ),
        ]
    )


def losses(tp: dict[str, list[Window]], label: str) -> list[float]:
    """Per-round throughput loss of ``label`` against the same round's unsupervised window."""
    return [1 - w.rate / u.rate for w, u in zip(tp[label], tp[UNSUPERVISED], strict=True)]


def throughput_table(tp: dict[str, list[Window]], size: int, window: float) -> str:
    lines = [
        f"(3) Throughput of a CPU-bound {size >> 20} MiB process (work units/s over a "
        f"{window:.0f} s window), loss against the same round's unsupervised window "
        "[95 % bootstrap CI]:",
        "",
        "| interval | rounds | units/s (median) | loss (target <= 5 % at 10s) "
        "| checkpoints in the window (+ failed), per round | frozen ms per checkpoint (median) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, ws in tp.items():
        rate = med([w.rate for w in ws])
        if label == UNSUPERVISED:
            lines.append(f"| {label} | {len(ws)} | {rate:.0f} | — | — | — |")
            continue
        frozen = [f for w in ws for f in w.frozen_ms]
        counts = ", ".join(f"{w.checkpoints}" + (f" (+{w.failed})" if w.failed else "") for w in ws)
        lines.append(
            f"| {label} | {len(ws)} | {rate:.0f} "
            f"| {fmt_ci(losses(tp, label), scale=100.0, unit=' %')} "
            f"| {counts} "
            f"| {f'{med(frozen):.0f}' if frozen else '—'} |"
        )
    return "\n".join(lines)


def plot(
    frozen: dict[int, Frozen], crash: Crash | None, tp: dict[str, list[Window]], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")  # type: ignore[no-untyped-call, unused-ignore]
    import matplotlib.pyplot as plt

    panels: list[Callable[[Any], None]] = []

    def frozen_panel(ax: Any) -> None:
        sizes = list(frozen)
        methods = (("torpor", "torpor_ms", "#1f77b4"), ("bare criu", "criu_ms", "#d62728"))
        for j, (label, attr, color) in enumerate(methods):
            xs = [i + (j - 0.5) * 0.38 for i in range(len(sizes))]
            ys = [getattr(frozen[z], attr) for z in sizes]
            ax.bar(xs, [med(y) for y in ys], 0.38, label=label, color=color)
            for x, y in zip(xs, ys, strict=True):
                ax.plot([x] * len(y), y, "k.", ms=3, alpha=0.6)
        ax.set_xticks(range(len(sizes)), [f"{z >> 20} MiB" for z in sizes])
        ax.set_ylabel("frozen ms per checkpoint (bar: median, dots: rounds)")
        ax.set_title("(1) frozen time, checkpoint --leave-running", fontsize=10)
        ax.legend(fontsize=8)

    def crash_panel(ax: Any) -> None:
        assert crash is not None
        data = [crash.crash_s, crash.restore_s, crash.restore_warm_s]
        ax.bar(range(3), [med(x) for x in data], color=["#1f77b4", "#d62728", "#f08080"])
        for i, xs in enumerate(data):
            ax.plot([i] * len(xs), xs, "k.", ms=3, alpha=0.6)
        names = ["crash -> answering\n(supervised)", "torpor restore\n(not cached)"]
        ax.set_xticks(range(3), [*names, "torpor restore\n(cached)"], fontsize=8)
        ax.set_ylabel("seconds to the first answer (bar: median, dots: rounds)")
        ax.set_title("(2) crash to answering", fontsize=10)

    def tp_panel(ax: Any) -> None:
        labels = [c for c in tp if c != UNSUPERVISED]
        ls = [[x * 100 for x in losses(tp, c)] for c in labels]
        ax.bar(range(len(labels)), [med(x) for x in ls], color="#1f77b4")
        for i, xs in enumerate(ls):
            ax.plot([i] * len(xs), xs, "k.", ms=4, alpha=0.7)
        ax.axhline(5.0, color="#d62728", ls="--", lw=1, label="target at 10s: 5 %")
        ax.set_xticks(range(len(labels)), [f"every {c}" for c in labels])
        ax.set_ylabel("throughput loss % vs unsupervised (same round)")
        ax.set_title("(3) CPU-bound app, periodic checkpoints", fontsize=10)
        ax.legend(fontsize=8)

    if frozen:
        panels.append(frozen_panel)
    if crash is not None and crash.crash_s:
        panels.append(crash_panel)
    if len(tp) > 1:
        panels.append(tp_panel)
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.6), squeeze=False)
    for ax, draw in zip(axes[0], panels, strict=True):
        draw(ax)
    fig.suptitle(f"torpor supervision — {time.strftime('%Y-%m-%d')}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def code_state() -> dict[str, str]:
    """The commit this ran on, and whether the code differed from it (others' work in
    progress shares this checkout)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(BENCH.parent), *args], capture_output=True, text=True, check=False
        ).stdout.rstrip()

    exported = BENCH.parent / "COMMIT"
    if exported.exists():  # a `git archive` of one commit (see --help): the code as committed
        return {"commit": exported.read_text().strip(), "uncommitted": "none (git archive)"}
    dirty = git("status", "--porcelain", "--", "src", "bench/bench_supervise.py", str(APP))
    return {
        "commit": git("rev-parse", "--short=7", "HEAD"),
        "uncommitted": ", ".join(line[3:] for line in dirty.splitlines()) or "none",
    }


# -- main ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def interrupts_as_keyboard() -> Iterator[None]:
    """SIGTERM and SIGHUP end the run like Ctrl-C, so the cleanup runs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds for (1) and (2)")
    parser.add_argument("--tp-rounds", type=int, default=3, help="rounds for (3)")
    parser.add_argument("--sizes", default="100M,1G", help="RSS sizes for (1) ('' for none)")
    parser.add_argument("--serve-size", default="100M", help="the server's memory in (2)")
    parser.add_argument("--tp-size", default="1G", help="the CPU-bound app's memory in (3)")
    parser.add_argument("--window", type=float, default=60.0, help="(3)'s window, seconds")
    parser.add_argument("--intervals", default=",".join(INTERVALS), help="(3)'s intervals")
    parser.add_argument("--parts", default="1,2,3", help="which parts to run")
    parser.add_argument("--no-agent", action="store_true", help="do not start torpor's agent")
    parser.add_argument("--quick", action="store_true", help="smoke mode, under a minute")
    parser.add_argument("--note", default="", help="a sentence for RESULTS-supervise.md")
    parser.add_argument("--publish", action="store_true", help="write RESULTS-supervise.md")
    parser.add_argument(
        "--publish-dir",
        type=Path,
        default=BENCH,
        help="the bench/ directory to publish into (when this runs from an export of a commit)",
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.tp_rounds, args.sizes, args.serve_size = 1, 1, "100M", "50M"
        args.tp_size, args.window, args.intervals = "100M", 4.0, "1s"
    if os.geteuid() != 0:
        print("bench_supervise: needs root (CRIU)", file=sys.stderr)
        return 2
    parts = {p.strip() for p in args.parts.split(",")}
    OUT.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    become_subreaper()
    janitor = Janitor()
    frozen: dict[int, Frozen] = {}
    crash: Crash | None = None
    tp: dict[str, list[Window]] = {}
    info: dict[str, str] = {}
    with private_home() as home, interrupts_as_keyboard():
        shm = Path(tempfile.mkdtemp(prefix="torpor-bench-", dir="/dev/shm"))
        janitor.dirs += [shm, staging_dir(home)]
        work = home / "bench"
        work.mkdir()
        try:
            info = machine() | code_state()
            log(f"machine: {info}")
            if not args.no_agent:
                from torpor import _agent

                agent, _ = _agent.start()
                log(f"agent {agent.pid} serving {agent.socket}")
            use_json = has_option("checkpoint", "--json")
            mode = (
                "checkpoint --leave-running --pool default --json"
                if use_json
                else "checkpoint --leave-running -o <local dir>"
            )
            info["torpor checkpoint"] = mode
            if "1" in parts:
                for z in (parse_size(x) for x in args.sizes.split(",") if x.strip()):
                    frozen[z] = bench_frozen(z, args.rounds, janitor, work, shm, use_json)
            supervised = has_option("run", "--checkpoint-every")
            if ("2" in parts or "3" in parts) and not supervised:
                log("(2), (3) skipped: this torpor has no `torpor run --checkpoint-every` yet")
            if "2" in parts and supervised:
                crash = Crash()
                for r in range(args.rounds):
                    try:
                        crash_round(r, parse_size(args.serve_size), janitor, crash)
                    except RuntimeError as exc:  # a round that failed is a result too
                        crash.failures.append(f"round {r + 1}: {exc}; events: {last_events(r)}")
                        log(f"(2) round {r + 1} FAILED: {crash.failures[-1]}")
                        janitor.stop(f"bench-sup-{r}")
            if "3" in parts and supervised:
                intervals = tuple(x.strip() for x in args.intervals.split(",") if x.strip())
                tp = bench_throughput(
                    parse_size(args.tp_size), intervals, args.tp_rounds, args.window, janitor, shm
                )
        except KeyboardInterrupt:
            log("interrupted: cleaning up")
            return 130
        except Exception:  # report what was measured before it
            import traceback

            failed = traceback.format_exc()
            log(f"the run failed, reporting what it measured:\n{failed}")
            info["failed"] = failed.strip().splitlines()[-1]
        finally:
            janitor.cleanup()
    return report(args, stamp, info, frozen, crash, tp)


def report(
    args: argparse.Namespace,
    stamp: str,
    info: dict[str, str],
    frozen: dict[int, Frozen],
    crash: Crash | None,
    tp: dict[str, list[Window]],
) -> int:
    sections = ["Machine: " + "; ".join(f"{k}: {v}" for k, v in info.items())]
    if frozen:
        sections.append(frozen_table(frozen, info["torpor checkpoint"]))
    if crash is not None and crash.crash_s:
        sections.append(crash_table(crash, parse_size(args.serve_size)))
    if len(tp) > 1:
        sections.append(throughput_table(tp, parse_size(args.tp_size), args.window))
    text = "\n\n".join(sections) + "\n"
    print(text)
    raw = {
        "machine": info,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "frozen": {str(k): v.__dict__ for k, v in frozen.items()},
        "crash": crash.__dict__ if crash else None,
        "throughput": {k: [w.__dict__ for w in ws] for k, ws in tp.items()},
    }
    (OUT / f"supervise-{stamp}.md").write_text(text)
    (OUT / f"supervise-{stamp}.json").write_text(json.dumps(raw, indent=2))
    png = OUT / f"supervise-{stamp}.png"
    plot(frozen, crash, tp, png)
    log(f"wrote {OUT}/supervise-{stamp}.{{md,json,png}}")
    if args.publish:
        runs = args.publish_dir / "runs" / f"supervise-{stamp}.json"
        shutil.copyfile(OUT / f"supervise-{stamp}.json", runs)
        if png.exists():
            shutil.copyfile(png, args.publish_dir / "supervise.png")
        publish(args, info, text, runs.name)
    return 0


def publish(args: argparse.Namespace, info: dict[str, str], tables: str, raw: str) -> None:
    head = [
        "# Supervision benchmark: results",
        "",
        f"`bench/bench_supervise.py` on {info.get('host', '?')} ({info.get('cpu', '?')}, "
        f"{info.get('memory', '?')}, kernel {info.get('kernel', '?')}, {info.get('criu', '?')}), "
        f"{info.get('date', '?')}, commit {info.get('commit', '?')} (uncommitted changes to "
        f"the code it ran: {info.get('uncommitted', '?')}). One run: {args.rounds} rounds for "
        f"(1) and (2), {args.tp_rounds} for (3) with {args.window:.0f} s windows; raw samples "
        f"in `bench/runs/{raw}`.",
        "",
        "```",
        "sudo .venv/bin/python bench/bench_supervise.py " + " ".join(sys.argv[1:]),
        "```",
        "",
        "![plot](supervise.png)",
        "",
    ]
    if args.note:
        head += [args.note, ""]
    (args.publish_dir / "RESULTS-supervise.md").write_text("\n".join(head) + "\n" + tables)


if __name__ == "__main__":
    raise SystemExit(main())
