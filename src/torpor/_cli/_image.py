"""``torpor image``: copy, export, import, push and pull images in pools; delete and prune
local images or a pool's; repair an incomplete local image.

Images in pools are written ``NAME@POOL``; a bare ``NAME`` means the ``default`` pool, but for
``delete`` (a local image: a name in the store, or a path) and ``prune`` (local images unless
``--pool`` is given).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from .._errors import TorporError, UsageError
from ._app import App, human_bytes


def register(sub: Any) -> None:
    """Add ``torpor image`` and its subcommands."""
    p = sub.add_parser(
        "image", help="delete, prune and repair local images; copy, export, import, push, pull"
    )
    isub = p.add_subparsers(dest="image_command", metavar="SUBCOMMAND", required=True)

    c = isub.add_parser(
        "copy", help="copy an image (O(1) in one pool; only missing chunks between pools)"
    )
    c.add_argument("src", metavar="SRC[@POOL]")
    c.add_argument("dst", metavar="DST[@POOL]")
    c.set_defaults(handler=_copy)

    d = isub.add_parser(
        "delete",
        help="delete a local image (NAME or PATH) or an image in a pool (NAME@POOL)",
        description="Delete a local image: NAME in the local store, or the image directory "
        "PATH (`torpor images` lists both; an incomplete image by its name or path too), or "
        "an image in a pool, NAME@POOL. Only directories that are torpor's images are "
        "deleted. An image whose directory is gone with its disk is forgotten.",
    )
    d.add_argument("image", metavar="NAME|PATH|NAME@POOL")
    d.set_defaults(handler=_delete)

    pr = isub.add_parser(
        "prune",
        help="keep the K newest images of each program, delete the others (local images, "
        "or a pool's with --pool)",
        description="Keep the K newest complete images of each program (same command line) "
        "among those whose name starts with PREFIX, and delete the others: the local images "
        "`torpor images` lists, or a pool's with --pool. Incomplete, broken and missing "
        "images are left alone.",
    )
    pr.add_argument("prefix_arg", nargs="?", metavar="PREFIX", help="only these images")
    pr.add_argument("--keep", type=int, default=1, metavar="K", help="how many (default: 1)")
    pr.add_argument("--pool", help="prune this pool instead of the local images")
    pr.add_argument("--prefix", help="same as PREFIX")
    pr.add_argument(
        "--gc", action="store_true", help="garbage-collect the pool afterwards (with --pool)"
    )
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
    if "@" in args.image and "/" not in args.image:
        from .._pools import open_pool

        name, pool_name = _split(args.image)
        with open_pool(pool_name) as pool:
            pool.delete_image(name)
        app.info(f"deleted {name}@{pool_name} (`torpor pool gc {pool_name}` frees its chunks)")
        return 0
    from .._images import _remove

    path, removed = _remove.delete(args.image)
    app.info(f"deleted {path}" if removed else f"forgot {path} (its directory is gone)")
    return 0


def _prune(app: App, args: argparse.Namespace) -> int:
    if args.prefix and args.prefix_arg and args.prefix != args.prefix_arg:
        raise UsageError("give the prefix once (PREFIX or --prefix)")
    prefix = args.prefix or args.prefix_arg
    if args.pool is None:
        if args.gc:
            raise UsageError("--gc garbage-collects a pool: give --pool POOL")
        from .._images import _remove

        _remove.prune(args.keep, prefix=prefix, done=lambda row: app.out(f"deleted {row.path}"))
        return 0
    from .._pools import open_pool

    with open_pool(args.pool) as pool:
        deleted = pool.prune(args.keep, prefix=prefix)
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
    from .._images import _incomplete, _index, _store
    from .._process import _proc, _registry

    name = _store.check_name(args.name) if args.name else None
    left = _incomplete.find(args.image, _paths.images_dir())
    image = _incomplete.repair(left, name=name)
    if image.path != left.dest:
        with contextlib.suppress(OSError, TorporError):
            _index.forget(left.dest)
    _index.try_add(image.path)  # listed wherever it is
    record = left.record
    if not record.leave_running:
        # Best effort: a record of the process says where it went.
        with contextlib.suppress(OSError, TorporError):
            _registry.mark_checkpointed(_proc.ProcRef(record.pid, record.start_time), image.path)
    app.info(f"repaired: {human_bytes(image.manifest.total_bytes)} image of pid {record.pid}")
    app.out(str(image.path))
    return 0
