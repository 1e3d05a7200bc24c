"""A staged image directory's files, checked as outside input, and its publication: the
rename that puts it beside its destination, never replacing what is there.

What CRIU (or a peer, or a self-checkpointing app) left in a staging directory is not trusted:
:func:`staged_files` refuses anything but regular files, :func:`give` refuses a file with a
second link before handing it over. :func:`publish` renames with ``RENAME_NOREPLACE`` after
:func:`check_same` has made sure the name is still the directory that was sealed. These are
the pieces :func:`torpor._images._image.seal` and the keepers build on; nothing here hashes or
signs.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .._errors import AlreadyExistsError, UnsafeImageError
from .._safe import kind_problem, lstat_entries, open_regular
from ._layout import is_bookkeeping

_RENAME_NOREPLACE = 1


def give(dir_fd: int, names: Iterable[str], owner: tuple[int, int] | None, *, source: str) -> None:
    """Make the regular files ``names`` of ``dir_fd`` 0600 and, if ``owner`` is given, owned
    by that ``(uid, gid)``; a symlink, FIFO or device among them is refused, never followed."""
    for name in names:
        fd = open_regular(dir_fd, name, source=source)
        try:
            # A file with a link elsewhere (say a hard link to /etc/shadow planted in the
            # directory) would be handed over too: CRIU's files have exactly one link.
            if os.fstat(fd).st_nlink != 1:
                raise UnsafeImageError(
                    f"staged image {source} holds {name}, linked elsewhere too "
                    f"({os.fstat(fd).st_nlink} links); refused",
                    image=source,
                    file=name,
                    hint="something other than CRIU wrote into the staging directory",
                )
            if owner is not None:
                os.fchown(fd, *owner)
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)


def staged_files(dir_fd: int, *, source: str) -> dict[str, os.stat_result]:
    """The files of the staged image ``dir_fd`` (every entry but torpor's bookkeeping), by
    name, with their ``lstat``: each must be a regular file, else
    :class:`~torpor.UnsafeImageError` (never followed)."""
    entries = lstat_entries(dir_fd)
    files = {n: st for n, st in sorted(entries.items()) if not is_bookkeeping(n)}
    for name, st in files.items():
        kind = kind_problem(st.st_mode)
        if kind is not None:
            raise UnsafeImageError(
                f"staged image {source} holds {name}, {kind}, not a regular file; refused",
                image=source,
                file=name,
                hint="something other than CRIU wrote into the staging directory",
            )
    return files


def rename_noreplace(parent_fd: int, name: str, new_name: str) -> None:
    """Rename ``name`` to ``new_name`` within the directory ``parent_fd`` atomically, failing
    (``FileExistsError``) if ``new_name`` exists, even as an empty directory or a symlink."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    src, dst = os.fsencode(name), os.fsencode(new_name)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        if fn(parent_fd, src, parent_fd, dst, _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), new_name)
    # A filesystem without RENAME_NOREPLACE: check, then rename (the window is ours alone in
    # a private directory; elsewhere the check is the best there is).
    try:
        os.stat(new_name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(name, new_name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        return
    raise FileExistsError(errno.EEXIST, "File exists", new_name)


@contextmanager
def published(where: Path, staging_name: str, dest_name: str) -> Iterator[None]:
    """Around the rename of the sealed ``staging_name`` to ``dest_name`` in ``where``: a
    destination that exists becomes :class:`AlreadyExistsError` (the image stays staged)."""
    try:
        yield
    except FileExistsError as exc:
        raise AlreadyExistsError(
            f"image directory {where / dest_name} appeared while checkpointing",
            path=str(where / dest_name),
            hint=f"the new image is kept at {where / staging_name}",
        ) from exc


def publish(
    parent_fd: int, staging_name: str, dest_name: str, *, where: Path, dir_fd: int | None = None
) -> None:
    """Rename the sealed staging directory ``staging_name`` of ``parent_fd`` to ``dest_name``
    beside it, never replacing what is there (:class:`AlreadyExistsError`), durably. With
    ``dir_fd`` (the staging directory as sealed) the name must still be that directory.
    ``where`` (the parent's path) is for messages."""
    if dir_fd is not None:
        check_same(parent_fd, staging_name, dir_fd)
    with published(where, staging_name, dest_name):
        rename_noreplace(parent_fd, staging_name, dest_name)
    os.fsync(parent_fd)


def check_same(parent_fd: int, name: str, dir_fd: int) -> None:
    """``FileNotFoundError`` unless ``name`` in ``parent_fd`` is the directory ``dir_fd``
    (it was not moved or replaced since it was opened)."""
    here = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    st = os.fstat(dir_fd)
    if (here.st_dev, here.st_ino) != (st.st_dev, st.st_ino):
        raise FileNotFoundError(errno.ENOENT, "the staging directory was moved", name)
