"""Deleting local images: ``torpor image delete NAME|PATH`` and ``torpor image prune``.

torpor deletes, as root, directories that users name or that its index names, so it deletes
only what it can tell is one of its images: a real directory (never a symlink, never
followed), private (:func:`torpor._safe.check_private`: nobody else could have put something
there), holding a manifest or an incomplete image's record and no directory, and not in use
by a checkpoint (its lock is free). Everything is removed relative to the directory's fd and
its parent's, after checking the name still is that directory. Anything else is refused in one
line, and nothing of it is removed.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from .. import _paths
from .._errors import ImageError, ImageNotFoundError, TorporError, UnsafePathError, UsageError
from .._safe import check_private, lstat_entries, open_dir
from . import _incomplete, _index
from ._image import check_same
from ._incomplete import RECORD_NAME, Leftover
from ._layout import MANIFEST_NAME
from ._store import OK, Listed, check_name, is_path, list_all


def delete(arg: str) -> tuple[Path, bool]:
    """Delete the local image ``arg`` (a name in the store, or a path; an incomplete image
    by the name or destination its checkpoint had, or by its staging directory) and forget
    it: the directory, and True. An indexed image whose directory is gone is only forgotten:
    its path, and False."""
    if is_path(arg):
        path = _index.normal(arg)
        if os.path.lexists(path):
            remove(path)
            return path, True
        left = _one_leftover(arg, path.parent, lambda left: left.record.dest == path.name)
        if left is not None:
            return _remove_leftover(left), True
        if _index.known(path):
            _index.forget(path)
            return path, False
        raise ImageNotFoundError(f"no image directory {path}", image=arg)
    store = _paths.images_dir()
    path = store / check_name(arg)
    if os.path.lexists(path):
        remove(path)
        return path, True
    left = _one_leftover(arg, store, lambda left: arg in (left.record.dest, left.record.name))
    if left is not None:
        return _remove_leftover(left), True
    raise ImageNotFoundError(
        f"no local image named {arg!r}",
        image=arg,
        hint="`torpor images` lists local images; an image in a pool is NAME@POOL",
    )


def _one_leftover(arg: str, parent: Path, match: Callable[[Leftover], bool]) -> Leftover | None:
    lefts = [left for left in _incomplete.scan(parent) if match(left)]
    if len(lefts) > 1:
        raise UsageError(
            f"{len(lefts)} incomplete images are named {arg!r}: "
            + ", ".join(str(left.path) for left in lefts),
            hint="delete one by its path",
        )
    return lefts[0] if lefts else None


def _remove_leftover(left: Leftover) -> Path:
    remove(left.path)
    with contextlib.suppress(OSError, TorporError):
        _index.forget(left.dest)
    return left.path


def prune(keep: int, *, prefix: str | None = None, done: Callable[[Listed], None]) -> int:
    """Delete all but the ``keep`` newest complete local images of each program (same
    command line), among those whose name starts with ``prefix`` (all if None), calling
    ``done`` with each deleted one; how many were deleted. Incomplete, broken and missing
    images are left (delete them by name or path)."""
    if keep < 0:
        raise UsageError(f"--keep must be 0 or more, not {keep}")
    groups: dict[tuple[str, ...], list[Listed]] = defaultdict(list)
    for row in list_all().images:
        wanted = prefix is None or row.name.startswith(prefix)
        if row.state == OK and row.image is not None and wanted:
            groups[row.image.manifest.cmdline].append(row)
    deleted = 0
    for rows in groups.values():
        rows.sort(key=lambda r: r.created or "", reverse=True)
        for row in rows[keep:]:
            remove(row.path)
            deleted += 1
            done(row)
    return deleted


def remove(path: Path) -> None:
    """Delete the image directory ``path`` (see the module docstring) and forget it."""
    try:
        parent_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise _cannot(path, exc) from exc
    try:
        try:
            st = os.stat(path.name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError as exc:
            raise ImageNotFoundError(f"no image directory {path}", image=str(path)) from exc
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePathError(
                f"{path} is a symlink, not an image directory; not deleted",
                path=path,
                hint="torpor never follows it; remove the symlink itself if it is not wanted",
            )
        if not stat.S_ISDIR(st.st_mode):
            raise ImageError(f"{path} is not a directory, so not an image; not deleted", image=path)
        dir_fd = open_dir(path.name, dir_fd=parent_fd)
        try:
            _check_ours(path, dir_fd, st)
            try:
                for name in lstat_entries(dir_fd):
                    os.unlink(name, dir_fd=dir_fd)
                check_same(parent_fd, path.name, dir_fd)
                os.rmdir(path.name, dir_fd=parent_fd)
                os.fsync(parent_fd)
            except OSError as exc:
                raise _cannot(path, exc) from exc
        finally:
            os.close(dir_fd)
    finally:
        os.close(parent_fd)
    with contextlib.suppress(OSError, TorporError):
        _index.forget(path)


def _check_ours(path: Path, dir_fd: int, st: os.stat_result) -> None:
    """Refuse (before anything is removed) a directory that is not an image of torpor's or
    that a checkpoint is writing; on return the caller holds its lock (until ``dir_fd`` is
    closed)."""
    here = os.fstat(dir_fd)
    if (here.st_dev, here.st_ino) != (st.st_dev, st.st_ino):
        raise ImageError(f"{path} was replaced while it was opened; not deleted", image=path)
    try:
        check_private(path, what="image directory", fd=dir_fd)
    except UnsafePathError as exc:
        raise UnsafePathError(
            f"{exc.msg.removesuffix('; refused')}: not one torpor can tell is its own; not deleted",
            path=path,
            hint=exc.hint,
        ) from exc
    entries = lstat_entries(dir_fd)
    if MANIFEST_NAME not in entries and RECORD_NAME not in entries:
        raise ImageError(
            f"{path} is not a torpor image (no {MANIFEST_NAME}); not deleted",
            image=path,
            hint="torpor deletes only the images it made",
        )
    subdirs = sorted(n for n, e in entries.items() if stat.S_ISDIR(e.st_mode))
    if subdirs:
        raise ImageError(
            f"{path} holds a directory ({subdirs[0]}), which no torpor image does; not deleted",
            image=path,
            hint="torpor deletes only the images it made",
        )
    busy = not _incomplete.lock(dir_fd, wait=False)
    if not busy and RECORD_NAME in entries:
        got = _incomplete.classify(dir_fd, source=str(path))
        busy = got is not None and got[1] == _incomplete.IN_USE
    if busy:
        raise ImageError(
            f"{path} is being written by a checkpoint; not deleted",
            image=path,
            hint="wait for it to end, then look at `torpor images`",
        )


def _cannot(path: Path, exc: OSError) -> ImageError:
    return ImageError(
        f"cannot delete {path}: {exc.strerror or exc}"
        + (f" ({exc.filename})" if exc.filename else ""),
        image=path,
    )
