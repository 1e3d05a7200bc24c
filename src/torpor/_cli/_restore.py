"""``torpor restore``: bring an image back as running processes."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ._app import App


def register(sub: Any) -> None:
    """Add the command."""
    p = sub.add_parser(
        "restore",
        help="restore an image (a local name, a path, or NAME@POOL)",
        description="Restore IMAGE as running, managed processes. The image's checksums are "
        "verified before any restored task runs; a corrupted image is refused.",
    )
    p.add_argument("image", metavar="IMAGE", help="a local image name, a path, or NAME@POOL")
    p.add_argument("--name", help="name of the restored process (default: the image's name)")
    p.add_argument(
        "--count",
        type=int,
        default=1,
        metavar="K",
        help="restore K copies at once (as many as free memory holds, within a fixed bound); "
        "copies of a server share its listening ports, the kernel spreading connections",
    )
    p.add_argument(
        "--reuseport",
        action="store_true",
        default=None,
        help="restore listening sockets with SO_REUSEPORT even for one copy, so that copies "
        "restored later share the port with it (automatic with --count above 1)",
    )
    tcp = p.add_mutually_exclusive_group()
    tcp.add_argument(
        "--tcp-established",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="restore established TCP connections (default: as the image was dumped)",
    )
    tcp.add_argument(
        "--tcp-close",
        action="store_true",
        help="restore established TCP connections closed: an image that held one can then be "
        "restored again, and as copies",
    )
    verify = p.add_mutually_exclusive_group()
    verify.add_argument(
        "--full-verify",
        action="store_true",
        help="re-hash every file (by default files unchanged since they were hashed are trusted)",
    )
    verify.add_argument("--no-verify", action="store_true", help="skip checksum verification")
    p.add_argument(
        "--lazy",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="post-copy memory: resume as soon as everything but the memory is restored, the "
        "pages following as they are touched and in the background (the same verification "
        "first); prints time-to-resume and time-to-fully-resident. Default: lazy when the "
        "image's memory reaches the pool's restore.lazy_above, or for a local image the size "
        "in <home>/lazy-above; else not",
    )
    p.add_argument(
        "--wait-resident",
        action="store_true",
        help="with --lazy: return only once every copy's memory is fully resident (or failed)",
    )
    p.add_argument("--json", action="store_true", help="output JSON")
    p.set_defaults(handler=_restore)


def open_image(app: App, arg: str) -> Any:
    """An :class:`Image` from a local name, a path, or ``NAME@POOL`` (pulled into the cache)."""
    from .._images import _store
    from .._images._image import Image

    if "@" in arg and "/" not in arg:
        name, pool_name = arg.rsplit("@", 1)
        from .._pools import open_pool

        # Closed once pulled: the command may go on as a long-lived keeper (in an agent worker).
        with open_pool(pool_name) as pool, app.progress(f"pull {arg}", None) as bar:
            return pool.pull(name, progress=bar.advance)
    return Image.open(_store.resolve(arg))


def open_lazy_pool_image(app: App, arg: str) -> Any:
    """For ``NAME@POOL --lazy``: only the image's local part (every file but the lazy pages,
    each chunk verified; see :mod:`torpor._lazy._poolimage`), or None for a local image."""
    if "@" not in arg or "/" in arg:
        return None
    name, pool_name = arg.rsplit("@", 1)
    from .._lazy import _poolimage
    from .._pools import open_pool

    # Closed once fetched: the keeper opens the pool again for the lazy pages.
    with open_pool(pool_name) as pool, app.progress(f"fetch {arg} (lazy)", None):
        return _poolimage.materialise(pool, name)


def _restore(app: App, args: argparse.Namespace) -> int:
    from .._images._store import check_name
    from .._process._copies import check_count

    check_count(args.count)  # before a pull: memory is judged once the image is here
    from .._lazy import _sweep

    _sweep.sweep_home()  # what killed keepers left of lazy restores
    started = time.perf_counter()
    wall = time.time()
    if args.lazy is None:
        from .._lazy import _policy

        args.lazy = _policy.lazy_by_default(args.image)
    partial = open_lazy_pool_image(app, args.image) if args.lazy else None
    image = partial if partial is not None else open_image(app, args.image)
    # What of a pool image is local when its copies resume: nothing more is written to its
    # local part, which goes once they are resident (maybe before the report is made).
    local = _local_bytes(partial) if partial is not None else None
    from .._lazy import _prestart

    try:
        base = args.name or image.name
        check_name(base, what="process name")
        names = [base] if args.count == 1 else [f"{base}-{i}" for i in range(1, args.count + 1)]
        if args.lazy and partial is None and args.count == 1:
            from .._engine import find_criu
            from .._lazy._restore import LazyCopy

            # Its daemon starts now, while the keeper reserves the name and judges the image.
            _prestart.begin(LazyCopy, image, base, find_criu())
        procs = _restore_copies(args, image, names)
    except BaseException:
        if partial is not None:  # else the keeper removes it once its copies ended
            partial.discard()
        raise
    finally:
        _prestart.drop()  # begun and not taken by the keeper's restore
    elapsed = time.perf_counter() - started
    if args.lazy:
        return _report_lazy(app, args, procs, elapsed, wall, partial, local)
    if args.json:
        app.json([{"name": p.name, "pid": p.pid} for p in procs])
    else:
        for p in procs:
            app.out(f"{p.name} {p.pid}")
    app.info(f"restored {len(procs)} cop{'y' if len(procs) == 1 else 'ies'} in {elapsed:.3f}s")
    return 0


def _restore_copies(args: argparse.Namespace, image: Any, names: list[str]) -> list[Any]:
    from .._process import _manage

    return _manage.restore(
        image,
        names=names,
        tcp_established=args.tcp_established,
        tcp_close=args.tcp_close,
        reuseport=args.reuseport,
        verify=False if args.no_verify else "full" if args.full_verify else True,
        # Names from --name are the user's: refused if taken. Automatic ones (the image's
        # name) are replaced by fresh ones instead, as the keeper reserves them.
        rename_taken=not args.name,
        lazy=args.lazy,
    )


def _report_lazy(
    app: App,
    args: argparse.Namespace,
    procs: list[Any],
    resumed: float,
    began: float,
    partial: Any = None,
    local: int | None = None,
) -> int:
    """Time-to-resume (the command's start to every copy running) and, per copy, time to
    fully resident (from the keeper's record: known, or still filling) or why it failed. From
    a pool (``partial``): how much of the image was local when the copies resumed (``local``,
    measured before they started)."""
    from .._lazy import _restore as lazy

    names = [p.name for p in procs]
    states = lazy.wait_states(names, timeout=None if args.wait_resident else 0.0)
    rows = []
    code = 0
    for p in procs:
        st = states.get(p.name)
        resident = round(st.resident_at - began, 6) if st is not None and st.resident_at else None
        state = st.state if st is not None else "unknown"
        if state == lazy.FAILED:
            code = 1
        rows.append(
            {
                "name": p.name,
                "pid": p.pid,
                "resume_s": round(resumed, 6),
                "resident_s": resident,
                "memory": state,
                "error": st.error if st is not None else None,
            }
        )
        if partial is not None:
            rows[-1]["local_bytes"] = local
            rows[-1]["image_bytes"] = partial.record.size
    if args.json:
        app.json(rows)
    else:
        for row in rows:
            app.out(f"{row['name']} {row['pid']}")
    app.info(
        f"restored {len(procs)} cop{'y' if len(procs) == 1 else 'ies'} lazily: "
        f"time-to-resume {resumed:.3f}s"
    )
    if partial is not None:
        where = f"{local / (1 << 20):.1f} MiB" if local is not None else "(gone: resident)"
        app.info(f"local at resume: {where} of {partial.record.size / (1 << 20):.1f} MiB")
    for row in rows:
        if row["resident_s"] is not None:
            app.info(f"{row['name']}: time-to-fully-resident {row['resident_s']:.3f}s")
        elif row["memory"] == lazy.FAILED:
            app.info(f"{row['name']}: {row['error']}")
        else:
            app.info(
                f"{row['name']}: memory still filling (`torpor restore --wait-resident` "
                "waits for it)"
            )
    return code


def _local_bytes(partial: Any) -> int | None:
    from .._errors import TorporError

    try:
        return int(partial.local_bytes)
    except (OSError, TorporError):
        return None  # already removed: every copy resident (or ended) by now
