"""The storage backend contract: keyed blobs, nothing more.

Every pool driver (``dir``, ``ceph``, ``s3``) implements :class:`Backend` on plain primitives
(``str`` keys, ``bytes`` values, binary streams). Everything image-shaped (chunking,
deduplication, compression, manifests, garbage collection) lives above this line and is
written once.

Contract (checked by the shared conformance suite in ``tests/conformance``):

- Keys are ``/``-separated ASCII strings of ``[A-Za-z0-9._-]`` segments; no empty segment,
  no ``.``/``..`` segment. Backends may reject others with :class:`~torpor.PoolError`.
- ``put`` is atomic: a reader sees either no object or the whole new value, never a part.
  ``put`` overwrites. ``put_stream`` is ``put`` from a readable binary stream of known or
  unknown length (large objects; drivers use multipart or striping as they see fit).
- ``get`` of a missing key raises :class:`KeyError` (the key as its argument).
  ``get(key, limit=N)`` raises :class:`PoolObjectTooLargeError` (:func:`too_large`) when the value
  is larger than ``N`` bytes, and never holds more than ``N + 1`` bytes of it to find out: a
  pool's content is hostile, and an object of any size must not make root allocate it.
  ``get_stream`` returns a readable binary stream the caller closes (and bounds its reads).
- ``exists`` / ``size`` are cheap metadata calls; ``size`` raises :class:`KeyError` if missing.
- ``list(prefix)`` yields every key starting with ``prefix`` (a plain string prefix, not a
  glob), in no particular order; it is safe to call while other writers add keys.
- ``delete`` is idempotent: deleting a missing key is not an error.
- Objects are readable by their owner only where the backend has such a notion (files 0600).
- Backend-specific failures are converted at the driver's boundary into
  :class:`~torpor.PoolError` with ``raise ... from exc``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import BinaryIO, Protocol, runtime_checkable

from .._errors import PoolError

_KEY_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
# What to do about an object larger than torpor writes: the pool's own tools, no guessing.
OVERSIZE_HINT = (
    "the pool holds an object larger than torpor writes: it is damaged or not torpor's; "
    "delete the image that needs it (`torpor image delete NAME@POOL`), then "
    "`torpor pool gc POOL` removes what no image needs"
)
_READ_BLOCK = 4 << 20


def check_key(key: str) -> str:
    """Return ``key`` if it is valid under the contract, else raise :class:`PoolError`."""
    if not _KEY_RE.match(key) or any(seg in (".", "..") for seg in key.split("/")):
        raise PoolError(f"invalid object key {key!r}")
    return key


class PoolObjectTooLargeError(PoolError):
    """A pool object is larger than torpor reads for it (:func:`too_large`): ``key``, its
    ``size`` (None: over ``limit``, the exact size unknown) and the ``limit``."""

    def __init__(
        self, msg: str, *, key: str, size: int | None, limit: int, pool: str | None = None
    ) -> None:
        super().__init__(msg, pool=pool, hint=OVERSIZE_HINT)
        self.key = key
        self.size = size
        self.limit = limit


def too_large(
    key: str, where: str, size: int | None, limit: int, *, pool: str | None = None
) -> PoolObjectTooLargeError:
    """The error for the value of ``key`` in ``where`` (``"dir pool /srv/p"``...) being
    ``size`` bytes (None: more than ``limit``, the exact size unknown) over ``limit``."""
    got = f"{size} bytes" if size is not None else f"more than {limit} bytes"
    return PoolObjectTooLargeError(
        f"key {key!r} in {where} is {got}, over the {limit} bytes torpor reads for it; not read",
        key=key,
        size=size,
        limit=limit,
        pool=pool,
    )


def read_at_most(
    stream: BinaryIO,
    key: str,
    where: str,
    limit: int,
    *,
    expect: int | None = None,
    pool: str | None = None,
) -> bytes:
    """The rest of ``stream``, of which ``limit + 1`` bytes at most are read (:func:`too_large`
    if there is more). ``expect`` is the length the stream said it has, read in one call; the
    rest goes in blocks, so no buffer of ``limit`` bytes is made for a short value."""
    parts: list[bytes] = []
    got = 0
    step = min(limit, expect) + 1 if expect is not None else _READ_BLOCK
    while got <= limit and (part := stream.read(min(step, limit + 1 - got))):
        parts.append(part)
        got += len(part)
        step = _READ_BLOCK
    if got > limit:
        raise too_large(key, where, None, limit, pool=pool)
    return parts[0] if len(parts) == 1 else b"".join(parts)


@runtime_checkable
class Backend(Protocol):
    """A store of keyed blobs. See the module docstring for the contract."""

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically (overwrite)."""

    def put_stream(self, key: str, stream: BinaryIO, size: int | None = None) -> None:
        """Store the content of ``stream`` under ``key`` atomically (overwrite)."""

    def get(self, key: str, limit: int | None = None) -> bytes:
        """The value under ``key``; :class:`KeyError` if missing, :class:`~torpor.PoolError`
        if it is larger than ``limit`` bytes (found out before it is read whole)."""
        ...

    def get_stream(self, key: str) -> BinaryIO:
        """A readable stream of the value under ``key``; :class:`KeyError` if missing."""
        ...

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""
        ...

    def size(self, key: str) -> int:
        """The size in bytes of the value under ``key``; :class:`KeyError` if missing."""
        ...

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key starting with ``prefix``."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; no error if it is missing."""

    def close(self) -> None:
        """Release connections; the backend is unusable afterwards."""
