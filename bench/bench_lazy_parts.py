"""Where the time of a lazy restore of the 1 GiB app goes, step by step (issue 10).

Small and focused, unlike ``bench_restore.py --lazy``: one 1 GiB app (``lazy_app.py mem``, its
answer sums 20 MiB; ``--app torch``: the torch app instead), checkpointed once, then ``--reps``
rounds of ``torpor restore IMAGE --lazy`` through the agent (and, with ``--ceph``, of ``torpor
restore NAME@POOL --lazy`` from a real single-node Ceph, the local cache emptied first), each
step's first answer timed from the command's start as ``bench_restore.py`` does
(``lazy_rows.cli``), after a warm-up step per
method (it records the warm sets). Every torpor process of the run writes its steps'
timestamps (``TORPOR_LAZY_TRACE``, ``src/torpor/_lazy/_trace.py``); the report gives, per
step, the median time since the command's start and the median gap from the step before.

    .venv/bin/python bench/bench_lazy_parts.py [--reps 5] [--ceph] [--no-local] [--app torch]
        [--trees A B ...] [--json OUT]

``--trees`` compares source trees side by side in one run (e.g. ``git archive`` of two commits
exported under ``/tmp/X/src``): every method is run once per tree, alternating in each round,
the agent restarted with ``PYTHONPATH=<tree>/src`` (its workers, the CLI and the keepers then
run that tree's torpor). The app is checkpointed and pushed by the tree this script imports
(its own, or the first of ``--trees`` if that is first on ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lazy_rows
from bench_restore import (
    become_subreaper,
    parse_size,
    private_home,
    quiesce,
    reap_orphans,
    stop_agent,
)


def read_trace(path: Path, since: float) -> list[tuple[float, str]]:
    """``(seconds since the command's start, step)`` of the trace file, in time order."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        t, _, step = line.split(" ", 2)
        out.append((float(t) - since, step))
    return sorted(out)


def one(app: Any, name: str, source: str | None, pool: Any, trace: Path) -> dict[str, Any]:
    if pool is not None:
        pool.empty_cache()
    trace.unlink(missing_ok=True)
    wall = time.time()
    step = lazy_rows.cli(app, name, lazy=True, source=source)
    marks = read_trace(trace, wall)
    marks.append((step.answer, "first-answer"))
    return {"answer": step.answer, "resume": step.resume, "warm_bytes": step.warm_bytes,
            "marks": sorted(marks)}  # fmt: skip


def table(label: str, runs: list[dict[str, Any]]) -> str:
    """Median time since the start, and median gap from the step before, per step."""
    steps: dict[str, list[float]] = {}
    order: list[str] = []
    for r in runs:
        for t, s in r["marks"]:
            if s not in steps:
                order.append(s)
            steps.setdefault(s, []).append(t)
    order.sort(key=lambda s: statistics.median(steps[s]))
    lines = [f"{label}: {len(runs)} runs; first answer median "
             f"{statistics.median(r['answer'] for r in runs) * 1000:.0f} ms "
             f"(min {min(r['answer'] for r in runs) * 1000:.0f}, "
             f"max {max(r['answer'] for r in runs) * 1000:.0f})",
             "| step | since start, median ms [min, max] | gap from previous, median ms |",
             "|---|---:|---:|"]  # fmt: skip
    prev = None
    for s in order:
        xs = steps[s]
        gap = ""
        if prev is not None:
            gaps = [
                dict((b, a) for a, b in r["marks"])[s] - dict((b, a) for a, b in r["marks"])[prev]
                for r in runs
                if s in {b for _, b in r["marks"]} and prev in {b for _, b in r["marks"]}
            ]
            gap = f"{statistics.median(gaps) * 1000:.1f}" if gaps else ""
        lines.append(f"| {s} | {statistics.median(xs) * 1000:.1f} [{min(xs) * 1000:.1f}, "
                     f"{max(xs) * 1000:.1f}] | {gap} |")  # fmt: skip
        prev = s
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--touch", default="20M")
    parser.add_argument(
        "--app",
        choices=("mem", "torch"),
        default="mem",
        help="the 1 GiB app (mem SIZE TOUCH) or the torch app (lazy_app.py)",
    )
    parser.add_argument("--ceph", action="store_true", help="also from a real Ceph pool")
    parser.add_argument("--no-local", action="store_true", help="only the pool restores")
    parser.add_argument("--json", type=Path, help="write the raw samples here")
    parser.add_argument(
        "--trees", nargs="+", type=Path, default=[], help="source trees to compare (see above)"
    )
    args = parser.parse_args()
    size, touch = parse_size(args.size), parse_size(args.touch)
    if int(Path("/proc/sys/fs/pipe-max-size").read_text()) < 4 << 20:
        subprocess.run(["sysctl", "-q", "-w", "fs.pipe-max-size=4194304"], check=True)
    become_subreaper()
    results: dict[str, list[dict[str, Any]]] = {}
    with private_home() as home:
        trace = home / "trace"
        os.environ["TORPOR_LAZY_TRACE"] = str(trace)  # inherited by the agent and keepers
        from torpor import _agent

        work = home / "bench"
        work.mkdir()
        trees = [t.resolve() for t in args.trees]
        for t in trees:
            if not (t / "src" / "torpor" / "__init__.py").is_file():
                raise SystemExit(f"{t}: no src/torpor in it")
        current: list[Path | None] = [None]

        def use_tree(tree: Path | None) -> None:
            """The agent of ``tree`` (restarted if another tree's runs)."""
            nonlocal agent
            if tree is None or tree == current[0]:
                return
            stop_agent(agent.pid, print)
            os.environ["PYTHONPATH"] = str(tree / "src")
            agent, _ = _agent.start()
            current[0] = tree

        agent, _ = _agent.start()
        try:
            port = lazy_rows.free_port()
            cmd = [sys.executable, str(lazy_rows.LAZY_APP), "--port", str(port)]
            if args.app == "torch":
                app = lazy_rows.make_app("torch", "torch app", [*cmd, "torch"], port, work, [0])
                app.warm_bytes = 512 << 20
            else:
                cmd += ["mem", str(size), str(touch)]
                app = lazy_rows.make_app("1g", "1 GiB app", cmd, port, work, [0])
                app.warm_bytes = size + size // 4 + (64 << 20)
            methods: list[tuple[str, str | None, Path | None]] = []
            suffixes = [(f"-{t.name}", t) for t in trees] or [("", None)]
            if not args.no_local:
                methods += [(f"local{sfx}", None, t) for sfx, t in suffixes]
            ctx = lazy_rows.ceph_pool(home / "ceph", print) if args.ceph else None
            pool = None
            if ctx is not None:
                pool_name = ctx.__enter__()
                from torpor._pools import open_pool

                with open_pool(pool_name) as p:
                    p.push(app.image, name="lazy-1g")
                pool = lazy_rows.Pool(pool_name)
                methods += [(f"ceph{sfx}", f"lazy-1g@{pool_name}", t) for sfx, t in suffixes]
            try:
                n = 0
                for _label, source, tree in methods:  # warm-up: records the warm sets
                    n += 1
                    use_tree(tree)
                    one(app, f"parts-{n}", source, pool if source else None, trace)
                    lazy_rows.stop_all_managed()
                    reap_orphans()
                for r in range(args.reps):
                    k = r % len(methods)  # each round starts with another method
                    for label, source, tree in methods[k:] + methods[:k]:
                        n += 1
                        use_tree(tree)
                        time.sleep(0.5)  # the agent refills its spare workers
                        quiesce(app.warm_bytes, work)
                        r = one(app, f"parts-{n}", source, pool if source else None, trace)
                        results.setdefault(label, []).append(r)
                        print(f"{label}: first answer {r['answer'] * 1000:.0f} ms", flush=True)
                        lazy_rows.stop_all_managed()
                        reap_orphans()
            finally:
                if ctx is not None:
                    ctx.__exit__(None, None, None)
        finally:
            lazy_rows.stop_all_managed()
            stop_agent(agent.pid, print)
            reap_orphans()
    for label, runs in results.items():
        print()
        print(table(label, runs))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
