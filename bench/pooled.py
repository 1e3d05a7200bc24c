#!/usr/bin/env python3
"""Pool the demo-app samples of several ``bench_restore.py`` runs (``bench/out/*.json``).

This VM is noisy. Even bare ``criu restore -v4`` against ``-v2``, which do the same work,
differs by up to ±10 ms in the paired median of one 25-round run. Pooling runs narrows the
estimate. For each method, it prints the median of the per-round differences from bare
``criu restore -d``, measured in the same round, with a 95 % bootstrap interval.

Usage: ``.venv/bin/python bench/pooled.py [RESULTS.json ...]`` (default: every run in
``bench/out`` that has the agent rows and at least 20 rounds).
"""

from __future__ import annotations

import json
import random
import statistics
import sys
from pathlib import Path

BARE = "criu restore -d"
AGENT = "torpor restore (CLI, agent)"


def main() -> int:
    paths = [Path(a) for a in sys.argv[1:]] or sorted(
        (Path(__file__).parent / "out").glob("*.json")
    )
    diffs: dict[str, list[float]] = {}
    bare: list[float] = []
    used = []
    for path in paths:
        demo = json.loads(path.read_text()).get("demo")
        if not demo or AGENT not in demo["samples"] or len(demo["samples"][BARE]) < 20:
            continue
        used.append(path.name)
        s = demo["samples"]
        bare += s[BARE]
        for method, xs in s.items():
            if method not in (BARE, "cold start"):
                diffs.setdefault(method, []).extend(x - b for x, b in zip(xs, s[BARE], strict=True))
    if not used:
        print("pooled: no run with the agent rows and >= 20 rounds", file=sys.stderr)
        return 1
    base = statistics.median(bare)
    rng = random.Random(1)
    print(
        f"{len(used)} runs ({', '.join(used)}), {len(bare)} rounds; bare criu median {base:.3f} s"
    )
    print()
    print("| method | paired Δ vs bare criu, median | 95 % CI |")
    print("|---|---:|---:|")
    for method, ds in diffs.items():
        boots = sorted(statistics.median(rng.choices(ds, k=len(ds))) for _ in range(4000))
        m, lo, hi = statistics.median(ds), boots[100], boots[3899]
        pct = f"[{lo / base * 100:+.1f}, {hi / base * 100:+.1f}] %"
        print(
            f"| {method} | {m * 1000:+.1f} ms ({m / base * 100:+.1f} %) "
            f"| [{lo * 1000:+.1f}, {hi * 1000:+.1f}] ms ({pct}) |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
