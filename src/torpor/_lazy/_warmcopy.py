"""The warm set of one lazy copy (``_restore.LazyCopy``): the warm image a served copy
restores from, and the warm set a resident copy leaves for the next restore.

A warm set is only ever a hint: what cannot be made or saved is said on stderr, never a
failure of the copy.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .._errors import TorporError
from .._images._image import Image
from .._images._manifest import now_iso
from . import _eager, _warm, _warmcache
from ._pagemap import load_pagemaps
from ._served import Server
from ._source import Range


def served_warm(image: Image, work_dir: Path) -> tuple[Path, list[Range], int] | None:
    """The warm image a served copy of ``image`` restores from (its directory, the warm set
    it was made of, its bytes): only a pool image's local part, whose warm chunks were
    fetched into it (``_eager``: for a trusted image, checked again once made). Not for
    other served images (a migration target's holds no pages): CRIU would restore holes as
    the process's memory. A local image's: ``LazyCopy._early``."""
    pool = _warm.pool_image(image)
    if pool is None or not pool.holds(pool.warm):
        return None
    warm = pool.warm
    if not warm:
        return None
    try:
        made = image.trusted() and _eager.warm_image(image, warm, work_dir / "image")
    except (OSError, TorporError) as exc:  # a hint lost, not a failure
        print(f"{now_iso()} lazy restore: warm set not used: {exc}", file=sys.stderr)
        return None
    if not made or not image.trusted():
        return None
    return made[0], warm, made[1]


def save_warm(
    image: Image,
    *,
    server: Server | None,
    faults_log: Path | None,
    used: list[Range],
    warm_dir: Path | None,
) -> None:
    """Save the warm set of a resident copy of ``image``: what ``server`` was asked for, or
    for a copy CRIU served itself what its daemon logged (``faults_log``; None: it logged
    nothing), added to the warm set ``used`` for its warm image (``warm_dir``)."""
    try:
        if server is None:
            if faults_log is None:
                return
            ranges = _eager.faults(
                faults_log, load_pagemaps(image.path), window=_warm.WINDOW, limit=_warm.MAX_BYTES
            )
            if ranges:  # added to the one used (its pages were never faulted)
                # A kept warm image was used as it was: its warm set is the file's.
                used = used or (_warm.load(image) if warm_dir else [])
                _warm.save(image, list(dict.fromkeys([*used, *ranges])))
            _warmcache.ensure(image)  # the next restore's warm image, made now
            return
        ranges = server.warm_set(within=_warm.WINDOW)
        if warm_dir is not None:  # those restored eagerly were never asked for
            ranges = list(dict.fromkeys([*_warm.of(image), *ranges]))
        _warm.save(image, ranges)
        pool = _warm.pool_image(image)
        if pool is not None:  # beside the image: in its pool
            pool.save_warm(ranges)
    except Exception as exc:  # a hint lost, not a failure: the copy is resident
        print(f"{now_iso()} lazy restore: warm set not saved: {exc}", file=sys.stderr)
