"""Warm sets: the pages a lazily restored copy touched first, replayed as a prefetch later.

When a copy restored through torpor's page server becomes resident, the 1-page requests the
server answered in the copy's first :data:`WINDOW` seconds (what faults ask for; the
background push asks for more), at most :data:`MAX_BYTES` of them, in first-touch order
(``PageServer.warm_set``), are stored as the image's warm set. The next lazy restore of the
same image hands them to the page source's ``prefetch`` before the daemon starts, so the first
request finds its pages read (locally: in the page cache; from a pool: fetched and verified).

Where: ``<home>/lazy/warm/<image id>.json`` (0600), keyed by the manifest's id, so a warm set
never outlives or mixes images. (Beside the image as ``torpor-warm.json`` would need the image
layout checks to allow that name as bookkeeping; not done yet.) A warm set is only a hint: it
is read as hostile (size bound, exact shape, every range inside a pages file of the image's
manifest and page-aligned) and anything wrong makes it ignored, never fatal.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

from .. import _paths, _safe
from .._errors import TorporError
from .._images._image import Image
from .._images._manifest import Manifest
from ._pagemap import PAGE_SIZE
from ._source import Range

if TYPE_CHECKING:
    from ._poolimage import PoolLazyImage

WINDOW = 2.0  # seconds of the copy's first faults kept
MAX_BYTES = 64 << 20  # of pages in one warm set
MERGED = 1 << 20  # bytes of one range once coalesced (a pool prefetch reads a range at once)
_MAX_FILE = 4 << 20
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")


def warm_dir() -> Path:
    """``<home>/lazy/warm``."""
    lazy = _paths.private_dir(_paths.home() / "lazy", what="lazy restore directory")
    return _paths.private_dir(lazy / "warm", what="warm set directory")


def _file(image: Image) -> str | None:
    ident = image.manifest.id
    return f"{ident}.json" if isinstance(ident, str) and _ID_RE.fullmatch(ident) else None


def clip(ranges: Sequence[Range], limit: int = MAX_BYTES) -> list[Range]:
    """The first ranges of ``ranges`` holding at most ``limit`` bytes."""
    out: list[Range] = []
    total = 0
    for r in ranges:
        if total + r[2] > limit:
            break
        out.append(r)
        total += r[2]
    return out


def coalesce(ranges: Sequence[Range], most: int = MERGED) -> list[Range]:
    """``ranges`` with each run of consecutive ones that continue each other in the same file
    merged (up to ``most`` bytes per range), in the same order. A warm set recorded from faults
    is one page per range (~5,000 for 20 MiB): checking each when it is loaded took ~8 ms of
    a lazy restore's path; merged, the same set is ~20 ranges."""
    out: list[Range] = []
    for file, offset, length in ranges:
        if out:
            f, o, n = out[-1]
            if f == file and o + n == offset and n + length <= most:
                out[-1] = (f, o, n + length)
                continue
        out.append((file, offset, length))
    return out


def save(image: Image, ranges: Sequence[Range]) -> None:
    """Store ``ranges`` (clipped to :data:`MAX_BYTES`, :func:`coalesce`d) as ``image``'s warm
    set."""
    name = _file(image)
    if name is None or not ranges:
        return
    data = json.dumps({"image": image.manifest.id, "ranges": coalesce(clip(ranges))}).encode()
    d = warm_dir()
    with _safe.opened_dir(d) as fd:
        _safe.replace_file(fd, name, data, source=str(d), durable=False)


def read_raw(image: Image) -> bytes | None:
    """The bytes of ``image``'s warm set file (not checked: see :func:`load`), or None."""
    name = _file(image)
    if name is None:
        return None
    try:
        d = warm_dir()
        with _safe.opened_dir(d) as fd:
            return _safe.read_regular(fd, name, source=str(d), limit=_MAX_FILE)
    except (OSError, TorporError):
        return None


def load(image: Image) -> list[Range]:
    """``image``'s warm set, checked against its manifest; empty if none or not sound."""
    raw = read_raw(image)
    if raw is None:
        return []
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return []
    return check(image, data)


def check(image: Image, data: object) -> list[Range]:
    """The ranges of a decoded warm set if every one is sound for ``image``, else []."""
    return check_manifest(image.manifest, data)


def check_manifest(manifest: Manifest, data: object) -> list[Range]:
    """The ranges of a decoded warm set if every one is sound for the image of ``manifest``
    (the boundary every warm set passes, local or from a pool), else []."""
    if not isinstance(data, dict) or set(data) != {"image", "ranges"}:
        return []
    if data["image"] != manifest.id or not isinstance(data["ranges"], list):
        return []
    sizes = {
        e.name: e.size
        for e in manifest.files
        if e.name.startswith("pages-") and e.name.endswith(".img")
    }
    out: list[Range] = []
    total = 0
    for item in data["ranges"]:
        if not (isinstance(item, list) and len(item) == 3):
            return []
        file, offset, length = item
        if not isinstance(file, str) or file not in sizes:
            return []
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (offset, length)):
            return []
        if offset < 0 or length <= 0 or offset % PAGE_SIZE or length % PAGE_SIZE:
            return []
        if offset + length > sizes[file]:
            return []
        total += length
        if total > MAX_BYTES:
            return []
        out.append((file, offset, length))
    return out


def of(image: Image) -> list[Range]:
    """The warm set to prefetch: a pool image's from its pool, else the local one."""
    pool = pool_image(image)
    if pool is not None and pool.warm:
        return pool.warm
    return load(image)


def pool_image(image: Image) -> PoolLazyImage | None:
    """``image`` if it is a pool image's local part (``_poolimage.PoolLazyImage``), else None.
    Without importing that module (~6 ms with the pool code it loads, on a local restore's
    path): if it was never imported, no such image exists."""
    mod = sys.modules.get("torpor._lazy._poolimage")
    if mod is None or not isinstance(image, mod.PoolLazyImage):
        return None
    return cast("PoolLazyImage", image)
