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
  ``get_stream`` returns a readable binary stream the caller closes.
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


def check_key(key: str) -> str:
    """Return ``key`` if it is valid under the contract, else raise :class:`PoolError`."""
    if not _KEY_RE.match(key) or any(seg in (".", "..") for seg in key.split("/")):
        raise PoolError(f"invalid object key {key!r}")
    return key


@runtime_checkable
class Backend(Protocol):
    """A store of keyed blobs. See the module docstring for the contract."""

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically (overwrite)."""

    def put_stream(self, key: str, stream: BinaryIO, size: int | None = None) -> None:
        """Store the content of ``stream`` under ``key`` atomically (overwrite)."""

    def get(self, key: str) -> bytes:
        """The value under ``key``; :class:`KeyError` if missing."""
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
