"""When ``torpor restore`` is lazy without being asked: images whose memory reaches a threshold.

A lazy restore pays off for big images and costs a little on small ones (the daemon's start,
faults; see ``bench/RESULTS-lazy.md``: the 115-163 MiB images gained nothing, the 1 GiB one
answered 2x sooner). So the default is a size threshold on the image's memory (the sum of its
``pages-*.img`` files), set

- per pool, for ``NAME@POOL``: the pool key ``restore.lazy_above``
  (``torpor pool set POOL restore.lazy_above=512MiB``);
- for this home's local images: the file ``<home>/lazy-above`` holding a size (``1GiB``; it
  must be a regular file of torpor's user, not writable by others: ``_paths.read_home_file``).

A size is a whole number with an optional unit (``K``, ``M``, ``G``, ``T``, with or without
``iB``; powers of 1024): ``0`` makes every restore lazy. Unset (or unreadable): never lazy by
default. ``--lazy`` and ``--no-lazy`` always decide.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .. import _paths
from .._errors import UsageError

POOL_KEY = "restore.lazy_above"
HOME_FILE = "lazy-above"
_SIZE = re.compile(r"([0-9]{1,15})\s*(?:([KMGT])(?:i?B)?|B)?", re.IGNORECASE)
_UNITS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}


def parse_size(value: str, *, source: str) -> int:
    """Bytes of a size like ``512MiB``; :class:`UsageError` naming ``source`` if it is not one."""
    m = _SIZE.fullmatch(value.strip())
    if m is None:
        raise UsageError(
            f"{source}: {value.strip()[:40]!r} is not a size",
            hint="write a whole number with an optional unit: 0, 512MiB, 1G",
        )
    return int(m.group(1)) << _UNITS[(m.group(2) or "").upper()]


def memory_bytes(files: Iterable[tuple[str, int]]) -> int:
    """The image's memory: the sizes of its ``pages-*.img`` files (``(name, size)`` pairs)."""
    return sum(size for name, size in files if name.startswith("pages-") and name.endswith(".img"))


def home_threshold() -> int | None:
    """This home's threshold for local images, or None if not set."""
    raw = _paths.read_home_file(HOME_FILE, limit=64)
    if raw is None:
        return None
    return parse_size(raw.decode("ascii", errors="replace"), source=f"<home>/{HOME_FILE}")


def pool_threshold(pool: str) -> int | None:
    """Pool ``pool``'s threshold (its key :data:`POOL_KEY`), or None if not set."""
    from .._pools import _config

    value = _config.load(pool).effective().get(POOL_KEY)
    return None if value is None else parse_size(value, source=f"pool {pool!r} key {POOL_KEY}")


def lazy_by_default(arg: str) -> bool:
    """Whether ``torpor restore ARG`` (a local image or ``NAME@POOL``) goes lazy when neither
    ``--lazy`` nor ``--no-lazy`` is given (see the module docstring)."""
    if "@" in arg and "/" not in arg:
        name, pool_name = arg.rsplit("@", 1)
        threshold = pool_threshold(pool_name)
        if threshold is None:
            return False
        from .._pools import open_pool

        with open_pool(pool_name) as pool:
            rec = pool._record(name)
        return memory_bytes((f.name, f.size) for f in rec.files) >= threshold
    threshold = home_threshold()
    if threshold is None:
        return False
    from .._images import _store
    from .._images._image import Image

    image = Image.open(_store.resolve(arg))
    return memory_bytes((e.name, e.size) for e in image.manifest.files) >= threshold
