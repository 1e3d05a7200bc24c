"""``torpor inspect IMAGE [--json]``: show what a checkpoint holds, decoded from CRIU's files."""

from __future__ import annotations

import argparse

from ._app import App


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``inspect`` command."""
    p = sub.add_parser(
        "inspect",
        help="show the processes, memory, files and sockets an image holds",
        description=(
            "Decode an image's CRIU files: the process tree, memory areas and dumped pages, "
            "open files and sockets, and the torpor manifest."
        ),
    )
    p.add_argument("image", metavar="IMAGE", help="a local image's name, or an image directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(handler=run)


def run(app: App, args: argparse.Namespace) -> int:
    """Inspect the image and print the report."""
    from .._images._inspect import inspect_image, render_text
    from .._images._store import resolve

    inspection = inspect_image(resolve(args.image))
    if args.json:
        app.json(inspection.to_dict())
    else:
        app.out(render_text(inspection))
    return 0
