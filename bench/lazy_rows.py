"""Part (c) of ``bench_restore.py``: lazy (post-copy) restore against full restore and bare CRIU.

For each app, the time from the start of each method until the app's FIRST ANSWER on its
socket, and (lazy methods) until its memory is fully resident:

- ``cold start``                 the app launched and warmed up anew (demo and torch apps)
- ``torpor restore --lazy``      the CLI as a user runs it (``torpor restore IMAGE --lazy --json``,
                                 handed to the agent); resident: the keeper's ``resident_at``
- ``torpor restore``             the same CLI, full restore
- ``criu restore -d``            bare full restore of the same image
- ``criu lazy-pages + --lazy-pages``  bare ``criu lazy-pages -D IMAGE`` (waited for on its
                                 status fd) then ``criu restore -D IMAGE --lazy-pages -d``;
                                 resident: the daemon's exit (every page moved)
- ``torpor restore NAME@POOL [--lazy]``  (``--ceph``, when the tree has lazy pool restores) the
                                 big app's image pushed to a real single-node Ceph pool
                                 (``scripts/ceph-cluster``), the local cache emptied before each
                                 (a failed pool step is recorded and retried once)

Apps: (a) the demo app (``src/torpor/_demo/app.py``, its ``STATS``), (b) a torch app
(``bench/lazy_app.py torch``: a warmed-up transformer encoder, its answer one inference;
``torch==2.13.0`` is installed into the venv if missing, the CPU build, else the row is
skipped), (c) a 1 GiB app (``bench/lazy_app.py mem 1G 20M``: its answer sums 20 MiB of it).
Each app's methods run once per round in rotating order after an untimed warm-up round, which
also checks, for both lazy methods, that the fully resident copy's memory checksum equals the
original's. Every step starts from freshly touched memory (``quiesce``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_restore import (
    BENCH,
    READY_TIMEOUT,
    TORPOR_CLI,
    criu_binary,
    kill,
    make_demo_image,
    quiesce,
    reap,
    reap_orphans,
    stop_managed,
)

LAZY_APP = BENCH / "lazy_app.py"
POLL = 0.002  # seconds between attempts to get an answer: fine against a ~60 ms target
TORCH_REQ = "torch==2.13.0"  # the CPU build, from a local file on these machines

COLD = "cold start"
T_LAZY = "torpor restore --lazy"
T_FULL = "torpor restore"
C_FULL = "criu restore -d"
C_LAZY = "criu lazy-pages + restore --lazy-pages"
P_LAZY = "torpor restore NAME@POOL --lazy"
P_FULL = "torpor restore NAME@POOL"
LAZY_METHODS = (T_LAZY, C_LAZY, P_LAZY)

Log = Callable[[str], None]


# -- answers ----------------------------------------------------------------------------------


def ask(port: int, request: str = "ASK", timeout: float = 30.0) -> dict[str, Any]:
    """One request to a ``lazy_app`` on ``port``; its JSON answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request.encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            data = sock.recv(4096)
            if not data:
                raise ConnectionResetError("closed before answering")
            buf += data
    reply = json.loads(buf.split(b"\n", 1)[0])
    if not isinstance(reply, dict):
        raise ValueError(reply)
    return reply


@dataclass
class App:
    """One app of the lazy rows: its image and how to ask it."""

    key: str
    label: str
    port: int
    token: str
    image: Any  # torpor Image
    cold: Callable[[], float] | None  # one timed cold start, or None
    demo: bool = False  # answers the demo's STATS instead of lazy_app's ASK
    reference: Any = None  # lazy_app's ALL answer of the original
    warm_bytes: int = 512 << 20
    check: bool = False  # check each copy's memory once resident (the warm-up round)

    def wait_answer(
        self,
        since: float,
        timeout: float = READY_TIMEOUT,
        proc: subprocess.Popen[bytes] | None = None,
    ) -> tuple[float, int | None]:
        """Seconds from ``since`` (perf_counter) to the first answer; the answering host pid
        (the demo app's; a lazy_app knows only its pid in its own PID namespace, 1)."""
        if self.demo:
            from torpor._demo import _runner

            seconds, stats = _runner.wait_ready(self.port, None, since=since, timeout=timeout)
            if stats.token != self.token:
                raise RuntimeError(f"pid {stats.pid} answered with another token")
            return seconds, stats.pid
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = ask(self.port)
            except (OSError, ValueError):
                if proc is not None and proc.poll() not in (None, 0):
                    err = proc.stderr.read().decode().strip() if proc.stderr else ""
                    raise RuntimeError(f"{self.label}: {proc.args!r} failed: {err}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.label}: no answer within {timeout:.0f}s") from None
                time.sleep(POLL)
                continue
            seconds = time.perf_counter() - since
            if reply["token"] != self.token:
                raise RuntimeError(f"pid {reply['pid']} answered with another token")
            return seconds, None

    def check_memory(self, method: str) -> None:
        """The fully resident copy holds the original's memory (lazy_app apps)."""
        if self.demo:
            return
        got = ask(self.port, "ALL", timeout=120)["answer"]
        if got != self.reference:
            raise RuntimeError(f"{self.label} {method}: memory checksum {got} != {self.reference}")


def launch(cmd: list[str], name: str, port: int, label: str) -> tuple[float, Any, str]:
    """Start ``cmd`` managed; seconds to its first answer, its record, its token."""
    from torpor._process import _manage

    t0 = time.perf_counter()
    rec = _manage.run(cmd, name=name)
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            reply = ask(port)
            break
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{label} did not answer; see {rec.log_path}") from None
            time.sleep(POLL)
    return time.perf_counter() - t0, rec, str(reply["token"])


def make_app(key: str, label: str, cmd: list[str], port: int, work: Path, seq: list[int]) -> App:
    """Start a lazy_app, note its answer and memory checksum, checkpoint it."""
    from torpor._engine import DumpOptions
    from torpor._process import _dump

    _, rec, token = launch(cmd, f"lazy-{key}", port, label)
    reference = ask(port, "ALL", timeout=120)["answer"]
    image = _dump.checkpoint_pid(rec.pid, work / f"lazy-{key}", DumpOptions(), name=f"lazy-{key}")
    reap(rec.keeper_pid)

    def cold() -> float:
        seq[0] += 1
        seconds, r, _ = launch(cmd, f"lazy-cold-{key}-{seq[0]}", port, label)
        stop_managed(r.pid, r.keeper_pid)
        return seconds

    return App(key, label, port, token, image, cold, reference=reference)


# -- methods ----------------------------------------------------------------------------------


@dataclass
class Step:
    """One timed bring-up: to first answer, and to fully resident (lazy methods)."""

    answer: float
    resident: float | None = None
    resume: float | None = None  # torpor's own time-to-resume (its --json)
    warm_bytes: int | None = None  # restored before the resume from a warm set (its state)


def cli(app: App, name: str, *, lazy: bool, source: str | None = None) -> Step:
    """``torpor restore`` (through the agent) of the image (or ``source``, NAME@POOL)."""
    from torpor._lazy import _restore as lz
    from torpor._process import _registry

    cmd = [str(TORPOR_CLI), "-q", "restore", source or str(app.image.path), "--name", name]
    cmd += ["--lazy", "--json"] if lazy else []
    wall = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, TORPOR_AGENT="on"),
    )
    try:
        seconds, pid = app.wait_answer(t0, proc=proc)
        out, err = proc.communicate(timeout=READY_TIMEOUT)
    finally:
        if proc.poll() is None:
            kill(proc.pid)
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err.decode().strip()}")
    step = Step(seconds)
    if lazy:
        [row] = json.loads(out)
        step.resume = float(row["resume_s"])
        st = wait_resident(name)
        if st is None or st.state != lz.RESIDENT or st.resident_at is None:
            raise RuntimeError(f"lazy copy {name} did not become resident: {st}")
        step.resident = st.resident_at - wall
        step.warm_bytes = getattr(st, "warm_bytes", None)  # (trees before 3cfbbc4: none)
    rec = _registry.load(name)
    assert pid is None or rec.pid == pid, (rec.pid, pid)
    if app.check:
        app.check_memory(T_LAZY if lazy else T_FULL)
    stop_managed(rec.pid, rec.keeper_pid)
    return step


def wait_resident(name: str, timeout: float = READY_TIMEOUT) -> Any:
    """The lazy copy's recorded state once resident (or failed, ended, or ``timeout``).

    ``wait_states`` alone can return ``filling``: it takes a copy whose daemon has gone as
    settled, and the keeper reaps the daemon a moment before it writes ``resident``.
    """
    from torpor._lazy import _restore as lz

    deadline = time.monotonic() + timeout
    while True:
        st = lz.wait_states([name], timeout=max(deadline - time.monotonic(), 0.0)).get(name)
        if (st is not None and st.state != lz.FILLING) or time.monotonic() > deadline:
            return st
        time.sleep(0.01)


def bare(app: App, work: Path, seq: int, *, lazy: bool) -> Step:
    """Bare ``criu restore -d`` of the image, or ``criu lazy-pages`` + ``--lazy-pages``."""
    wdir = work / f"bare-{app.key}-{seq}"
    wdir.mkdir()
    pidfile = wdir / "pid"
    img = str(app.image.path)
    criu = criu_binary()
    restore = [criu, "restore", "-D", img, "-d", "--pidfile", str(pidfile), "-W", str(wdir)]
    restore += ["-o", "restore.log"]
    daemon = None
    t0 = time.perf_counter()
    try:
        if lazy:
            r, w = os.pipe()
            try:
                daemon = subprocess.Popen(
                    [
                        criu,
                        "lazy-pages",
                        "-D",
                        img,
                        "-W",
                        str(wdir),
                        "-o",
                        "lazy-pages.log",
                        "--status-fd",
                        str(w),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    pass_fds=(w,),
                )
                os.close(w)
                w = -1
                ready, _, _ = select.select([r], [], [], 10.0)
                if not ready or not os.read(r, 1):
                    raise RuntimeError(f"criu lazy-pages never got ready; see {wdir}")
            finally:
                os.close(r)
                if w >= 0:
                    os.close(w)
            restore.append("--lazy-pages")
        proc = subprocess.Popen(restore, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        seconds, pid = app.wait_answer(t0)
        if proc.wait(timeout=READY_TIMEOUT) != 0:
            raise RuntimeError(f"criu restore failed; see {wdir}")
        root = int(pidfile.read_text())
        assert pid is None or root == pid, (root, pid)
        step = Step(seconds)
        if daemon is not None:
            if daemon.wait(timeout=READY_TIMEOUT) != 0:
                raise RuntimeError(f"criu lazy-pages failed; see {wdir}")
            step.resident = time.perf_counter() - t0
        if app.check:
            app.check_memory(C_LAZY if lazy else C_FULL)
        kill(root)
        reap(root)  # we are the subreaper its criu parent left it to
        return step
    finally:
        with contextlib.suppress(OSError, ValueError):
            kill(int(pidfile.read_text()))  # a restored root left by a failed step
        if daemon is not None and daemon.poll() is None:
            kill(daemon.pid)
            daemon.wait()
        shutil.rmtree(wdir, ignore_errors=True)


# -- the pool (Ceph) --------------------------------------------------------------------------


def pool_lazy_supported() -> bool:
    """Whether this tree's ``torpor restore NAME@POOL --lazy`` restores lazily from the pool
    (LAZYPOOL's work) rather than pulling first."""
    from torpor._cli import _restore

    # Before it (9b4408a), a NAME@POOL was pulled whole whatever --lazy said.
    return hasattr(_restore, "open_lazy_pool_image")


@dataclass
class Pool:
    """A real Ceph pool the apps' images were pushed to."""

    name: str
    pushed: dict[str, str] = field(default_factory=dict)  # app key -> NAME@POOL

    def empty_cache(self) -> None:
        from torpor._paths import cache_dir

        shutil.rmtree(cache_dir(), ignore_errors=True)


@contextlib.contextmanager
def ceph_pool(root: Path, log: Log) -> Iterator[str]:
    """A real single-node Ceph (``scripts/ceph-cluster``, as ``bench_pools.py`` starts it) and
    a torpor pool ``ceph`` on it; the cluster is stopped at the end, also on Ctrl-C."""
    from bench_pools import cluster

    from torpor._pools import create_pool

    root.mkdir(parents=True, exist_ok=True)
    log("starting a single-node Ceph (scripts/ceph-cluster)")
    with cluster(root) as info:
        create_pool(
            "ceph", "ceph",
            {"ceph.conf": info["conf"], "ceph.user.name": info["rados_user"],
             "ceph.osd.pool_name": "lazybench", "ceph.osd.pg_num": "8"},
        )  # fmt: skip
        yield "ceph"


# -- one app's rounds -------------------------------------------------------------------------


def run_app(app: App, reps: int, work: Path, log: Log, pool: Pool | None) -> dict[str, Any]:
    """Warm-up (with memory checks), then ``reps`` interleaved rounds."""
    methods = ([COLD] if app.cold else []) + [T_LAZY, T_FULL, C_FULL, C_LAZY]
    if pool is not None and app.key in pool.pushed:
        methods += [P_LAZY, P_FULL]
    seq = [0]

    def one(method: str) -> Step:
        seq[0] += 1
        name = f"lz-{app.key}-{seq[0]}"
        if method == COLD:
            assert app.cold is not None
            return Step(app.cold())
        if method in (T_LAZY, T_FULL):
            return cli(app, name, lazy=method == T_LAZY)
        if method in (P_LAZY, P_FULL):
            assert pool is not None
            pool.empty_cache()
            return cli(app, name, lazy=method == P_LAZY, source=pool.pushed[app.key])
        return bare(app, work, seq[0], lazy=method == C_LAZY)

    app.check = True  # the warm-up: each copy's memory checked
    for method in methods:
        one(method)
        reap_orphans()
    app.check = False
    log(f"{app.label}: warm-up done (lazy copies' memory matched the original's)")
    samples: dict[str, list[dict[str, float | None]]] = {m: [] for m in methods}
    failures: list[str] = []
    for r in range(reps):
        k = r % len(methods)
        order = methods[k:] + methods[:k]
        # The last round's copies are checked too (after their timing): they restore a warm
        # set, which the warm-up's copies (recording it) did not.
        app.check = r == reps - 1
        for method in order:
            time.sleep(0.5)  # the agent refills its spare workers 0.3 s after a command
            quiesce(app.warm_bytes, work)
            try:
                step = one(method)
            except RuntimeError as exc:
                if method not in (P_LAZY, P_FULL):
                    raise
                # Recorded and retried once: the run's figures say how often this happened.
                failures.append(f"round {r + 1}, {method}: {exc}")
                log(f"{app.label}: {method} failed ({exc}); retrying once")
                stop_all_managed()
                reap_orphans()
                step = one(method)
            samples[method].append(step.__dict__.copy())
            reap_orphans()
        log(
            f"{app.label} round {r + 1}/{reps}: "
            + ", ".join(f"{m} {samples[m][-1]['answer']:.3f}" for m in order)
        )
    app.check = False
    if reps:
        log(f"{app.label}: the last round's copies' memory matched the original's too")
    return {
        "label": app.label,
        "image_bytes": app.image.manifest.total_bytes,
        "samples": samples,
        "failures": failures,
    }


# -- setup ------------------------------------------------------------------------------------


def ensure_torch(log: Log) -> bool:
    """torch importable by this venv's Python: installed (the CPU build) if missing."""
    probe = [sys.executable, "-c", "import torch"]
    if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        return True
    log(f"installing {TORCH_REQ} (CPU build) into the venv")
    pip = [sys.executable, "-m", "pip", "install", "-q", TORCH_REQ]
    res = subprocess.run(pip, capture_output=True, text=True, timeout=900, check=False)
    if res.returncode != 0 or subprocess.run(probe, capture_output=True).returncode != 0:
        log(f"SKIPPING the torch row: `pip install {TORCH_REQ}` failed: {res.stderr[-300:]}")
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_lazy(
    apps: list[str],
    reps: int,
    rows: int,
    size: int,
    touch: int,
    work: Path,
    log: Log,
    pool_name: str | None = None,
) -> dict[str, Any]:
    """Every app's rows (see the module docstring)."""
    results: dict[str, Any] = {"skipped": {}}
    seq = [0]
    for key in apps:
        if key == "torch" and not ensure_torch(log):
            results["skipped"]["torch"] = f"`pip install {TORCH_REQ}` failed"
            continue
        if key == "demo":
            d = make_demo_image(rows, work)
            app = App("demo", f"demo app ({rows:,} rows)", d.port, d.token, d.image, d.cold)
            app.demo = True
        elif key == "torch":
            subprocess.run([sys.executable, "-c", "import torch"], check=True)  # page cache
            port = free_port()
            cmd = [sys.executable, str(LAZY_APP), "--port", str(port), "torch"]
            app = make_app("torch", "torch app", cmd, port, work, seq)
        else:
            port = free_port()
            cmd = [sys.executable, str(LAZY_APP), "--port", str(port), "mem", str(size), str(touch)]
            app = make_app(key, f"{size >> 20} MiB app, answer touches {touch >> 20} MiB", cmd,
                           port, work, seq)  # fmt: skip
            app.cold = None  # its cold start is only filling memory: not a target
            app.warm_bytes = size + size // 4 + (64 << 20)
        log(f"{app.label}: image {app.image.manifest.total_bytes / 2**20:.0f} MiB")
        pool = None
        if pool_name is not None and key not in ("demo", "torch"):  # its target is the big app's
            pool = Pool(pool_name)
            from torpor._pools import open_pool

            with open_pool(pool_name) as p:
                p.push(app.image, name=f"lazy-{key}")
            pool.pushed[key] = f"lazy-{key}@{pool_name}"
        try:
            results[key] = run_app(app, reps, work, log, pool)
        finally:
            stop_all_managed()
            shutil.rmtree(app.image.path, ignore_errors=True)
    return results


def stop_all_managed() -> None:
    """SIGKILL every process recorded in this (private) home: what a failed or interrupted
    step left running (each by its pid; the keepers then record and exit)."""
    from torpor._process import _registry
    from torpor._process._proc import ProcRef

    for rec in _registry.list_all():
        if ProcRef(rec.pid, rec.start_time).alive():
            kill(rec.pid)


# -- report -----------------------------------------------------------------------------------


def boot_ci(xs: list[float], n: int = 2000) -> tuple[float, float]:
    """95 % bootstrap interval of the median of ``xs``."""
    rng = random.Random(1)
    boots = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(n))
    return boots[int(n * 0.025)], boots[int(n * 0.975) - 1]


def ratio_ci(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Median of per-round ratios ``num[i] / den[i]`` with a 95 % bootstrap interval."""
    rs = [a / b for a, b in zip(num, den, strict=True)]
    lo, hi = boot_ci(rs)
    return statistics.median(rs), lo, hi


def lazy_tables(res: dict[str, Any]) -> str:
    """Markdown tables, one per app, and the targets."""
    out: list[str] = []
    for key, d in res.items():
        if key == "skipped":
            continue
        s = d["samples"]
        ans = {m: [x["answer"] for x in v] for m, v in s.items()}
        n = len(next(iter(ans.values())))
        out += [
            f"**{d['label']}** (image {d['image_bytes'] / 2**20:.0f} MiB), start of the command "
            f"→ first answer, {n} interleaved rounds:",
            "",
            "| method | first answer, median s [95 % CI] | min s | fully resident, median s "
            "| torpor's time-to-resume s | full `torpor restore` / this (paired) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for m, xs in ans.items():
            lo, hi = boot_ci(xs)
            res_s = [x["resident"] for x in s[m] if x["resident"] is not None]
            resume = [x["resume"] for x in s[m] if x["resume"] is not None]
            vs = "—"
            if m != T_FULL and T_FULL in ans:
                r, rlo, rhi = ratio_ci(ans[T_FULL], xs)
                vs = f"{r:.2f}x [{rlo:.2f}, {rhi:.2f}]"
            resident = f"{statistics.median(res_s):.3f}" if res_s else "—"
            resumed = f"{statistics.median(resume):.3f}" if resume else "—"
            out.append(
                f"| {m} | {statistics.median(xs):.3f} [{lo:.3f}, {hi:.3f}] | {min(xs):.3f} "
                f"| {resident} | {resumed} | {vs} |"
            )
        out.append("")
        for f in d.get("failures", []):
            out.append(f"Failed and retried once: {f}")
        out += targets(key, ans)
        out.append("")
    for key, why in res.get("skipped", {}).items():
        out.append(f"**{key}**: skipped ({why}).")
    return "\n".join(out)


def targets(key: str, ans: dict[str, list[float]]) -> list[str]:
    """The issue-10 targets this app is held to, met or not."""
    lines = []
    if key == "torch" and COLD in ans:
        r, lo, hi = ratio_ci(ans[COLD], ans[T_LAZY])
        ok = "met" if r >= 15 else "NOT met"
        lines.append(
            f"Target: torch app restored (lazy) to first answer ≥ 15x faster than its cold "
            f"start: {r:.1f}x, paired per round [95 % CI {lo:.1f}, {hi:.1f}] — **{ok}**."
        )
        r2, lo2, hi2 = ratio_ci(ans[COLD], ans[T_FULL])
        lines.append(f"(Full `torpor restore`: {r2:.1f}x [{lo2:.1f}, {hi2:.1f}].)")
    if key not in ("torch", "demo"):
        m = statistics.median(ans[T_LAZY])
        ok = "met" if m <= 0.060 else "NOT met"
        lines.append(
            f"Target: first answer within 60 ms locally: {m * 1000:.0f} ms median — **{ok}**."
        )
        if P_LAZY in ans:
            p = statistics.median(ans[P_LAZY])
            ok = "met" if p <= 0.120 else "NOT met"
            lines.append(
                f"Target: within 2x that (120 ms) from Ceph: {p * 1000:.0f} ms — **{ok}**."
            )
    return lines


def lazy_plot(res: dict[str, Any], path: Path) -> None:
    """Bars of the median first answer (and fully resident, hatched), per app."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in res if k != "skipped"]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        s = res[key]["samples"]
        names = list(s)
        ans = [statistics.median(x["answer"] for x in s[m]) for m in names]
        ax.barh(range(len(names)), ans, color="#1f77b4", label="first answer")
        for i, m in enumerate(names):
            dots = [x["answer"] for x in s[m]]
            ax.plot(dots, [i] * len(dots), "k.", ms=3, alpha=0.6)
            rs = [x["resident"] for x in s[m] if x["resident"] is not None]
            if rs:
                ax.plot([statistics.median(rs)], [i], "r|", ms=14, mew=2)
            ax.text(max(dots), i, f"  {ans[i]:.3f}s", va="center", fontsize=8)
        ax.set_xscale("log")
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("seconds (log): bar = median first answer, | = median fully resident")
        ax.set_title(res[key]["label"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
