"""Image directories: written to a staging directory, renamed into place only when complete,
verified against their manifest before use.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from .._errors import AlreadyExistsError, ImageCorruptedError, ImageNotFoundError
from .._paths import fsync_dir
from . import _manifest
from ._manifest import MANIFEST_NAME, FileEntry, Manifest

STAGING_MARK = ".partial-"
# Identities (inode, size, mtime, ctime) of the files as last hashed; see Image.verify.
VERIFIED_NAME = ".torpor-verified.json"
# hashlib releases the GIL on large buffers, so threads hash files in parallel.
_HASH_WORKERS = max(2, os.cpu_count() or 2)


_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    """SHA-256 (hex) of a file's content."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


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


def hash_files(root: Path, names: Iterable[str]) -> list[FileEntry]:
    """Size and SHA-256 of each named file under ``root``, hashed in parallel."""
    names = list(names)

    def one(name: str) -> FileEntry:
        path = root / name
        return FileEntry(name=name, size=path.stat().st_size, sha256=sha256_file(path))

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
    Use as a context manager around the dump; call :meth:`entries` once the writer is done.
    """

    def __init__(self, directory: Path, pattern: str = "pages-*.img") -> None:
        self.directory = directory
        self.pattern = pattern
        self._done = threading.Event()
        self._abort = False  # the writer failed: stop without a last pass
        self._files: dict[str, tuple[int, hashlib._Hash, int]] = {}  # name -> fd, hash, offset
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="torpor-hash", daemon=True)

    def __enter__(self) -> GrowingHasher:
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

    def _stop(self) -> None:
        self._done.set()
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
        for entry in os.scandir(self.directory):
            if entry.name not in self._files and fnmatch.fnmatchcase(entry.name, self.pattern):
                fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
                self._files[entry.name] = (fd, hashlib.sha256(), 0)
                opened = True
        return opened

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
            try:
                now = os.stat(self.directory / name)
            except OSError:
                continue
            if st.st_size == offset and now.st_ino == st.st_ino and now.st_size == offset:
                out[name] = FileEntry(name=name, size=offset, sha256=h.hexdigest())
        return out


def content_files(image_dir: Path) -> list[str]:
    """The names of the regular files that make up an image: everything but the manifest, logs
    (CRIU's log of the dump is kept beside the image) and torpor's bookkeeping files."""
    return sorted(
        e.name
        for e in os.scandir(image_dir)
        if e.is_file(follow_symlinks=False)
        and e.name != MANIFEST_NAME
        and not e.name.endswith(".log")
        and not e.name.startswith((".", "torpor."))
    )


class Image:
    """A complete image directory on local disk (manifest present).

    Opening reads only the manifest; :meth:`verify` checks every file.
    """

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Image:
        """Open the image at ``path``; raise :class:`ImageNotFoundError` if there is none."""
        p = Path(path)
        if not p.is_dir():
            raise ImageNotFoundError(
                f"no image at {p}", image=str(p), hint="`torpor images` lists the local images"
            )
        return cls(p, _manifest.read(p))

    @property
    def name(self) -> str:
        """The image's name (from its manifest)."""
        return self.manifest.name

    def verify(self, *, full: bool = False) -> None:
        """Check every file's size and SHA-256; raise :class:`ImageCorruptedError` naming the
        first bad file (in manifest order).

        Unless ``full``, files whose inode, size, mtime and ctime are exactly as recorded when
        they were last hashed (at checkpoint, or at the last full verification) are trusted
        without re-hashing, as git trusts its index: any write to a file changes its ctime,
        which no user can set back. Hashing a large image costs more than CRIU's restore of it.
        ``full`` re-hashes everything (bit rot on the disk itself changes no timestamp).
        """
        # trusted() also refuses missing and wrongly sized files, full or not.
        if self.trusted() and not full:
            return
        actual = hash_files(self.path, (e.name for e in self.manifest.files))
        for want, got in zip(self.manifest.files, actual, strict=True):
            if got.sha256 != want.sha256:
                raise self._corrupt(want.name, "does not match its SHA-256")
        write_stamp(self.path, self.manifest)

    def trusted(self) -> bool:
        """Whether every file is present, of the recorded size, and exactly as when it was last
        hashed (see :meth:`verify`). Raises :class:`ImageCorruptedError` for a missing or
        wrongly sized file. Costs one ``stat`` per file."""
        stats: dict[str, os.stat_result] = {}
        for entry in self.manifest.files:
            try:
                st = (self.path / entry.name).stat()
            except FileNotFoundError as exc:
                raise self._corrupt(entry.name, "is missing") from exc
            if st.st_size != entry.size:
                raise self._corrupt(entry.name, f"has {st.st_size} bytes, expected {entry.size}")
            stats[entry.name] = st
        return read_stamp(self.path) == _stamp(self.manifest, stats)

    def _corrupt(self, name: str, what: str) -> ImageCorruptedError:
        return ImageCorruptedError(
            f"image {self.name!r} ({self.path}) is corrupted: file {name} {what}",
            image=self.path,
            file=name,
            hint="restore refused; use another image or checkpoint again",
        )


def _stamp(manifest: Manifest, stats: dict[str, os.stat_result]) -> dict[str, object]:
    return {
        "id": manifest.id,
        "files": {
            name: [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
            for name, st in sorted(stats.items())
        },
    }


def read_stamp(image_dir: Path) -> object:
    """The verification stamp of an image directory (None if there is none)."""
    try:
        return json.loads((image_dir / VERIFIED_NAME).read_text())
    except (OSError, ValueError):
        return None


def write_stamp(image_dir: Path, manifest: Manifest) -> None:
    """Record the files' identities as just hashed and found matching ``manifest``.

    Best effort: an image on read-only storage is simply verified in full every time.
    """
    stats = {e.name: (image_dir / e.name).stat() for e in manifest.files}
    tmp = image_dir / f"{VERIFIED_NAME}.tmp{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(_stamp(manifest, stats), fh)
        os.replace(tmp, image_dir / VERIFIED_NAME)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` atomically, failing if ``dst`` exists (even as an empty dir)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    rename_noreplace = 1
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), str(dst))
    if dst.exists():
        raise FileExistsError(errno.EEXIST, "File exists", str(dst))
    os.rename(src, dst)


class Staging:
    """A private staging directory next to ``dest``; :meth:`commit` makes it the image.

    Until committed the directory's name marks it as partial, so a crash mid-dump never
    leaves something that looks like a whole image.
    """

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.path = dest.parent / f".{dest.name}{STAGING_MARK}{os.urandom(4).hex()}"

    def create(self) -> Path:
        """Create the staging directory (mode 0700); fail if ``dest`` exists already."""
        check_free(self.dest)
        self.dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.mkdir(mode=0o700)
        return self.path

    def commit(
        self,
        make_manifest: Callable[[list[FileEntry]], Manifest],
        hashed: Mapping[str, FileEntry] | None = None,
    ) -> Image:
        """Hash the staged files (but those in ``hashed``, hashed while they were written),
        write the manifest, rename into place; return the image."""
        hashed = hashed or {}
        names = content_files(self.path)
        fresh = {e.name: e for e in hash_files(self.path, [n for n in names if n not in hashed])}
        entries = [hashed[n] if n in hashed else fresh[n] for n in names]
        manifest = make_manifest(entries)
        write_manifest(self.path, manifest)
        try:
            _rename_noreplace(self.path, self.dest)
        except FileExistsError as exc:
            raise AlreadyExistsError(
                f"image directory {self.dest} appeared while checkpointing",
                path=str(self.dest),
                hint=f"the new image is kept at {self.path}",
            ) from exc
        fsync_dir(self.dest.parent)
        write_stamp(self.dest, manifest)
        return Image(self.dest, manifest)

    def discard(self) -> None:
        """Remove the staging directory and everything in it."""
        shutil.rmtree(self.path, ignore_errors=True)


@contextmanager
def staging(dest: Path) -> Iterator[Staging]:
    """Context manager: a created :class:`Staging`, discarded unless committed."""
    st = Staging(dest)
    st.create()
    try:
        yield st
    finally:
        if st.path.exists():
            st.discard()


def check_free(dest: Path) -> None:
    """Raise :class:`AlreadyExistsError` if ``dest`` exists (torpor never overwrites)."""
    if dest.exists() or dest.is_symlink():
        raise AlreadyExistsError(
            f"image directory {dest} exists already",
            path=str(dest),
            hint="choose another -o/--name, or delete the old image first",
        )


def write_manifest(image_dir: Path, manifest: Manifest) -> None:
    """Write ``torpor.json`` (0600) durably."""
    tmp = image_dir / f".{MANIFEST_NAME}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(manifest.to_json())
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(tmp, image_dir / MANIFEST_NAME)
    fsync_dir(image_dir)
