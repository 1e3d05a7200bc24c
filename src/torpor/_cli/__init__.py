"""torpor's command line: one module per command group, one :class:`App`, one error boundary.

Each command module defines ``register(sub)`` adding its parsers with
``set_defaults(handler=fn)``, where ``fn(app, args) -> int``. Command modules import their heavy
dependencies inside handlers, so ``torpor --help`` and fast paths stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence

from .._errors import TorporError
from ._app import App

# Order here is the order of ``torpor --help``.
_COMMAND_MODULES = (
    "_run",
    "_checkpoint",
    "_restore",
    "_images",
    "_inspect",
    "_image",
    "_pool",
    "_doctor",
    "_demo",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (every command module registered)."""
    parser = argparse.ArgumentParser(
        prog="torpor",
        description="Coordinated checkpoint/restore for Linux processes, on top of CRIU.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more detail")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            continue  # a command group not built yet
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torpor`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    app = App(verbosity=-1 if args.quiet else args.verbose)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(handler(app, args) or 0)
    except TorporError as exc:
        app.err(f"torpor: error: {exc}")
        if os.environ.get("TORPOR_DEBUG"):
            traceback.print_exc()
        return 1
    except KeyboardInterrupt:
        app.err("torpor: interrupted")
        return 130
    except Exception:
        if os.environ.get("TORPOR_DEBUG"):
            raise
        app.err(
            f"torpor: internal error: {sys.exc_info()[1]!r} "
            "(set TORPOR_DEBUG=1 for a traceback and report it)"
        )
        return 70
