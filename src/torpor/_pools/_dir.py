"""The ``dir`` pool driver: one file per key under a root directory.

Layout. A key's last segment is a file, every other segment a directory whose name carries a
``+`` suffix (a character keys cannot hold): ``images/web/manifest`` is stored at
``ROOT/images+/web+/manifest``. Without the suffix the keys ``a`` and ``a/b`` could not both
exist (one path would have to be a file and a directory at once); with it they never meet.
Temporary files start with ``~`` (also outside the key alphabet), so neither they nor the
directories can be mistaken for keys, and a key can never name a path outside the root:
:func:`~torpor._pools._backend.check_key` has already refused empty, ``.`` and ``..``
segments.

Atomicity and durability. ``put`` writes a temporary file in the key's directory (created
0600, ``O_EXCL``), fsyncs it, renames it over the key's file and fsyncs the
directory: a reader opens either the old file or the new one, and a crash leaves one of them.
Readers that opened the old file keep reading the old value.

Privacy. Directories are created 0700 and files 0600: only the owner can list or read them.

Ownership. torpor acts on a pool's files as root: the root directory, every directory on the
way to it and every directory in it must be owned by the effective user (or root) and not
writable by group or others (:func:`torpor._safe.check_private`, as ssh's StrictModes), or the
pool is refused with the path and the ``chmod go-w`` fix. Everything in the pool is reached
from the root's fd, one directory at a time with ``O_NOFOLLOW``: a symlink planted as a
directory is refused (a write through it would land outside the pool). Values are opened
``O_NOFOLLOW`` and must be regular files: a symlink or FIFO planted as a key is refused, never
followed or waited on.

``delete`` removes the file and then every directory it leaves empty, up to the root, so a
pool does not fill up with empty directories; a ``put`` that loses a race with that removal
re-creates its directory and tries again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from .. import _safe
from .._errors import PoolError
from ._backend import check_key, read_at_most, too_large
from ._leases import DirLeases

_DIR_SUFFIX = "+"
_TMP_PREFIX = "~"
_PREFIX_CHARS = re.compile(r"^[A-Za-z0-9._/-]*$")
_COPY_BUFFER = 1 << 20
# A put retries when a concurrent delete removes its freshly made directory; more than a few
# rounds would mean something keeps deleting it on purpose.
_PUT_ATTEMPTS = 5


class DirBackend:
    """Keyed blobs as files under ``root`` (created 0700 if missing).

    Thread-safe: every operation is a handful of system calls on paths, with no shared state
    but the ``closed`` flag.
    """

    def __init__(self, root: Path) -> None:
        self._root = Path(root).absolute()
        self._closed = False
        with self._errors("create", None):
            self._root.mkdir(mode=0o700, parents=True, exist_ok=True)
            with _safe.opened_dir(self._root) as fd:
                _safe.check_private(self._root, what="dir pool directory", fd=fd)
            _safe.check_ancestors(self._root, what="dir pool directory")

    @property
    def root(self) -> Path:
        """The directory that holds the pool's files."""
        return self._root

    # --- the contract --------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically (overwrite)."""
        with self._errors("write", key):
            self._write_atomic(key, lambda f: f.write(data))

    def put_stream(self, key: str, stream: BinaryIO, size: int | None = None) -> None:
        """Store the rest of ``stream`` under ``key`` atomically; ``size`` is not needed."""
        with self._errors("write", key):
            self._write_atomic(key, lambda f: shutil.copyfileobj(stream, f, _COPY_BUFFER))

    def get(self, key: str, limit: int | None = None) -> bytes:
        """The value under ``key``; :class:`KeyError` if missing; over ``limit`` bytes (the
        opened file's size, then what is read: ``limit + 1`` bytes at most),
        :class:`~torpor.PoolError`."""
        with self.get_stream(key) as fh, self._errors("read", key):
            if limit is None:
                return fh.read()
            size = os.fstat(fh.fileno()).st_size
            where = f"dir pool {self._root}"
            if size > limit:
                raise too_large(key, where, size, limit)
            return read_at_most(fh, key, where, limit, expect=size)

    def get_stream(self, key: str) -> BinaryIO:
        """An open file of the value under ``key``; :class:`KeyError` if missing."""
        with self._errors("open", key):
            try:
                with self._parent(key) as (dir_fd, name):
                    fd = os.open(
                        name,
                        os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                        dir_fd=dir_fd,
                    )
            except FileNotFoundError:
                raise KeyError(key) from None
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                raise PoolError(
                    f"key {key!r} in dir pool {self._root} is a symlink; refused",
                    hint=f"remove {self._path(key)}: torpor never makes one",
                ) from exc
            try:
                problem = _safe.kind_problem(os.fstat(fd).st_mode)
                if problem is not None:
                    raise PoolError(
                        f"key {key!r} in dir pool {self._root} is {problem}, not a regular"
                        " file; refused",
                        hint=f"remove {self._path(key)}: torpor never makes one",
                    )
                os.set_blocking(fd, True)
            except BaseException:
                os.close(fd)
                raise
            return os.fdopen(fd, "rb")

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""
        try:
            self._lstat(key)
        except KeyError:
            return False
        return True

    def size(self, key: str) -> int:
        """The size in bytes of the value under ``key``; :class:`KeyError` if missing."""
        return self._lstat(key).st_size

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key starting with ``prefix``, found by walking only the directories that
        can hold such keys."""
        self._check_open()
        if not _PREFIX_CHARS.match(prefix):
            return iter(())  # no key holds such a character
        *dirs, leaf = prefix.split("/")
        if any(seg in ("", ".", "..") for seg in dirs):
            return iter(())  # no key has such a segment
        with self._errors("list", prefix or None):
            try:
                with self._walk_to(dirs) as fd:
                    return iter(list(self._walk(fd, "".join(s + "/" for s in dirs), leaf)))
            except (FileNotFoundError, NotADirectoryError):
                return iter(())  # nothing there (or pruned while we walked)

    def delete(self, key: str) -> None:
        """Remove ``key`` (and the directories it leaves empty); no error if it is missing."""
        *dirs, _ = check_key(key).split("/")
        with self._errors("delete", key):
            try:
                with self._parent(key) as (dir_fd, name):
                    os.unlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                return
            self._prune(dirs)

    def close(self) -> None:
        """Mark the backend closed; later calls raise :class:`~torpor.PoolError`."""
        self._closed = True

    def leases(self) -> DirLeases:
        """The pool's leases: flocked files under ``leases+/`` (see :mod:`._leases`)."""
        return DirLeases(self._parent, self._errors, f"dir pool {self._root}")

    # --- helpers -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise PoolError(f"dir pool {self._root} is closed")

    def _path(self, key: str) -> Path:
        """Where ``key`` is stored (for messages: files are reached through fds)."""
        *dirs, name = check_key(key).split("/")
        return self._root.joinpath(*(seg + _DIR_SUFFIX for seg in dirs), name)

    @contextlib.contextmanager
    def _walk_to(self, dirs: Sequence[str], *, create: bool = False) -> Iterator[int]:
        """An fd of the directory of the key segments ``dirs``, reached from the root one
        directory at a time (``O_NOFOLLOW``, each checked private; made 0700 if ``create``).
        ``FileNotFoundError`` if one is missing."""
        self._check_open()
        fd = _safe.open_dir(self._root)
        try:
            where = self._root
            for seg in dirs:
                name = seg + _DIR_SUFFIX
                where = where / name
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, 0o700, dir_fd=fd)
                sub = _open_sub(fd, name, where)
                os.close(fd)
                fd = sub
                _safe.check_private(where, what="dir pool directory", fd=fd)
            yield fd
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _parent(self, key: str, *, create: bool = False) -> Iterator[tuple[int, str]]:
        """The fd of ``key``'s directory (see :meth:`_walk_to`) and the key's file name."""
        *dirs, name = check_key(key).split("/")
        with self._walk_to(dirs, create=create) as fd:
            yield fd, name

    def _lstat(self, key: str) -> os.stat_result:
        with self._errors("stat", key):
            try:
                with self._parent(key) as (dir_fd, name):
                    return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except (FileNotFoundError, NotADirectoryError):
                raise KeyError(key) from None

    def _write_atomic(self, key: str, fill: Callable[[BinaryIO], object]) -> None:
        for attempt in range(_PUT_ATTEMPTS):
            try:
                with self._parent(key, create=True) as (dir_fd, name):
                    self._write_in(dir_fd, name, fill)
                return
            except FileNotFoundError:
                # A concurrent delete pruned the directory between our mkdir and the write.
                if attempt == _PUT_ATTEMPTS - 1:
                    raise

    def _write_in(self, dir_fd: int, name: str, fill: Callable[[BinaryIO], object]) -> None:
        tmp = f"{_TMP_PREFIX}{secrets.token_hex(8)}"
        fd = _safe.create_file(dir_fd, tmp, source=f"dir pool {self._root}")
        try:
            with os.fdopen(fd, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.fsync(dir_fd)

    def _prune(self, dirs: Sequence[str]) -> None:
        """Remove the directories of ``dirs`` that are empty, deepest first."""
        for depth in range(len(dirs), 0, -1):
            try:
                with self._walk_to(dirs[: depth - 1]) as fd:
                    os.rmdir(dirs[depth - 1] + _DIR_SUFFIX, dir_fd=fd)
            except OSError:
                return  # not empty (or already gone): the directories above are in use too

    def _walk(self, dir_fd: int, key_prefix: str, leaf: str) -> Iterator[str]:
        with os.scandir(dir_fd) as it:
            names = [entry.name for entry in it]
        for name in names:
            if name.startswith(_TMP_PREFIX):
                continue
            if name.endswith(_DIR_SUFFIX):
                seg = name[: -len(_DIR_SUFFIX)]
                if seg.startswith(leaf):
                    where = self._path(f"{key_prefix}{seg}/x").parent  # for messages
                    try:
                        sub = _open_sub(dir_fd, name, where)
                    except (FileNotFoundError, NotADirectoryError):
                        continue  # pruned while we walked
                    try:
                        _safe.check_private(where, what="dir pool directory", fd=sub)
                        yield from self._walk(sub, f"{key_prefix}{seg}/", "")
                    finally:
                        os.close(sub)
            elif name.startswith(leaf):
                yield key_prefix + name

    @contextlib.contextmanager
    def _errors(self, action: str, key: str | None) -> Iterator[None]:
        """The driver's one boundary: ``OSError`` becomes :class:`~torpor.PoolError`."""
        try:
            yield
        except OSError as exc:
            what = f"key {key!r} in dir pool {self._root}" if key else f"dir pool {self._root}"
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # the disk, named, is at fault
                from .._images._incomplete import mount_point, no_space

                raise PoolError(
                    f"cannot {action} {what}: {no_space(self._root)}",
                    hint=f"free space on {mount_point(self._root)}",
                ) from exc
            raise PoolError(
                f"cannot {action} {what}: {exc.strerror or exc}",
                hint="check the pool directory's permissions and free space",
            ) from exc


def _open_sub(dir_fd: int, name: str, where: Path) -> int:
    """Open the pool directory ``name`` in ``dir_fd``: a symlink there is refused (it would
    lead writes and reads out of the pool)."""
    try:
        return os.open(
            name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError as exc:
        # O_NOFOLLOW with O_DIRECTORY says ENOTDIR for a symlink.
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        if not stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            raise
        raise PoolError(
            f"dir pool directory {where} is a symlink; refused",
            hint=f"remove {where}: torpor never makes one",
        ) from exc
