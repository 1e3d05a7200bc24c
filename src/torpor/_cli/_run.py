"""``torpor run``, ``torpor ps``, ``torpor kill``: managed processes."""

from __future__ import annotations

import argparse
import os
import signal
import time
from typing import Any

from .._errors import ProcessNotFoundError, UsageError
from ._app import App, human_duration


def register(sub: Any) -> None:
    """Add the commands."""
    p = sub.add_parser(
        "run",
        help="start a command so it can be checkpointed and restored",
        description="Start CMD as pid 1 of its own PID namespace, a session leader with stdin on "
        "/dev/null and stdout/stderr appended to a log, so it can be checkpointed and restored "
        "cleanly, as many times as wanted. Returns once it runs.",
    )
    p.add_argument("--name", help="a name for the process (default: the command's name + pid)")
    p.add_argument("--log", help="append stdout/stderr here (default: <home>/logs/NAME.log)")
    p.add_argument("--no-log", action="store_true", help="stdout/stderr to /dev/null")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    p.set_defaults(handler=_run)

    p = sub.add_parser("ps", help="list managed processes")
    p.add_argument("-a", "--all", action="store_true", help="include ended processes")
    p.add_argument("--json", action="store_true", help="output JSON")
    p.set_defaults(handler=_ps)

    p = sub.add_parser("kill", help="stop a managed process (SIGTERM, then SIGKILL)")
    p.add_argument("target", metavar="NAME|PID")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds before SIGKILL")
    p.set_defaults(handler=_kill)


def _run(app: App, args: argparse.Namespace) -> int:
    from .._images._store import check_name
    from .._process import _manage

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("no command given", hint="torpor run [--name N] -- CMD [ARGS...]")
    name = args.name or f"{os.path.basename(cmd[0])}-{int(time.time() * 1000) % 100000}"
    check_name(name, what="process name")
    log: Any = False if args.no_log else (args.log or True)
    rec = _manage.run(cmd, name=name, log=log)
    app.info(f"started {rec.name} (pid {rec.pid}); log: {rec.log_path or '/dev/null'}")
    app.out(f"{rec.name} {rec.pid}")
    return 0


def _ps(app: App, args: argparse.Namespace) -> int:
    from .._process import _proc, _registry

    recs = [r for r in _registry.list_all() if args.all or r.state == "running"]
    if args.json:
        app.json([{**r.__dict__, "state": r.state} for r in recs])
        return 0
    rows = []
    for r in recs:
        uptime = human_duration(_proc.start_seconds_ago(r.ref)) if r.state == "running" else "-"
        rows.append(
            (r.name, r.pid, r.state, uptime, " ".join(r.command)[:60], r.restored_from or "-")
        )
    app.table(("NAME", "PID", "STATE", "UPTIME", "COMMAND", "RESTORED-FROM"), rows)
    return 0


def resolve_target(target: str) -> int:
    """A pid from ``NAME|PID`` (a managed name must be running)."""
    from .._process import _registry

    if target.isdigit():
        return int(target)
    rec = _registry.load(target)
    if rec.state != "running":
        raise ProcessNotFoundError(
            f"managed process {target!r} is not running ({rec.state})", pid=rec.pid
        )
    return rec.pid


def _kill(app: App, args: argparse.Namespace) -> int:
    from .._process import _proc, _registry

    pid = resolve_target(args.target)
    managed = _registry.find_by_pid(pid)
    if managed is None:
        raise UsageError(
            f"pid {pid} is not a managed process", hint="torpor kill only stops what torpor started"
        )
    ref = managed.ref
    # A PID namespace's init ignores signals it has no handler for, except SIGKILL.
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while ref.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if ref.alive():
        os.kill(pid, signal.SIGKILL)
        while _proc.stat_fields(pid) is not None and ref.alive():
            time.sleep(0.02)
    app.info(f"stopped {managed.name} (pid {pid})")
    return 0
