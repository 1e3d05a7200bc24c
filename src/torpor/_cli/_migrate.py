"""``torpor migrate NAME --to HOST:PORT [--mode copy]``: move a running process to another host."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from .._errors import UsageError
from ._app import App, human_bytes

if TYPE_CHECKING:
    from .._migrate._copy import Summary

_DESCRIPTION = """\
Moves the managed process NAME to the torpor serving migrations at HOST:PORT (`torpor agent
start --listen ADDR:PORT` there). Both hosts must trust each other (`torpor trust add`). The
target checks it can take the process before anything is frozen; the image goes over the
authenticated channel while CRIU holds the process frozen, and the original is let go only
once the target reports the copy running. Any failure before that resumes the original,
unchanged."""


def register(sub: Any) -> None:
    """Add the command."""
    p = sub.add_parser("migrate", help="move a running process to another host",
                       description=_DESCRIPTION)  # fmt: skip
    p.add_argument("name", metavar="NAME", help="the managed process (torpor ps)")
    p.add_argument("--to", metavar="HOST:PORT", help="the target's agent")
    p.add_argument(
        "--resolve",
        choices=("continue", "kill"),
        help="on a target: settle a migration of NAME left in doubt (its copy stopped): "
        "continue it (the original is gone) or kill it (the original runs on the source)",
    )
    p.add_argument(
        "--mode",
        choices=("copy", "lazy", "pool"),
        default="copy",
        help="how memory moves: copy (stop and copy), lazy (post-copy), pool (through --pool)",
    )
    p.add_argument("--pool", metavar="P", help="the shared pool of --mode pool")
    p.add_argument(
        "--tcp-established",
        action="store_true",
        help="dump established TCP connections (implied when the process holds any)",
    )
    p.add_argument(
        "--address",
        action="append",
        default=[],
        metavar="ADDR/PREFIX",
        help="a service address that moves with the process, besides those it was started "
        "with (torpor run --service-address); repeatable",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="seconds the target may take to answer (default 120)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=_migrate)


def _split(to: str) -> tuple[str, int]:
    host, _, port = to.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--to {to!r} is not HOST:PORT", hint="e.g. --to 10.0.0.3:7070")
    return host.strip("[]"), int(port)


def _migrate(app: App, args: argparse.Namespace) -> int:
    if args.resolve is not None:
        if args.to is not None:
            raise UsageError("--resolve settles a copy here: it takes no --to")
        from .._migrate._resolve import resolve

        app.out(resolve(args.name, args.resolve))
        return 0
    if args.to is None:
        raise UsageError(
            "migrate needs --to HOST:PORT (or --resolve on a target)",
            hint="e.g. torpor migrate NAME --to 10.0.0.3:7070",
        )
    host, port = _split(args.to)
    from .._migrate._leftovers import sweep

    for line in sweep():  # what killed migrations left here (their commands are gone)
        app.warn(line)
    if (args.mode == "pool") != (args.pool is not None):
        raise UsageError(
            "--pool P goes with --mode pool, and only with it",
            hint="e.g. torpor migrate NAME --to HOST:PORT --mode pool --pool P",
        )
    common: dict[str, Any] = {
        "timeout": args.timeout,
        "tcp_established": args.tcp_established,
        "say": app.info,
    }
    migrate: Any
    if args.mode == "lazy":
        from .._migrate._lazy import migrate_lazy as migrate
    elif args.mode == "pool":
        from .._migrate._viapool import migrate_pool as migrate

        common["pool"] = args.pool
    else:
        from .._migrate._copy import migrate_copy as migrate
    if args.address:  # every mode moves them
        common["addresses"] = args.address
    summary = migrate(args.name, host, port, **common)
    if args.json:
        app.json(summary.to_json())
        return 0
    app.out(summary_line(summary))
    return 0


def summary_line(summary: Summary) -> str:
    """The human line of a finished migration's summary. What crossed and what the target
    copied from a base image it held are said only when it copied from one."""
    frozen = f", CRIU frozen {summary.frozen_ms:.0f} ms" if summary.frozen_ms is not None else ""
    based = ""
    if summary.bytes_from_base and summary.bytes_sent is not None:
        based = (
            f" ({human_bytes(summary.bytes_sent)} sent, {human_bytes(summary.bytes_from_base)}"
            " from a base image on the target)"
        )
    return (
        f"migrated {summary.name} to {summary.target}: pid {summary.source_pid} -> "
        f"{summary.target_pid} there; downtime {summary.downtime_ms:.0f} ms{frozen} "
        f"(transfer {summary.transfer_ms:.0f} ms, restore {summary.restore_ms:.0f} ms); "
        f"{summary.bytes} bytes in {summary.files} files{based}; total {summary.total_ms:.0f} ms"
        + (f"; {summary.tcp_connections} TCP connection(s) kept" if summary.tcp_connections else "")
        + (f"; moved {', '.join(summary.addresses)}" if summary.addresses else "")
    )
