"""An in-memory :class:`~torpor._pools._backend.Backend`: the test double shipped with torpor.

It keeps the whole contract (atomic ``put``, :class:`KeyError` on a missing key, idempotent
``delete``, listing that tolerates concurrent writers) so that everything above the backend line
can be tested without a disk, a cluster or a network. It is thread-safe.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from typing import BinaryIO

from .._errors import PoolError
from ._backend import check_key, too_large
from ._leases import MemoryLeases


class MemoryBackend:
    """Keyed blobs in a dict, guarded by a lock."""

    def __init__(self) -> None:
        self._objects: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _check(self, key: str) -> str:
        if self._closed:
            raise PoolError("memory backend is closed")
        return check_key(key)

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` (overwrite)."""
        self._check(key)
        value = bytes(data)
        with self._lock:
            self._objects[key] = value

    def put_stream(self, key: str, stream: BinaryIO, size: int | None = None) -> None:
        """Store the rest of ``stream`` under ``key`` (``size`` is only a hint here)."""
        self.put(key, stream.read())

    def get(self, key: str, limit: int | None = None) -> bytes:
        """The value under ``key``; :class:`KeyError` if missing, :class:`~torpor.PoolError`
        if over ``limit`` bytes."""
        self._check(key)
        with self._lock:
            value = self._objects[key]
        if limit is not None and len(value) > limit:
            raise too_large(key, "the memory backend", len(value), limit)
        return value

    def get_stream(self, key: str) -> BinaryIO:
        """A stream over the value under ``key``; :class:`KeyError` if missing."""
        return io.BytesIO(self.get(key))

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""
        self._check(key)
        with self._lock:
            return key in self._objects

    def size(self, key: str) -> int:
        """Size of the value under ``key``; :class:`KeyError` if missing."""
        return len(self.get(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key starting with ``prefix`` (a snapshot taken at the call)."""
        if self._closed:
            raise PoolError("memory backend is closed")
        with self._lock:
            keys = [k for k in self._objects if k.startswith(prefix)]
        return iter(keys)

    def delete(self, key: str) -> None:
        """Remove ``key`` if present."""
        self._check(key)
        with self._lock:
            self._objects.pop(key, None)

    def close(self) -> None:
        """Mark the backend closed; later calls raise :class:`~torpor.PoolError`."""
        self._closed = True

    def leases(self) -> MemoryLeases:
        """The backend's leases (one table per backend, kept in memory)."""
        with self._lock:
            store: MemoryLeases | None = getattr(self, "_lease_store", None)
            if store is None:
                store = self._lease_store = MemoryLeases()
        return store
