"""The pure parts of ``bench_migrate.py``: what the client saw, the samples, the tables, the
targets and the plot (unit-tested in ``tests/unit/test_bench_migrate.py``)."""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# "base lazy": torpor lazy from another source tree (``bench_migrate.py --base-src``), in the
# same lab and rounds: a before/after comparison.
VARIANTS = ("torpor copy", "torpor lazy", "torpor pool", "criu copy", "criu lazy", "base lazy")
BARE = "criu copy"
LAZY_TARGET = 0.150  # seconds of downtime at the biggest size (issue 9)
COPY_TARGET = 1.1  # torpor copy over bare CRIU copy

# -- what the client saw (pure: unit-tested) --------------------------------------------------


@dataclass
class Seen:
    """What one migration looked like from the client."""

    downtime: float  # longest gap between successive signs of life, from t0 - BASELINE on
    gap_at: float  # seconds after t0 where that gap began
    total: float  # t0 to the first sign of life from the target
    baseline_gap: float  # longest gap before t0 (the machine's own noise)
    from_source_after: int  # signs of life from the source after the target's first
    count: int


def seen(arrivals: list[tuple[float, str]], t0: float, source: str, target: str) -> Seen:
    """Summarise ``arrivals`` ((time, sender), in order) around a move that began at ``t0``."""
    times = [t for t, _ in arrivals]
    before = [t for t in times if t < t0]
    firsts = [t for t, s in arrivals if s == target and t >= t0]
    if len(before) < 2 or not firsts:
        raise RuntimeError(
            f"the client saw {len(before)} signs of life before the move and "
            f"{len(firsts)} from {target} after it"
        )
    first = firsts[0]
    gaps = [(b - a, a) for a, b in itertools.pairwise(times) if b >= t0]
    worst, at = max(gaps) if gaps else (0.0, t0)
    base = max(b - a for a, b in itertools.pairwise(before))
    late = sum(1 for t, s in arrivals if s == source and t > first)
    return Seen(worst, at - t0, first - t0, base, late, len(arrivals))


@dataclass
class Sample:
    """One migration: what the client saw, the commands' times, and torpor's own summary."""

    variant: str
    size: int
    round: int
    downtime: float
    total: float
    command: float
    baseline_gap: float
    gap_at: float
    summary: dict[str, Any] = field(default_factory=dict)
    steps: dict[str, float] = field(default_factory=dict)
    heartbeat_gap: float | None = None  # the longest gap between the app's UDP heartbeats
    connections: int = 0  # TCP connections the client made (1: its connection was kept)
    errors: list[str] = field(default_factory=list)  # what broke the client's connection


# -- report -----------------------------------------------------------------------------------


def spread(xs: list[float], scale: float = 1.0, digits: int = 0) -> str:
    return (
        f"{statistics.median(xs) * scale:.{digits}f} "
        f"[{min(xs) * scale:.{digits}f}, {max(xs) * scale:.{digits}f}]"
    )


def ratios(samples: list[Sample], variant: str, attr: str) -> list[float]:
    """Per-round ratios ``variant / criu copy`` of ``attr``: only rounds (of one size) where
    both ran, each paired with its own round's bare run (slow spells of the machine hit both)."""
    bare = {(s.size, s.round): getattr(s, attr) for s in samples if s.variant == BARE}
    return [
        getattr(s, attr) / bare[s.size, s.round]
        for s in samples
        if s.variant == variant
        and getattr(s, attr) is not None
        and (bare.get((s.size, s.round)) or 0) > 0
    ]


def breakdown(size: int, samples: list[Sample]) -> str:
    """Where the time went: torpor's own summary fields, and bare CRIU's steps as its
    drivers timed them (monotonic clock, shared by the lab's hosts)."""
    rows = [
        f"Where the time went, {size >> 20} MiB (medians, seconds; torpor's from its `--json` "
        "summary, bare CRIU's from its drivers):",
        "",
        "| variant | dump | freeze → image on b (dump + transfer) | restore on b "
        "| all pages moved (lazy) |",
        "|---|---:|---:|---:|---:|",
    ]

    def med(xs: list[float]) -> str:
        return f"{statistics.median(xs):.3f}" if xs else "—"

    for v in VARIANTS:
        ss = [s for s in samples if s.variant == v and s.size == size]
        if not ss:
            continue
        if not v.startswith("criu"):
            xfer = [s.summary["transfer_ms"] / 1e3 for s in ss if "transfer_ms" in s.summary]
            rest = [s.summary["restore_ms"] / 1e3 for s in ss if "restore_ms" in s.summary]
            rows.append(f"| {v} | — | {med(xfer)} | {med(rest)} | — |")
            continue
        st = [s.steps for s in ss]
        dump = [x["send_dumped"] - x["send_start"] for x in st]
        xfer = [x["recv_received"] - x["send_start"] for x in st]
        rest = [x["recv_restored"] - x["recv_received"] for x in st]
        pages = [x["recv_resident"] - x["send_start"] for x in st if "recv_resident" in x]
        rows.append(f"| {v} | {med(dump)} | {med(xfer)} | {med(rest)} | {med(pages)} |")
    return "\n".join(rows)


def table(size: int, samples: list[Sample], not_built: dict[str, str]) -> str:
    """One size's rows, every variant (those that did not run say why)."""
    mine = [s for s in samples if s.size == size]
    rows = [
        f"**{size >> 20} MiB app** — median [min, max] over the rounds:",
        "",
        "| variant | runs | downtime ms (client) | app heartbeat gap ms | total s (to b answering) "
        "| command s | torpor's downtime_ms | torpor's total_ms | MB sent | connection kept "
        "| vs criu copy (paired): downtime, total |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in VARIANTS:
        ss = [s for s in mine if s.variant == v]
        if not ss:
            why = f"not built: `{not_built[v]}`" if v in not_built else "not run"
            rows.append(f"| {v} | 0 | {why} | | | | | | | | |")
            continue
        own = [float(s.summary["downtime_ms"]) for s in ss if "downtime_ms" in s.summary]
        tot = [float(s.summary["total_ms"]) for s in ss if "total_ms" in s.summary]
        mb = [float(s.summary.get("bytes") or s.steps.get("send_bytes") or 0) / 1e6 for s in ss]
        hb = [s.heartbeat_gap for s in ss if s.heartbeat_gap is not None]
        kept = sum(1 for s in ss if s.connections == 1 and not s.errors)
        kept_cell = f"{kept}/{len(ss)}" if any(s.connections for s in ss) else "— (no connection)"
        vs = "—"
        if v != BARE:
            rd, rt = ratios(mine, v, "downtime"), ratios(mine, v, "total")
            if rd and rt:
                vs = f"{statistics.median(rd):.2f}x, {statistics.median(rt):.2f}x"
        rows.append(
            f"| {v} | {len(ss)} | {spread([s.downtime for s in ss], 1000)} "
            f"| {spread(hb, 1000) if hb else '—'} "
            f"| {spread([s.total for s in ss], digits=2)} "
            f"| {spread([s.command for s in ss], digits=2)} "
            f"| {spread(own) if own else '—'} | {spread(tot) if tot else '—'} "
            f"| {statistics.median(mb):.0f} | {kept_cell} | {vs} |"
        )
    base = [s.baseline_gap for s in mine]
    rows += [
        "",
        f"Longest gap before the moves (the machine's own noise): {spread(base, 1000)} ms.",
    ]
    return "\n".join(rows)


def targets(samples: list[Sample], sizes: list[int]) -> str:
    lines = []
    big = max(sizes)
    for attr, what in (("downtime", "client's gap"), ("heartbeat_gap", "app's heartbeat gap")):
        lazy = [getattr(s, attr) for s in samples if s.variant == "torpor lazy" and s.size == big]
        bare = [getattr(s, attr) for s in samples if s.variant == "criu lazy" and s.size == big]
        lazy, bare = [x for x in lazy if x is not None], [x for x in bare if x is not None]
        ref = f" (bare criu lazy: {statistics.median(bare) * 1000:.0f} ms)" if bare else ""
        if lazy:
            m = statistics.median(lazy)
            ok = "met" if m <= LAZY_TARGET else "NOT met"
            lines.append(
                f"- lazy downtime ≤ 150 ms at {big >> 20} MiB, {what}: {m * 1000:.0f} ms "
                f"({len(lazy)} runs){ref} — **{ok}**"
            )
        else:
            lines.append(
                f"- lazy downtime ≤ 150 ms at {big >> 20} MiB, {what}: no `torpor lazy` runs{ref}"
            )
    for z in sizes:
        sub = [s for s in samples if s.size == z]
        for attr in ("downtime", "heartbeat_gap", "total"):
            r = ratios(sub, "torpor copy", attr)
            if r:
                m = statistics.median(r)
                ok = "met" if m <= COPY_TARGET else "NOT met"
                lines.append(
                    f"- copy ≤ 1.1x bare CRIU, {attr}, {z >> 20} MiB: {m:.2f}x (per-round "
                    f"ratios {min(r):.2f}-{max(r):.2f}, {len(r)} rounds) — **{ok}**"
                )
    return "Targets:\n\n" + "\n".join(lines)


def plot(samples: list[Sample], sizes: list[int], path: Path, client: str = "service") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [v for v in VARIANTS if any(s.variant == v for s in samples)]
    colors = dict(
        zip(
            VARIANTS,
            ("#1f77b4", "#2ca02c", "#9467bd", "#d62728", "#ff9896", "#98df8a"),
            strict=True,
        )
    )
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    width = 0.8 / max(len(present), 1)
    panels = (
        (axes[0], "downtime", "downtime, ms (client's longest gap)"),
        (axes[1], "total", "total, s (command start → b answering)"),
    )
    for ax, attr, label in panels:
        scale = 1000 if attr == "downtime" else 1
        for j, v in enumerate(present):
            for i, z in enumerate(sizes):
                xs = [getattr(s, attr) * scale for s in samples if s.variant == v and s.size == z]
                if not xs:
                    continue
                x = i + (j - (len(present) - 1) / 2) * width
                ax.bar(
                    x, statistics.median(xs), width, color=colors[v], label=v if i == 0 else None
                )
                ax.plot([x] * len(xs), xs, "k.", ms=3, alpha=0.6)
                hb = [
                    s.heartbeat_gap * scale
                    for s in samples
                    if s.variant == v and s.size == z and s.heartbeat_gap is not None
                ]
                if attr == "downtime" and hb:
                    ax.plot(
                        [x],
                        [statistics.median(hb)],
                        "k_",
                        ms=14,
                        mew=2,
                        label="app's heartbeat gap (median)" if i == j == 0 else None,
                    )
        ax.set_yscale("log")
        ax.set_xticks(range(len(sizes)), [f"{z >> 20} MiB" for z in sizes])
        ax.set_ylabel(label + " (log)")
        ax.legend(fontsize=8)
    axes[0].axhline(150, color="#2ca02c", ls="--", lw=1, label="lazy target, 150 ms")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"torpor migrate vs bare CRIU, client: {client} (bars: medians, dots: rounds)", fontsize=11
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
