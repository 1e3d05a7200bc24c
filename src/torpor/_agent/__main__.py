"""``python -m torpor._agent [--ready-fd N]``: the agent in the foreground (what ``torpor agent
start`` runs detached; ``torpor agent run`` is the same for a supervisor)."""

from __future__ import annotations

import argparse
import sys

from .._errors import TorporError
from ._master import serve


def main() -> int:
    """Serve until SIGTERM; a one-line error and exit code 1 if the agent cannot start."""
    parser = argparse.ArgumentParser(prog="python -m torpor._agent")
    parser.add_argument("--ready-fd", type=int, help="write 'ready' here once serving")
    parser.add_argument("--lock-fd", type=int, help=argparse.SUPPRESS)  # re-executing agent
    parser.add_argument("--install", help="the directory of the launchers served")
    args = parser.parse_args()
    try:
        serve(args.ready_fd, args.lock_fd, args.install)
    except TorporError as exc:
        print(f"torpor agent: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


raise SystemExit(main())
