"""``torpor doctor``: what works on this machine and what a missing piece costs."""

from __future__ import annotations

import argparse
from typing import Any

from ._app import App


def register(sub: Any) -> None:
    """Add the command."""
    p = sub.add_parser("doctor", help="report CRIU, privileges and kernel features")
    p.add_argument("--json", action="store_true", help="output JSON")
    p.set_defaults(handler=_doctor)


def _doctor(app: App, args: argparse.Namespace) -> int:
    from .._doctor import probe

    caps = probe()
    if args.json:
        app.json([c.__dict__ for c in caps])
    else:
        app.table(
            ("CHECK", "STATUS", "DETAIL", "IF MISSING"),
            [(c.name, "works" if c.ok else "MISSING", c.detail, c.cost) for c in caps],
        )
    essential = {"criu", "privileges", "torpor home"}
    return 0 if all(c.ok for c in caps if c.name in essential) else 1
