"""torpor's local cache of the pool objects that never change once written.

Pack indexes and chunk lists are cached under ``<torpor home>/cache/<kind>/<name>``, where
``name`` is always an id (checked by :func:`~._record.is_id` before it gets here, never a
path). A cache file is only a copy: failing to read or write one costs a re-fetch, so those
failures are not errors.
"""

from __future__ import annotations

import contextlib
import os
import uuid

from .. import _paths, _safe
from .._errors import TorporError


def _kind_dir(kind: str) -> int:
    """An fd of ``<cache>/<kind>`` (made 0700 if missing; a symlink there is refused)."""
    parent = _paths.cache_dir()
    with _safe.opened_dir(parent) as parent_fd:
        with contextlib.suppress(FileExistsError):
            os.mkdir(kind, 0o700, dir_fd=parent_fd)
        return _safe.open_dir(kind, dir_fd=parent_fd)


def write_cached(kind: str, name: str, data: bytes) -> None:
    """Write the cache file ``<cache>/<kind>/<name>`` (0600, created ``O_EXCL|O_NOFOLLOW``
    under a temporary name, then renamed) atomically; a failure only costs a later re-fetch."""
    tmp = f".{name}.{uuid.uuid4().hex[:8]}"
    try:
        dir_fd = _kind_dir(kind)
    except (OSError, TorporError):
        return
    try:
        fd = _safe.create_file(dir_fd, tmp, source=f"cache {kind}")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except (OSError, TorporError):
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def read_cached(kind: str, name: str) -> bytes | None:
    """A cache file's bytes (a regular file, opened ``O_NOFOLLOW``), or None."""
    try:
        with _safe.opened_dir(_paths.cache_dir() / kind) as dir_fd:
            fd = _safe.open_regular(dir_fd, name, source=f"cache {kind}")
            with os.fdopen(fd, "rb") as fh:
                return fh.read()
    except (OSError, TorporError):
        return None


def drop_cached(kind: str, name: str) -> None:
    """Remove the cache file ``<cache>/<kind>/<name>`` if there is one."""
    with contextlib.suppress(OSError):
        (_paths.cache_dir() / kind / name).unlink()
