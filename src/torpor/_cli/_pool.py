"""``torpor pool``: create, list, show, configure, delete and garbage-collect storage pools."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ._app import App, human_bytes


def _drivers_help() -> str:
    from .._pools import DRIVERS

    lines = ["drivers and their keys:"]
    for driver in DRIVERS.values():
        lines.append(f"  {driver.name}: {driver.doc}")
        for key, spec in driver.keys.items():
            lines.append(f"    {key:<20} {spec.doc}{' (required)' if spec.required else ''}")
    return "\n".join(lines)


def register(sub: Any) -> None:
    """Add ``torpor pool`` and its subcommands."""
    p = sub.add_parser("pool", help="manage storage pools for images (dir, ceph, s3)")
    psub = p.add_subparsers(dest="pool_command", metavar="SUBCOMMAND", required=True)

    c = psub.add_parser(
        "create",
        help="create a pool",
        epilog=_drivers_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("name", metavar="NAME")
    c.add_argument("driver", metavar="DRIVER", help="dir, ceph or s3")
    c.add_argument("config", metavar="KEY=VALUE", nargs="*", help="driver configuration")
    c.set_defaults(handler=_create)

    ls = psub.add_parser("list", help="list the pools")
    ls.add_argument("--json", action="store_true", help="output JSON")
    ls.set_defaults(handler=_list)

    s = psub.add_parser("show", help="a pool's configuration and usage")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--json", action="store_true", help="output JSON")
    s.set_defaults(handler=_show)

    st = psub.add_parser(
        "set",
        help="change configuration keys (KEY= unsets)",
        epilog=_drivers_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    st.add_argument("name", metavar="NAME")
    st.add_argument("config", metavar="KEY=VALUE", nargs="+")
    st.set_defaults(handler=_set)

    u = psub.add_parser("unset", help="unset configuration keys (back to their defaults)")
    u.add_argument("name", metavar="NAME")
    u.add_argument("keys", metavar="KEY", nargs="+")
    u.set_defaults(handler=_unset)

    d = psub.add_parser("delete", help="delete a pool and the data torpor keeps in it")
    d.add_argument("name", metavar="NAME")
    d.add_argument("--force", action="store_true", help="delete it even if it holds images")
    d.set_defaults(handler=_delete)

    g = psub.add_parser("gc", help="delete chunks no image needs (safe next to transfers)")
    g.add_argument("name", metavar="NAME")
    g.add_argument(
        "--repack",
        type=float,
        default=0.5,
        metavar="FRACTION",
        help="rewrite packs less than FRACTION alive (default 0.5; 0 disables)",
    )
    g.add_argument(
        "--wait",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long to wait for running pushes/pulls before giving up (default 600)",
    )
    g.add_argument("--json", action="store_true", help="output JSON")
    g.set_defaults(handler=_gc)


def _create(app: App, args: argparse.Namespace) -> int:
    from .._pools import create_pool
    from .._pools._config import parse_assignments

    cfg = create_pool(args.name, args.driver, parse_assignments(args.config))
    app.info(f"pool {cfg.name!r} created ({cfg.driver}, {cfg.location})")
    return 0


def _list(app: App, args: argparse.Namespace) -> int:
    from .._pools import list_configs

    configs = list_configs()
    if args.json:
        app.json(
            [
                {"name": c.name, "driver": c.driver, "location": c.location, "config": c.shown()}
                for c in configs
            ]
        )
        return 0
    app.table(("NAME", "DRIVER", "LOCATION"), [(c.name, c.driver, c.location) for c in configs])
    return 0


def _show(app: App, args: argparse.Namespace) -> int:
    from .._errors import PoolError
    from .._pools import load_config, open_pool

    cfg = load_config(args.name)
    usage: dict[str, Any] = {}
    try:
        with open_pool(args.name) as pool:
            stats = pool.stats()
        usage = {
            "images": stats.images,
            "packs": stats.packs,
            "stored_bytes": stats.pack_bytes,
            "unique_chunk_bytes": stats.chunk_bytes,
        }
    except PoolError as exc:
        app.warn(f"cannot read the pool's usage: {exc}")
    if args.json:
        app.json(
            {
                "name": cfg.name,
                "driver": cfg.driver,
                "location": cfg.location,
                "created": cfg.created,
                "config": cfg.shown(),
                "usage": usage,
            }
        )
        return 0
    app.out(f"name: {cfg.name}")
    app.out(f"driver: {cfg.driver}")
    app.out(f"location: {cfg.location}")
    if cfg.created:
        app.out(f"created: {cfg.created[:19]}")
    app.out("config:")
    for key, value in cfg.shown().items():
        default = "" if key in cfg.config else "  (default)"
        app.out(f"  {key}: {value}{default}")
    if usage:
        app.out("usage:")
        app.out(f"  images: {usage['images']}")
        app.out(f"  packs: {usage['packs']} ({human_bytes(usage['stored_bytes'])} stored)")
        app.out(f"  unique chunk data: {human_bytes(usage['unique_chunk_bytes'])}")
    return 0


def _set(app: App, args: argparse.Namespace) -> int:
    from .._pools import set_pool
    from .._pools._config import parse_assignments

    cfg = set_pool(args.name, parse_assignments(args.config))
    app.info(f"pool {cfg.name!r} updated")
    return 0


def _unset(app: App, args: argparse.Namespace) -> int:
    from .._pools import set_pool

    cfg = set_pool(args.name, dict.fromkeys(args.keys, ""))
    app.info(f"pool {cfg.name!r} updated")
    return 0


def _delete(app: App, args: argparse.Namespace) -> int:
    from .._pools import delete_pool

    removed = delete_pool(args.name, force=args.force)
    app.info(f"pool {args.name!r} deleted ({removed} objects removed)")
    return 0


def _gc(app: App, args: argparse.Namespace) -> int:
    from .._pools import open_pool

    with open_pool(args.name) as pool:
        stats = pool.gc(repack=args.repack, wait=args.wait)
    if args.json:
        app.json(dataclasses.asdict(stats))
        return 0
    app.out(
        f"{stats.images} images; {stats.packs_deleted} of {stats.packs} packs deleted "
        f"({stats.packs_repacked} repacked), {stats.lists_deleted} lists deleted, "
        f"{human_bytes(stats.bytes_freed)} freed"
    )
    app.out(
        f"live chunk data {human_bytes(stats.live_bytes)}; dead data left in live packs "
        f"{human_bytes(stats.dead_bytes_kept)}"
    )
    if stats.missing_chunks:
        app.warn(
            f"{stats.missing_chunks} chunk(s) referenced by images are in no pack: "
            "pulling those images will fail"
        )
    return 0
