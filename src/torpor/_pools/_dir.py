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
0600 by :func:`tempfile.mkstemp`), fsyncs it, renames it over the key's file and fsyncs the
directory: a reader opens either the old file or the new one, and a crash leaves one of them.
Readers that opened the old file keep reading the old value.

Privacy. Directories are created 0700 and files 0600: only the owner can list or read them.

Ownership. torpor acts on a pool's files as root: the root directory must be owned by the
effective user (or root) and not writable by group or others (:func:`torpor._safe.check_private`,
as ssh's StrictModes), or the pool is refused with the path and the ``chmod go-w`` fix. Values
are opened ``O_NOFOLLOW`` and must be regular files: a symlink or FIFO planted as a key is
refused, never followed or waited on.

``delete`` removes the file and then every directory it leaves empty, up to the root, so a
pool does not fill up with empty directories; a ``put`` that loses a race with that removal
re-creates its directory and tries again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from .. import _safe
from .._errors import PoolError
from .._paths import fsync_dir
from ._backend import check_key

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

    @property
    def root(self) -> Path:
        """The directory that holds the pool's files."""
        return self._root

    # --- the contract --------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically (overwrite)."""
        path = self._path(key)
        with self._errors("write", key):
            self._write_atomic(path, lambda f: f.write(data))

    def put_stream(self, key: str, stream: BinaryIO, size: int | None = None) -> None:
        """Store the rest of ``stream`` under ``key`` atomically; ``size`` is not needed."""
        path = self._path(key)
        with self._errors("write", key):
            self._write_atomic(path, lambda f: shutil.copyfileobj(stream, f, _COPY_BUFFER))

    def get(self, key: str) -> bytes:
        """The value under ``key``; :class:`KeyError` if missing."""
        with self.get_stream(key) as fh, self._errors("read", key):
            return fh.read()

    def get_stream(self, key: str) -> BinaryIO:
        """An open file of the value under ``key``; :class:`KeyError` if missing."""
        path = self._path(key)
        with self._errors("open", key):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError:
                raise KeyError(key) from None
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                raise PoolError(
                    f"key {key!r} in dir pool {self._root} is a symlink; refused",
                    hint=f"remove {path}: torpor never makes one",
                ) from exc
            try:
                problem = _safe.kind_problem(os.fstat(fd).st_mode)
                if problem is not None:
                    raise PoolError(
                        f"key {key!r} in dir pool {self._root} is {problem}, not a regular"
                        " file; refused",
                        hint=f"remove {path}: torpor never makes one",
                    )
                os.set_blocking(fd, True)
            except BaseException:
                os.close(fd)
                raise
            return os.fdopen(fd, "rb")

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""
        path = self._path(key)
        with self._errors("stat", key):
            try:
                path.stat()
            except FileNotFoundError:
                return False
            return True

    def size(self, key: str) -> int:
        """The size in bytes of the value under ``key``; :class:`KeyError` if missing."""
        path = self._path(key)
        with self._errors("stat", key):
            try:
                return path.stat().st_size
            except FileNotFoundError:
                raise KeyError(key) from None

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key starting with ``prefix``, found by walking only the directories that
        can hold such keys."""
        self._check_open()
        if not _PREFIX_CHARS.match(prefix):
            return iter(())  # no key holds such a character
        *dirs, leaf = prefix.split("/")
        if any(seg in ("", ".", "..") for seg in dirs):
            return iter(())  # no key has such a segment
        start = self._root.joinpath(*(seg + _DIR_SUFFIX for seg in dirs))
        return self._walk(start, "".join(seg + "/" for seg in dirs), leaf)

    def delete(self, key: str) -> None:
        """Remove ``key`` (and the directories it leaves empty); no error if it is missing."""
        path = self._path(key)
        with self._errors("delete", key):
            try:
                path.unlink()
            except FileNotFoundError:
                return
            self._prune(path.parent)

    def close(self) -> None:
        """Mark the backend closed; later calls raise :class:`~torpor.PoolError`."""
        self._closed = True

    # --- helpers -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise PoolError(f"dir pool {self._root} is closed")

    def _path(self, key: str) -> Path:
        self._check_open()
        *dirs, name = check_key(key).split("/")
        return self._root.joinpath(*(seg + _DIR_SUFFIX for seg in dirs), name)

    def _write_atomic(self, path: Path, fill: Callable[[BinaryIO], object]) -> None:
        for attempt in range(_PUT_ATTEMPTS):
            try:
                fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
                break
            except FileNotFoundError:
                if attempt == _PUT_ATTEMPTS - 1:
                    raise
                # First put under this directory, or a concurrent delete pruned it.
                with contextlib.suppress(FileNotFoundError):
                    self._make_dirs(path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(path.parent)

    def _make_dirs(self, directory: Path) -> None:
        current = self._root
        for part in directory.relative_to(self._root).parts:
            current = current / part
            with contextlib.suppress(FileExistsError):
                current.mkdir(mode=0o700)

    def _prune(self, directory: Path) -> None:
        while directory != self._root and self._root in directory.parents:
            try:
                directory.rmdir()
            except OSError:
                return  # not empty (or already gone): the directories above are in use too
            directory = directory.parent

    def _walk(self, directory: Path, key_prefix: str, leaf: str) -> Iterator[str]:
        with self._errors("list", key_prefix or None):
            try:
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                return  # nothing there (or pruned while we walked)
        for entry in entries:
            name = entry.name
            if name.startswith(_TMP_PREFIX):
                continue
            if name.endswith(_DIR_SUFFIX):
                seg = name[: -len(_DIR_SUFFIX)]
                if seg.startswith(leaf):
                    yield from self._walk(Path(entry.path), f"{key_prefix}{seg}/", "")
            elif name.startswith(leaf):
                yield key_prefix + name

    @contextlib.contextmanager
    def _errors(self, action: str, key: str | None) -> Iterator[None]:
        """The driver's one boundary: ``OSError`` becomes :class:`~torpor.PoolError`."""
        try:
            yield
        except OSError as exc:
            what = f"key {key!r} in dir pool {self._root}" if key else f"dir pool {self._root}"
            raise PoolError(
                f"cannot {action} {what}: {exc.strerror or exc}",
                hint="check the pool directory's permissions and free space",
            ) from exc
