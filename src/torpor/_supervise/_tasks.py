"""``python -m torpor._supervise._tasks prune POOL NAME KEEP``: the supervisor's pool work, in a
process of its own (a prune collects garbage, which can take a while: the daemon's loop must
never wait for it). Prints one JSON line: ``{"deleted": [...], "kept": K}``; a one-line error
and exit code 1 on failure."""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    """Run the task ``argv`` names."""
    from .._errors import TorporError

    if len(argv) != 4 or argv[0] != "prune" or not argv[3].isdigit():
        print("usage: python -m torpor._supervise._tasks prune POOL NAME KEEP", file=sys.stderr)
        return 2
    _, pool_name, name, keep = argv
    try:
        from .._pools import open_pool
        from . import _series, _spec

        with open_pool(pool_name) as pool:
            deleted = _series.prune(pool, name, int(keep))
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
