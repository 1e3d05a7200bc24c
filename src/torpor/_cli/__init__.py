"""torpor's command line: one module per command group, one :class:`App`, one error boundary.

Each command module defines ``register(sub)`` adding its parsers with
``set_defaults(handler=fn)``, where ``fn(app, args) -> int``. Command modules import their heavy
dependencies inside handlers, so ``torpor --help`` and fast paths stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import select
import signal
import sys
import traceback
from collections.abc import Sequence

from .._errors import TorporError
from ._app import App

# Order here is the order of ``torpor --help``: command -> the module that registers it.
_COMMANDS = {
    "run": "_run",
    "ps": "_run",
    "kill": "_run",
    "stop": "_supervise",
    "supervise": "_supervise",
    "unsupervise": "_supervise",
    "resume": "_supervise",
    "supervisor": "_supervise",
    "events": "_events",
    "logs": "_events",
    "checkpoint": "_checkpoint",
    "restore": "_restore",
    "images": "_images",
    "inspect": "_inspect",
    "image": "_image",
    "pool": "_pool",
    "identity": "_identity",
    "trust": "_trust",
    "doctor": "_doctor",
    "agent": "_agent",
    "migrate": "_migrate",
    "demo": "_demo",
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser. Given ``argv`` naming a command, only that command's module is
    registered: building every parser costs tens of milliseconds, paid by every command
    (a restore's latency matters)."""
    parser = argparse.ArgumentParser(
        prog="torpor",
        description="Coordinated checkpoint/restore for Linux processes, on top of CRIU.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more detail")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = _command_in(argv)
    modules = [_COMMANDS[wanted]] if wanted else list(dict.fromkeys(_COMMANDS.values()))
    for name in modules:
        importlib.import_module(f".{name}", __name__).register(sub)
    return parser


def _command_in(argv: Sequence[str] | None) -> str | None:
    """The command named in ``argv`` (the first non-option word), if it is a known one."""
    for arg in argv or ():
        if arg == "--":
            return None
        if not arg.startswith("-"):
            return arg if arg in _COMMANDS else None
    return None


_prebuilt: argparse.ArgumentParser | None = None


def prebuild() -> None:
    """Build the whole parser now, for every later :func:`main` in this process and its forks
    (the agent does this once; its workers then skip ~1.5 ms per command)."""
    global _prebuilt
    _prebuilt = build_parser(None)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torpor`` command (``torpor-py``, and the agent's workers)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _prebuilt or build_parser(argv)
    args = parser.parse_args(argv)
    app = App(verbosity=-1 if args.quiet else args.verbose)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        code = int(handler(app, args) or 0)
        sys.stdout.flush()  # a reader that has gone (``| head``) shows here, not at exit
        return code
    except BrokenPipeError:
        if not _stdout_gone():
            return _internal_error(app)
        return 128 + signal.SIGPIPE  # as a command killed by SIGPIPE: quietly
    except TorporError as exc:
        app.err(f"torpor: error: {exc}")
        if os.environ.get("TORPOR_DEBUG"):
            traceback.print_exc()
        return 1
    except KeyboardInterrupt:
        app.err("torpor: interrupted")
        return 130
    except Exception:
        return _internal_error(app)


def _internal_error(app: App) -> int:
    if os.environ.get("TORPOR_DEBUG"):
        raise  # (called from an except clause of main: the exception it handles)
    app.err(
        f"torpor: internal error: {sys.exc_info()[1]!r} "
        "(set TORPOR_DEBUG=1 for a traceback and report it)"
    )
    return 70


def _stdout_gone() -> bool:
    """Whether stdout's reader has gone (its pipe or socket reports an error to a poll); if
    so, what is left for it goes to /dev/null (the interpreter's flush at exit would otherwise
    fail and print a traceback)."""
    try:
        fd = sys.stdout.fileno()
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        events = dict(poll.poll(0)).get(fd, 0)
    except (OSError, ValueError):
        return False
    if not events & (select.POLLERR | select.POLLHUP):
        return False
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
    return True
