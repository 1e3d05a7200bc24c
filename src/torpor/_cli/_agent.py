"""``torpor agent start|stop|status|run``: the resident agent that makes commands fast."""

from __future__ import annotations

import argparse
from typing import Any

from ._app import App

_DESCRIPTION = """\
The agent keeps torpor imported and a CRIU process started in spare workers, so a command
handed to it skips ~80 ms of Python start-up: `torpor restore` then costs little more than
CRIU's own restore. The `torpor` command uses a running agent by itself (TORPOR_AGENT=off
runs commands in-process). Processes started through the agent outlive it."""


def register(sub: Any) -> None:
    """Add the command group."""
    p = sub.add_parser("agent", help="start/stop the resident agent", description=_DESCRIPTION)
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    start = verbs.add_parser("start", help="start the agent in the background")
    _listen_option(start)
    start.set_defaults(handler=_start)
    stop = verbs.add_parser("stop", help="stop the agent (managed processes go on)")
    stop.set_defaults(handler=_stop)
    status = verbs.add_parser("status", help="whether an agent runs")
    status.add_argument("--json", action="store_true", help="output JSON")
    status.set_defaults(handler=_status)
    run = verbs.add_parser("run", help="run the agent in the foreground (for a supervisor)")
    _listen_option(run)
    run.set_defaults(handler=_run)


def _listen_option(p: Any) -> None:
    p.add_argument("--listen", metavar="ADDR:PORT",
                   help="serve migrations from trusted hosts on ADDR:PORT (mutual TLS; "
                   "see docs/migration.md)")  # fmt: skip


def _start(app: App, args: argparse.Namespace) -> int:
    from .._migrate._leftovers import sweep

    for line in sweep():  # what killed migrations left here (their commands are gone)
        app.warn(line)
    if args.listen:
        from .._migrate._serve_start import start_detached

        pid, where = start_detached(args.listen)
        app.out(f"migration server started (pid {pid}), listening on {where}")
        return 0
    from .. import _agent

    st, started = _agent.start()
    if started:
        app.out(f"agent started (pid {st.pid}), serving {st.socket}")
    else:
        app.out(f"agent already running (pid {st.pid}), serving {st.socket}")
    # Supervised processes that were running when torpor's processes died (a reboot) come
    # back now (issue 8); nothing to do when none is supervised.
    from ._supervise import resume_all

    return resume_all(app)


def _stop(app: App, args: argparse.Namespace) -> int:
    from .. import _agent

    st = _agent.stop()
    app.out("no agent was running" if st is None else f"agent stopped (pid {st.pid})")
    return 0


def _status(app: App, args: argparse.Namespace) -> int:
    from .. import _agent

    st = _agent.status()
    if args.json:
        app.json(
            {
                "running": st.running,
                "pid": st.pid,
                "started": st.started,
                "socket": str(st.socket),
                "log": str(st.log),
            }
        )
    elif st.running:
        app.out(f"agent running (pid {st.pid}, since {st.started}), serving {st.socket}")
    else:
        app.out("agent not running — `torpor agent start` makes commands ~80 ms faster")
    return 0 if st.running else 3


def _run(app: App, args: argparse.Namespace) -> int:
    if args.listen:
        from .._migrate._serve import main

        return main(args.listen)
    from .. import _agent

    _agent.serve()
    return 0
