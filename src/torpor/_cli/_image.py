"""``torpor image``: copy, delete, prune, export, import, push and pull images in pools; repair
an incomplete local image.

Images in pools are written ``NAME@POOL``; a bare ``NAME`` means the ``default`` pool.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from .._errors import TorporError
from ._app import App, human_bytes


def register(sub: Any) -> None:
    """Add ``torpor image`` and its subcommands."""
    p = sub.add_parser("image", help="copy, delete, prune, export and import images in pools")
    isub = p.add_subparsers(dest="image_command", metavar="SUBCOMMAND", required=True)

    c = isub.add_parser(
        "copy", help="copy an image (O(1) in one pool; only missing chunks between pools)"
    )
    c.add_argument("src", metavar="SRC[@POOL]")
    c.add_argument("dst", metavar="DST[@POOL]")
    c.set_defaults(handler=_copy)

    d = isub.add_parser("delete", help="delete an image from a pool")
    d.add_argument("image", metavar="NAME[@POOL]")
    d.set_defaults(handler=_delete)

    pr = isub.add_parser(
        "prune", help="keep the N newest images of each program, delete the others"
    )
    pr.add_argument("--keep", type=int, required=True, metavar="N")
    pr.add_argument("--pool", default="default", help="the pool (default: default)")
    pr.add_argument("--prefix", help="only images whose name starts with this")
    pr.add_argument("--gc", action="store_true", help="garbage-collect the pool afterwards")
    pr.set_defaults(handler=_prune)

    e = isub.add_parser("export", help="write an image and its chunks into one file")
    e.add_argument("image", metavar="NAME[@POOL]")
    e.add_argument("file", metavar="FILE", help="the archive to create ('-' for stdout)")
    e.set_defaults(handler=_export)

    i = isub.add_parser("import", help="store the image of an exported file in a pool")
    i.add_argument("file", metavar="FILE")
    i.add_argument("--name", help="store it under this name (default: its exported name)")
    i.add_argument("--pool", default="default", help="the pool (default: default)")
    i.set_defaults(handler=_import)

    pu = isub.add_parser("push", help="store a local image (name or directory) in a pool")
    pu.add_argument("local", metavar="LOCAL")
    pu.add_argument("image", metavar="NAME[@POOL]")
    pu.set_defaults(handler=_push)

    pl = isub.add_parser(
        "pull", help="fetch and verify an image into the local cache; print its directory"
    )
    pl.add_argument("image", metavar="NAME[@POOL]")
    pl.set_defaults(handler=_pull)

    r = isub.add_parser(
        "repair",
        help="finish an incomplete local image (one a checkpoint could not finish)",
        description="Finish an image a checkpoint kept incomplete (`torpor images` shows it): "
        "hash its files, write and sign its manifest, give it its name. NAME is the image's "
        "name in the local store; PATH its staging directory, or the directory it was going "
        "to (-o).",
    )
    r.add_argument("image", metavar="NAME|PATH")
    r.add_argument("--name", help="give the image this name instead (its own is taken)")
    r.set_defaults(handler=_repair)


def _split(arg: str) -> tuple[str, str]:
    """``NAME@POOL`` → ``(NAME, POOL)``; a bare name is in the default pool."""
    from .._pools import DEFAULT_POOL

    name, sep, pool = arg.rpartition("@")
    return (name, pool) if sep else (arg, DEFAULT_POOL)


def _copy(app: App, args: argparse.Namespace) -> int:
    from .._pools import open_pool

    src, src_pool = _split(args.src)
    dst, dst_pool = _split(args.dst)
    with open_pool(src_pool) as source:
        size = source.image(src).size
        if dst_pool == src_pool:
            with app.progress(f"copy {src} → {dst}", size) as bar:
                copied = source.copy_image(src, dst, progress=bar.advance)
        else:
            with (
                open_pool(dst_pool) as target,
                app.progress(f"copy {src}@{src_pool} → {dst}@{dst_pool}", size) as bar,
            ):
                copied = source.copy_image(src, dst, to_pool=target, progress=bar.advance)
    app.info(f"copied: {human_bytes(copied.stored_bytes)} new in pool {dst_pool!r}")
    app.out(f"{copied.name}@{copied.pool}")
    return 0


def _delete(app: App, args: argparse.Namespace) -> int:
    from .._pools import open_pool

    name, pool_name = _split(args.image)
    with open_pool(pool_name) as pool:
        pool.delete_image(name)
    app.info(f"deleted {name}@{pool_name} (`torpor pool gc {pool_name}` frees its chunks)")
    return 0


def _prune(app: App, args: argparse.Namespace) -> int:
    from .._pools import open_pool

    with open_pool(args.pool) as pool:
        deleted = pool.prune(args.keep, prefix=args.prefix)
        for image in deleted:
            app.out(f"deleted {image.name}@{image.pool}")
        if args.gc:
            stats = pool.gc()
            app.info(
                f"gc: {stats.packs_deleted} packs deleted, {human_bytes(stats.bytes_freed)} freed"
            )
        elif deleted:
            app.info(f"`torpor pool gc {args.pool}` frees their chunks")
    return 0


def _export(app: App, args: argparse.Namespace) -> int:
    from .._pools import open_pool

    name, pool_name = _split(args.image)
    with open_pool(pool_name) as pool:
        size = pool.image(name).size
        with app.progress(f"export {name}@{pool_name}", size) as bar:
            if args.file == "-":
                pool.export_image(name, sys.stdout.buffer, progress=bar.advance)
                sys.stdout.buffer.flush()
            else:
                pool.export_image(name, args.file, progress=bar.advance)
    app.info(f"exported {name}@{pool_name}" + ("" if args.file == "-" else f" to {args.file}"))
    return 0


def _import(app: App, args: argparse.Namespace) -> int:
    from .._pools import open_pool

    with open_pool(args.pool) as pool, app.progress(f"import {args.file}", None) as bar:
        imported = pool.import_image(args.file, args.name, progress=bar.advance)
    app.info(f"imported: {human_bytes(imported.stored_bytes)} new in pool {args.pool!r}")
    app.out(f"{imported.name}@{imported.pool}")
    return 0


def _push(app: App, args: argparse.Namespace) -> int:
    from .._images._image import Image
    from .._images._store import resolve
    from .._pools import open_pool

    image = Image.open(resolve(args.local))
    name, pool_name = _split(args.image)
    with (
        open_pool(pool_name) as pool,
        app.progress(f"push {name}@{pool_name}", image.manifest.total_bytes) as bar,
    ):
        pushed = pool.push(image, name, progress=bar.advance)
    app.info(f"pushed: {human_bytes(pushed.stored_bytes)} new in pool {pool_name!r}")
    app.out(f"{pushed.name}@{pushed.pool}")
    return 0


def _pull(app: App, args: argparse.Namespace) -> int:
    from .._pools import open_pool

    name, pool_name = _split(args.image)
    with open_pool(pool_name) as pool:
        size = pool.image(name).size
        with app.progress(f"pull {name}@{pool_name}", size) as bar:
            image = pool.pull(name, progress=bar.advance)
    app.out(str(image.path))
    return 0


def _repair(app: App, args: argparse.Namespace) -> int:
    from .. import _paths
    from .._images import _incomplete, _store
    from .._process import _proc, _registry

    name = _store.check_name(args.name) if args.name else None
    left = _incomplete.find(args.image, _paths.images_dir())
    image = _incomplete.repair(left, name=name)
    record = left.record
    if not record.leave_running:
        # Best effort: a record of the process says where it went.
        with contextlib.suppress(OSError, TorporError):
            _registry.mark_checkpointed(_proc.ProcRef(record.pid, record.start_time), image.path)
    app.info(f"repaired: {human_bytes(image.manifest.total_bytes)} image of pid {record.pid}")
    app.out(str(image.path))
    return 0
