"""``python -m torpor._supervise._tasks prune POOL NAME KEEP [gc]``: the supervisor's pool work,
in a process of its own (the daemon's loop must never wait for it). Deletes all but the KEEP
newest checkpoints of NAME; with ``gc``, then collects the pool's garbage (the daemon asks for
that at most every :data:`._daemon.GC_EVERY` seconds: a collection reads every manifest and
repacks, CPU a restore after a crash would otherwise compete with at every period). Prints one
JSON line: ``{"deleted": [...], "kept": K}``; a one-line error and exit code 1 on failure."""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    """Run the task ``argv`` names."""
    from .._errors import TorporError

    if len(argv) not in (4, 5) or argv[0] != "prune" or not argv[3].isdigit():
        print(
            "usage: python -m torpor._supervise._tasks prune POOL NAME KEEP [gc]", file=sys.stderr
        )
        return 2
    _, pool_name, name, keep = argv[:4]
    collect = argv[4:] == ["gc"]
    try:
        from .._pools import open_pool
        from . import _series, _spec

        with open_pool(pool_name) as pool:
            # Deletes (and drops older members' local copies), then collects if asked.
            deleted = _series.prune(pool, name, int(keep), collect=collect)
            kept = len(_series.members(pool, name))
            spec = _spec.load(name)
            if spec is not None:
                # Another home resuming NAME@POOL reads the spec from here.
                _series.publish_spec(pool, spec)
    except TorporError as exc:
        print(f"torpor: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"deleted": deleted, "kept": kept}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
