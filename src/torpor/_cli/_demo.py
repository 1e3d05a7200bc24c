"""``torpor demo``: see a warm start — a numpy+pandas app cold started, checkpointed, restored."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ._app import App, human_bytes

if TYPE_CHECKING:
    from .._demo._runner import DemoResult


def register(sub: Any) -> None:
    """Add the command."""
    p = sub.add_parser(
        "demo",
        help="see a warm start: cold start vs restore of a numpy+pandas app",
        description="Start a small query service that warms up for a while (numpy, pandas, a "
        "1M-row in-memory index), checkpoint it, restore it, and compare how long each took to "
        "answer its first query. Then prove the restored app carried on: same warm-up token, "
        "its query counter continuing where it was. Needs root and CRIU; everything it starts "
        "is stopped and removed at the end unless --keep.",
    )
    p.add_argument(
        "--count", type=int, default=1, metavar="K", help="restore K copies at once (default 1)"
    )
    p.add_argument(
        "--rows",
        type=int,
        default=None,
        metavar="N",
        help="rows in the app's index (default 1000000; fewer is faster)",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="leave the restored copies running and keep the image (stop them with torpor kill)",
    )
    p.add_argument(
        "--no-lazy",
        action="store_true",
        help="skip the lazy row (one copy restored with post-copy memory, timed to its first "
        "answer and to its memory fully resident)",
    )
    p.add_argument("--json", action="store_true", help="output JSON")
    p.set_defaults(handler=run)


def run(app: App, args: argparse.Namespace) -> int:
    """Run the demo and show what it measured and proved."""
    from .._demo import _runner

    rows = _runner.DEFAULT_ROWS if args.rows is None else args.rows
    result = _runner.run_demo(
        count=args.count, rows=rows, keep=args.keep, progress=app.info, lazy=not args.no_lazy
    )
    if args.json:
        app.json(result.to_json())
    else:
        _show(app, result)
    if not result.state_continued:
        app.err(
            "torpor: error: a restored copy did not carry on from the checkpointed state "
            "(see the table above); please report it"
        )
        return 1
    return 0


def _show(app: App, r: DemoResult) -> None:
    before = r.before
    app.out()
    timings: list[tuple[object, ...]] = [
        ("cold start -> ready", f"{r.cold_seconds:.3f}"),
        ("checkpoint", f"{r.checkpoint_seconds:.3f}"),
    ]
    if r.lazy_seconds is not None:
        resident = r.lazy_resident_seconds
        timings.append(("lazy restore -> ready (1 copy)", f"{r.lazy_seconds:.3f}"))
        timings.append(
            (
                "lazy restore -> memory fully resident",
                f"{resident:.3f}" if resident is not None else "not yet",
            )
        )
    timings.append(
        (
            f"restore -> ready ({len(r.copies)} cop{'y' if len(r.copies) == 1 else 'ies'})",
            f"{r.restore_seconds:.3f}",
        )
    )
    app.table(("", "SECONDS"), timings)
    app.out()
    app.out(f"restore is {r.speedup:.1f}x faster than a cold start")
    if r.lazy_seconds is not None:
        app.out(
            f"lazy restore answered in {r.lazy_seconds:.3f}s against {r.restore_seconds:.3f}s "
            f"for a full one ({r.cold_seconds / r.lazy_seconds:.1f}x faster than a cold start)"
            + ("" if r.lazy_carries_on else "; it did NOT answer with the original's state")
        )
    app.out(
        f"image: {human_bytes(r.image_bytes)} for a {before.rows:,}-row index "
        f"(the app's own warm-up took {before.warmup_seconds:.3f}s)"
    )
    app.out()
    rows: list[tuple[object, ...]] = [
        ("original, at checkpoint", before.pid, before.token, before.served, "")
    ]
    for c in r.copies:
        rows.append(
            (
                c.name,
                c.pid,
                c.restored.token,
                f"{c.restored.served} -> {c.after.served} after {c.queries} more",
                "yes" if c.continues(before) else "NO",
            )
        )
    app.table(("PROCESS", "PID", "WARM-UP TOKEN", "QUERIES SERVED", "CARRIES ON"), rows)
    app.out()
    if r.state_continued:
        many = len(r.copies) > 1
        app.out(
            "The restored app"
            + ("s" if many else "")
            + " answered with the original's warm-up token and query count, and counted on "
            "from there: " + ("each copy by itself, " if many else "") + "continued, not restarted."
        )
    if r.kept:
        app.out()
        app.out(
            f"Kept running on 127.0.0.1:{r.port} (try: printf 'STATS\\n' | nc 127.0.0.1 "
            f"{r.port}): {', '.join(r.kept)}"
        )
        app.out(f"Stop them with: torpor kill NAME; the image is at {r.image_path}")
