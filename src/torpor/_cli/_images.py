"""``torpor images``: list images — every local image (the store's, and those torpor made
elsewhere: ``-o`` paths and the like) with its state, or a pool's."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ._app import App, human_bytes

if TYPE_CHECKING:
    from .._images._store import Listed


def register(sub: Any) -> None:
    """Add the command."""
    p = sub.add_parser(
        "images",
        help="list images (local, or in a pool with --pool)",
        description="List every local image: those in the store and those torpor made "
        "elsewhere (-o), each with its state: ok, incomplete (`torpor image repair` finishes "
        "it), broken (why torpor refuses it) or missing (its disk is gone).",
    )
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
    from .._images import _store

    listing = _store.list_all()
    for problem in listing.problems:
        app.warn(problem)
    if args.json:
        app.json([_as_json(row) for row in listing.images])
        return 0
    for row in listing.images:
        _warn(app, row)
    app.table(COLUMNS, [_as_row(row) for row in listing.images])
    return 0


#: The columns of ``torpor images`` (STATE last: a broken image's reason may be long).
COLUMNS = ("NAME", "ID", "CREATED", "SIZE", "PID", "COMMAND", "PATH", "STATE")


def _as_row(row: Listed) -> tuple[object, ...]:
    from .._images import _store

    state = f"{row.state}: {row.problem}" if row.state == _store.BROKEN else row.state
    if row.image is not None:
        m = row.image.manifest
        facts: tuple[object, ...] = (
            m.id[:12],
            m.created[:19],
            human_bytes(m.total_bytes),
            m.pid,
            " ".join(m.cmdline)[:50],
        )
    elif row.leftover is not None:
        # An incomplete image has no id yet (its manifest is not written).
        rec = row.leftover.record
        facts = ("", rec.created[:19], human_bytes(row.leftover.size), rec.pid)
        facts += (" ".join(rec.cmdline)[:50],)
    else:
        facts = ("", "", "", "", "")
    return (row.name, *facts, str(row.path), state)


def _as_json(row: Listed) -> dict[str, Any]:
    from .._images import _store

    if row.image is not None:
        image = row.image
        return {
            "name": image.name,
            "path": str(image.path),
            "state": "complete",
            # The key id whose valid signature the manifest carries (None: unsigned).
            "signer": image.signer,
            **{k: v for k, v in image.manifest.__dict__.items() if k not in ("files", "cpu_flags")},
        }
    if row.leftover is not None:
        rec = row.leftover.record
        return {
            "name": rec.name,
            "path": str(row.path),
            "state": _store.INCOMPLETE,
            "created": rec.created,
            "pid": rec.pid,
            "cmdline": list(rec.cmdline),
            "size": row.leftover.size,
        }
    extra = {"problem": row.problem} if row.state == _store.BROKEN else {}
    return {"name": row.name, "path": str(row.path), "state": row.state, **extra}


def _warn(app: App, row: Listed) -> None:
    """What to do about an image that needs it."""
    from .. import _paths
    from .._images import _store

    if row.leftover is not None:
        rec = row.leftover.record
        # By name in the store; elsewhere by the staging directory's path.
        target = rec.name if row.path.parent == _paths.images_dir() else str(row.path)
        app.warn(
            f"image {rec.name!r} is incomplete (kept at {row.path}): "
            f"`torpor image repair {target}` finishes it"
        )
    elif row.state == _store.MISSING:
        app.warn(
            f"image {row.path} is missing ({row.path.parent} is gone too): "
            f"`torpor image delete {row.path}` forgets it"
        )
