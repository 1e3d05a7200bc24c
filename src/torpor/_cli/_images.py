"""``torpor images``: list images (local, or in a pool)."""

from __future__ import annotations

import argparse
from typing import Any

from ._app import App, human_bytes


def register(sub: Any) -> None:
    """Add the command."""
    p = sub.add_parser("images", help="list images (local, or in a pool with --pool)")
    p.add_argument("--pool", help="list the images in this pool instead")
    p.add_argument("--json", action="store_true", help="output JSON")
    p.set_defaults(handler=_images)


def _images(app: App, args: argparse.Namespace) -> int:
    if args.pool:
        from .._pools import open_pool

        with open_pool(args.pool) as pool:
            items = pool.list_images()
        if args.json:
            app.json([i.__dict__ for i in items])
            return 0
        app.table(
            ("NAME", "ID", "CREATED", "SIZE", "STORED"),
            [
                (
                    i.name,
                    i.id[:12],
                    i.created[:19],
                    human_bytes(i.size),
                    human_bytes(i.stored_bytes),
                )
                for i in items
            ],
        )
        return 0
    from .. import _paths
    from .._images import _incomplete
    from .._images._store import list_local

    images = list_local()
    # Images a checkpoint could not finish (its process may be gone), for `torpor image repair`;
    # leftovers of dumps that never succeeded are removed on the way.
    incomplete = [
        left
        for left in _incomplete.sweep(_paths.images_dir())
        if left.state == _incomplete.INCOMPLETE
    ]
    if args.json:
        app.json(
            [
                {
                    "name": i.name,
                    "path": str(i.path),
                    "state": "complete",
                    # The key id whose valid signature the manifest carries (None: unsigned).
                    "signer": i.signer,
                    **{
                        k: v
                        for k, v in i.manifest.__dict__.items()
                        if k not in ("files", "cpu_flags")
                    },
                }
                for i in images
            ]
            + [
                {
                    "name": left.record.name,
                    "path": str(left.path),
                    "state": _incomplete.INCOMPLETE,
                    "created": left.record.created,
                    "pid": left.record.pid,
                    "cmdline": list(left.record.cmdline),
                    "size": left.size,
                }
                for left in incomplete
            ]
        )
        return 0
    for left in incomplete:
        app.warn(
            f"image {left.record.name!r} is incomplete (kept at {left.path}): "
            f"`torpor image repair {left.record.name}` finishes it"
        )
    app.table(
        ("NAME", "ID", "CREATED", "SIZE", "PID", "COMMAND"),
        [
            (
                i.name,
                i.manifest.id[:12],
                i.manifest.created[:19],
                human_bytes(i.manifest.total_bytes),
                i.manifest.pid,
                " ".join(i.manifest.cmdline)[:50],
            )
            for i in images
        ]
        + [
            # An incomplete image has no id yet (its manifest is not written): the column
            # says what it is instead.
            (
                left.record.name,
                _incomplete.INCOMPLETE,
                left.record.created[:19],
                human_bytes(left.size),
                left.record.pid,
                " ".join(left.record.cmdline)[:50],
            )
            for left in incomplete
        ],
    )
    return 0
