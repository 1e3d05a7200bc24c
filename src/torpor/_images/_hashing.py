"""Hashing an image's files: after the fact (:func:`hash_files`) or while CRIU writes them
(:class:`GrowingHasher`).

Every file is opened relative to its directory's fd, ``O_NOFOLLOW``, and must be a regular file
(:func:`torpor._safe.open_regular`): a symlink planted in an image or a staging directory is
never followed (it could lead to a root-only file, whose hash and size would then be recorded)
and a FIFO or device is never read (it would hang or never end).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .._safe import kind_problem, open_dir, open_regular
from ._manifest import FileEntry

# hashlib releases the GIL on large buffers, so threads hash files in parallel.
_HASH_WORKERS = max(2, os.cpu_count() or 2)
_CHUNK = 8 << 20


def hash_range(fd: int, h: hashlib._Hash, offset: int, end: int) -> int:
    """Feed bytes ``offset`` to ``end`` of ``fd`` into ``h``; the offset reached (short of
    ``end`` only if the file is shorter). Read, not mapped: hashing from a mapping is ~10 %
    faster, but an I/O error or a truncation under it kills the process (SIGBUS)."""
    while offset < end:
        n = min(end - offset, _CHUNK)
        chunk = os.pread(fd, n, offset)
        if not chunk:
            break
        h.update(chunk)
        offset += len(chunk)
    return offset


@contextmanager
def _dir_fd(root: Path | int) -> Iterator[int]:
    if isinstance(root, int):
        yield root
        return
    fd = open_dir(root)
    try:
        yield fd
    finally:
        os.close(fd)


def hash_fd(fd: int) -> tuple[int, str]:
    """Size and SHA-256 (hex) of the open file ``fd``, read from its start to its end."""
    h = hashlib.sha256()
    size = hash_range(fd, h, 0, 1 << 62)
    return size, h.hexdigest()


def hash_files(
    root: Path | int, names: Iterable[str], *, source: str | None = None
) -> list[FileEntry]:
    """Size and SHA-256 of each named file in the directory ``root`` (a path, or an open
    directory fd), hashed in parallel. Each must be a regular file: a symlink, device or FIFO
    raises :class:`~torpor.UnsafeImageError` naming it."""
    names = list(names)
    src = source or str(root)
    with _dir_fd(root) as dir_fd:

        def one(name: str) -> FileEntry:
            fd = open_regular(dir_fd, name, source=src)
            try:
                size, sha = hash_fd(fd)
            finally:
                os.close(fd)
            return FileEntry(name=name, size=size, sha256=sha)

        if len(names) <= 1:
            return [one(n) for n in names]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(_HASH_WORKERS) as pool:
            return list(pool.map(one, names))


class GrowingHasher:
    """Hashes the files matching ``pattern`` in ``directory`` while they are being written,
    on another thread, so a dump's hashing overlaps CRIU's writing instead of following it.

    Only for files written strictly by appending through one open file: CRIU writes a dump's
    ``pages-*.img`` that way (each is created once, ``O_TRUNC``, and pages are ``splice``d in at
    the file position; ``criu/page-xfer.c``). :meth:`entries` vouches for a file only if it was
    read to its final size through the same inode; any other file is left to be hashed after.
    Only regular files are opened (``O_NOFOLLOW``, relative to the directory's fd); anything
    else is left alone, for the commit to refuse. Use as a context manager around the dump;
    call :meth:`entries` once the writer is done.
    """

    def __init__(self, directory: Path, pattern: str = "pages-*.img") -> None:
        self.directory = directory
        self.pattern = pattern
        self._dir_fd = -1
        self._done = threading.Event()
        self._abort = False  # the writer failed: stop without a last pass
        self._files: dict[str, tuple[int, hashlib._Hash, int]] = {}  # name -> fd, hash, offset
        self._passed: set[str] = set()  # names seen that are not regular files
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="torpor-hash", daemon=True)

    def __enter__(self) -> GrowingHasher:
        self._dir_fd = open_dir(self.directory)
        self._thread.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            self._abort = exc_type is not None
            self._stop()
        finally:
            for fd, _, _ in self._files.values():
                os.close(fd)
            self._files.clear()
            if self._dir_fd >= 0:
                os.close(self._dir_fd)
                self._dir_fd = -1

    def _stop(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        try:
            while True:
                last_pass = self._done.is_set()  # read before looking: nothing is missed
                progressed = self._open_new() | self._read_all()
                if last_pass:
                    # The writer is done: read what is left, in bounded steps (an abort is
                    # noticed between them).
                    while progressed and not self._abort:
                        progressed = self._read_all()
                    return
                if not progressed:
                    self._done.wait(0.002)
        except BaseException as exc:  # reported by entries(): the files are hashed after
            self._error = exc

    def _open_new(self) -> bool:
        opened = False
        with os.scandir(self._dir_fd) as it:
            names = [e.name for e in it]
        for name in names:
            if name in self._files or name in self._passed:
                continue
            if not fnmatch.fnmatchcase(name, self.pattern):
                continue
            fd = self._open_regular(name)
            if fd is None:
                self._passed.add(name)
                continue
            self._files[name] = (fd, hashlib.sha256(), 0)
            opened = True
        return opened

    def _open_regular(self, name: str) -> int | None:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, dir_fd=self._dir_fd)
        except OSError:
            return None  # gone, or a symlink: not ours to vouch for
        if kind_problem(os.fstat(fd).st_mode) is not None:
            os.close(fd)
            return None
        return fd

    def _read_all(self) -> bool:
        progressed = False
        for name, (fd, h, offset) in self._files.items():
            if self._abort:
                break
            # A bounded step: an abort (the dump failed) is noticed within ~30 ms.
            end = min(os.fstat(fd).st_size, offset + 8 * _CHUNK)
            reached = hash_range(fd, h, offset, end)
            progressed |= reached > offset
            self._files[name] = (fd, h, reached)
        return progressed

    def entries(self) -> dict[str, FileEntry]:
        """Once the writer is done: the files hashed whole, by name (possibly none)."""
        self._stop()
        if self._error is not None:
            return {}
        out: dict[str, FileEntry] = {}
        for name, (fd, h, offset) in self._files.items():
            st = os.fstat(fd)
            now: os.stat_result | None = None
            with contextlib.suppress(OSError):
                now = os.stat(name, dir_fd=self._dir_fd, follow_symlinks=False)
            if now is None:
                continue
            if st.st_size == offset and now.st_ino == st.st_ino and now.st_size == offset:
                out[name] = FileEntry(name=name, size=offset, sha256=h.hexdigest())
        return out
