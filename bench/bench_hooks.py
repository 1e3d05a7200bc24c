"""Time notifying N registered resources (before_checkpoint + after_restore), no CRIU.

    .venv/bin/python bench/bench_hooks.py [--n 10000] [--repeat 7]

Prints a table: for plain resources, function hooks, async resources and a nested context, the
median time of a full before+after cycle and the cost per resource. Target: 10,000 resources
well under 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Callable

from torpor._coord._context import Context, FunctionHook


class Plain:
    __slots__ = ("__weakref__", "n")

    def __init__(self) -> None:
        self.n = 0

    def before_checkpoint(self, context: Context) -> None:
        self.n += 1

    def after_restore(self, context: Context) -> None:
        self.n -= 1


class Async:
    async def before_checkpoint(self, context: Context) -> None:
        await asyncio.sleep(0)

    async def after_restore(self, context: Context) -> None:
        return None


def _plain(n: int) -> tuple[Context, list[object]]:
    ctx = Context("bench")
    keep: list[object] = [Plain() for _ in range(n)]
    for r in keep:
        ctx.register(r)  # type: ignore[arg-type]
    return ctx, keep


def _functions(n: int) -> tuple[Context, list[object]]:
    ctx = Context("bench")
    counter = [0]

    def hook() -> None:
        counter[0] += 1

    for i in range(n):
        ctx._register_strong(
            FunctionHook("before_checkpoint" if i % 2 else "after_restore", hook, (), {})
        )
    return ctx, []


def _async(n: int) -> tuple[Context, list[object]]:
    ctx = Context("bench")
    keep: list[object] = [Async() for _ in range(n)]
    for r in keep:
        ctx.register(r)  # type: ignore[arg-type]
    return ctx, keep


def _nested(n: int) -> tuple[Context, list[object]]:
    root = Context("root")
    keep: list[object] = []
    per = 100
    for _ in range(n // per):
        child = Context("child")
        root.register(child)
        keep.append(child)
        for _ in range(per):
            r = Plain()
            child.register(r)
            keep.append(r)
    return root, keep


def _time(build: Callable[[int], tuple[Context, list[object]]], n: int, repeat: int) -> float:
    ctx, keep = build(n)
    samples = []
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        ctx.before_checkpoint()
        ctx.after_restore()
        samples.append(time.perf_counter() - t0)
    del keep
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    t0 = time.perf_counter()
    _plain(args.n)
    register = time.perf_counter() - t0
    rows = [
        ("resources (weakly held)", _time(_plain, args.n, args.repeat)),
        ("function hooks", _time(_functions, args.n, args.repeat)),
        ("nested contexts (100 per)", _time(_nested, args.n, args.repeat)),
        ("async resources", _time(_async, args.n, args.repeat)),
    ]
    print(f"{args.n:,} registered, before_checkpoint + after_restore, median of {args.repeat}")
    print(f"{'kind':<28}{'cycle ms':>10}{'µs / resource':>16}")
    for name, secs in rows:
        print(f"{name:<28}{secs * 1e3:>10.2f}{secs * 1e6 / args.n:>16.2f}")
    print(
        f"{'register ' + format(args.n, ',') + ' resources':<28}{register * 1e3:>10.2f}"
        f"{register * 1e6 / args.n:>16.2f}"
    )


if __name__ == "__main__":
    main()
