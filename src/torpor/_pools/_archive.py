"""Export archives: one image and exactly the chunks it needs, in one self-contained file.

An archive is a tar file laid out like a pool holding one image (``torpor-pool.json``, then
``packs/``, ``index/``, ``lists/`` objects, then ``images/<name>`` last). Exporting is copying
the image into a write-only pool over :class:`ArchiveWriter`; importing is copying it out of a
read-only pool over :class:`ArchiveReader`. Chunks stay compressed and are verified on the
way in, like any copy between pools.

An archive comes from outside: :class:`ArchiveReader` refuses, before anything is read from
it, a member that is not a regular file (a symlink, hard link, device, FIFO, directory), a
member name that is not a key of the expected form (``torpor-pool.json``, ``images/NAME``,
``lists/ID``, ``index/ID``, ``packs/XX/ID``: no ``..``, no absolute name, no other prefix), a
name given twice, and a member too large to be one torpor wrote.
"""

from __future__ import annotations

import io
import re
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, cast

from .._errors import PoolError, UnsafeImageError
from ._backend import check_key, too_large
from ._pack import MAX_INDEX, MAX_PACK
from ._reader import MAX_META
from ._record import MAX_LIST, MAX_RECORD, _compress_bound, file_problem, human, list_bytes
from ._write import INLINE_MAX

_ID = r"[0-9a-f]{32}"
# Member names an export writes (image names as the store allows them: _images._store).
_MEMBER_RE = re.compile(
    rf"torpor-pool\.json|images/[A-Za-z0-9][A-Za-z0-9._-]{{0,127}}|lists/{_ID}|index/{_ID}"
    rf"|packs/(?P<fan>[0-9a-f]{{2}})/(?P<pack>{_ID})"
)
# The largest member an export writes is a chunk list object of MAX_LIST bytes that zstd
# could not shrink (digests barely compress): whatever a pool holds can be exported, and
# imported back. A bigger member is not one torpor wrote (and would be read whole). Each
# member is still read with its own bound (``get(key, limit)``: a pack's index size, a
# list's chunk count), so this only bounds the tar reader's own reads (headers).
MAX_MEMBER = _compress_bound(MAX_LIST)
assert max(MAX_PACK, MAX_INDEX, MAX_RECORD, MAX_META) <= MAX_MEMBER
MAX_MEMBERS = 1 << 20


class ArchiveWriter:
    """A write-only backend appending every ``put`` to a tar stream (no seeking needed)."""

    def __init__(self, fileobj: BinaryIO, *, path: Path | None = None) -> None:
        # The tar object lives as long as the backend; close() ends it.
        self._tar = tarfile.open(fileobj=fileobj, mode="w|")  # noqa: SIM115
        self._lock = threading.Lock()
        self._path = path  # the file written, named in errors (None: a stream)
        self._members = 0

    def put(self, key: str, data: bytes) -> None:
        """Append a member; :class:`PoolError` for one :class:`ArchiveReader` would refuse
        (over :data:`MAX_MEMBER` bytes, or past :data:`MAX_MEMBERS` members)."""
        problem = member_problem(len(data), self._members + 1)
        if problem is not None:
            where = f" {self._path}" if self._path is not None else ""
            raise PoolError(
                f"cannot write the archive{where}: its member {key} {problem}",
                hint="the image stays in its pool; copy it to another pool instead",
            )
        self._members += 1
        info = tarfile.TarInfo(check_key(key))
        info.size = len(data)
        info.mode = 0o600
        info.mtime = int(time.time())
        try:
            with self._lock:
                self._tar.addfile(info, io.BytesIO(data))
        except (OSError, tarfile.TarError) as exc:
            raise write_failure(exc, self._path) from exc

    def put_stream(self, key: str, stream: BinaryIO, size: int | None = None) -> None:
        """Append a member from a stream."""
        self.put(key, stream.read())

    def get(self, key: str, limit: int | None = None) -> bytes:
        """Nothing can be read back: always :class:`KeyError`."""
        raise KeyError(key)

    def get_stream(self, key: str) -> BinaryIO:
        """Nothing can be read back: always :class:`KeyError`."""
        raise KeyError(key)

    def exists(self, key: str) -> bool:
        """Always false (the archive is written once, front to back)."""
        return False

    def size(self, key: str) -> int:
        """Nothing can be read back: always :class:`KeyError`."""
        raise KeyError(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        """Nothing is listed: a pool over this backend looks empty."""
        return iter(())

    def delete(self, key: str) -> None:
        """Members cannot be removed; deleting is a no-op."""

    def close(self) -> None:
        """Write the tar end marker (the file object stays open)."""
        try:
            self._tar.close()
        except (OSError, tarfile.TarError) as exc:
            raise write_failure(exc, self._path) from exc


def member_problem(size: int, members: int) -> str | None:
    """Why :class:`ArchiveReader` would refuse the ``members``-th member of an archive, of
    ``size`` bytes (the bounds of :func:`_check_members`), in words; None if it would not."""
    if size > MAX_MEMBER:
        return f"would be {human(size)}, over the {human(MAX_MEMBER)} an import reads"
    if members > MAX_MEMBERS:
        return f"would be member number {members}, over the {MAX_MEMBERS} an import reads"
    return None


def export_problem(size: int, chunk_size: int) -> str | None:
    """Why an archive could not hold a file of ``size`` bytes in chunks of ``chunk_size`` so
    that an import takes it back (:func:`~._record.file_problem`, or its chunk list object
    as zstd may make it, over :data:`MAX_MEMBER`), in words; None if it could."""
    problem = file_problem(size, chunk_size)
    count = -(-size // chunk_size)
    if problem is None and count > INLINE_MAX:
        over = member_problem(_compress_bound(list_bytes(count)), 1)
        problem = None if over is None else f"has a chunk list object that {over}"
    return problem


def write_failure(exc: Exception, path: Path | None) -> PoolError:
    """A failed write of an archive (the file at ``path``, or a stream) in one line: the disk
    when it is full, the reason in words otherwise (never an ``OSError`` repr)."""
    from .._images._incomplete import disk_problem, mount_point

    where = f" {path}" if path is not None else ""
    if isinstance(exc, OSError) and path is not None:
        return PoolError(
            f"cannot write the archive{where}: {disk_problem(exc, path.parent)}",
            hint=f"free space on {mount_point(path.parent)}, or export to another disk",
        )
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return PoolError(f"cannot write the archive{where}: {why}")


class ArchiveReader:
    """A read-only backend over a seekable tar file."""

    def __init__(self, fileobj: BinaryIO, *, source: str) -> None:
        self._lock = threading.Lock()
        self._source = source
        try:
            bounded = _BoundedReads(fileobj)
            self._tar = tarfile.open(fileobj=cast(BinaryIO, bounded), mode="r:")  # noqa: SIM115
            members = []
            while (member := self._tar.next()) is not None:  # stop past MAX_MEMBERS
                members.append(member)
                if len(members) > MAX_MEMBERS:
                    break
        except (OSError, tarfile.TarError) as exc:
            raise PoolError(
                f"{source} is not a torpor image archive ({exc})",
                hint="make one with `torpor image export NAME@POOL FILE`",
            ) from exc
        try:
            self._members = _check_members(members, source)
        except BaseException:
            self._tar.close()
            raise

    def _readonly(self) -> PoolError:
        return PoolError(f"{self._source} is a read-only archive")

    def put(self, key: str, data: bytes) -> None:
        """Refused: archives are read-only here."""
        raise self._readonly()

    def put_stream(self, key: str, stream: BinaryIO, size: int | None = None) -> None:
        """Refused: archives are read-only here."""
        raise self._readonly()

    def get(self, key: str, limit: int | None = None) -> bytes:
        """A member's content; :class:`KeyError` if there is none, :class:`~torpor.PoolError`
        if it is over ``limit`` bytes (its size in the tar header, checked before reading)."""
        member = self._members[key]
        if limit is not None and member.size > limit:
            raise too_large(key, self._source, member.size, limit)
        try:
            with self._lock:
                fh = self._tar.extractfile(member)
                if fh is None:
                    raise KeyError(key)
                return fh.read()
        except (OSError, tarfile.TarError) as exc:
            raise PoolError(f"cannot read {key} from {self._source}: {exc}") from exc

    def get_stream(self, key: str) -> BinaryIO:
        """A member's content as a stream."""
        return io.BytesIO(self.get(key))

    def exists(self, key: str) -> bool:
        """Whether the archive has this member."""
        return key in self._members

    def size(self, key: str) -> int:
        """A member's size; :class:`KeyError` if there is none."""
        return self._members[key].size

    def list(self, prefix: str = "") -> Iterator[str]:
        """The members whose name starts with ``prefix``."""
        return iter([k for k in self._members if k.startswith(prefix)])

    def delete(self, key: str) -> None:
        """A no-op: the archive is never changed (sessions of a reader are not stored)."""

    def close(self) -> None:
        """Close the tar reader (the file object stays open)."""
        self._tar.close()


class _BoundedReads:
    """A read-only view of an archive's file object refusing any one read of more than a
    member torpor writes (and its header block): CPython's tarfile reads a pax or GNU
    long-name header whole, of whatever size it declares, before any member is checked."""

    def __init__(self, fileobj: BinaryIO) -> None:
        self._f = fileobj

    def read(self, size: int = -1) -> bytes:
        limit = MAX_MEMBER + tarfile.BLOCKSIZE
        if size < 0 or size > limit:
            raise tarfile.ReadError(
                f"a header or member of {'unknown size' if size < 0 else f'{size} bytes'}, "
                f"more than {limit} bytes: not an archive `torpor image export` made"
            )
        return self._f.read(size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


def _check_members(members: list[tarfile.TarInfo], source: str) -> dict[str, tarfile.TarInfo]:
    """The archive's members by name, every one checked (see the module docstring)."""
    if len(members) > MAX_MEMBERS:
        raise _refused(source, f"{len(members)} members", "more than an export ever holds")
    out: dict[str, tarfile.TarInfo] = {}
    for n, m in enumerate(members, 1):
        if not m.isreg():
            kind = (
                "a symlink"
                if m.issym()
                else "a hard link"
                if m.islnk()
                else "a directory"
                if m.isdir()
                else "a device or FIFO"
            )
            raise _refused(source, m.name, f"is {kind}, not a regular file")
        match = _MEMBER_RE.fullmatch(m.name)
        if match is None or ".." in m.name:
            raise _refused(source, m.name, "is not a name an export writes")
        if match["pack"] is not None and match["pack"][:2] != match["fan"]:
            raise _refused(source, m.name, "is not a name an export writes")
        if m.name in out:
            raise _refused(source, m.name, "is in the archive twice")
        if member_problem(m.size, n) is not None:
            raise _refused(source, m.name, f"is larger than {MAX_MEMBER} bytes")
        out[check_key(m.name)] = m
    return out


def _refused(source: str, member: str, problem: str) -> UnsafeImageError:
    return UnsafeImageError(
        f"archive {source}: member {member!r} {problem}; refused",
        image=source,
        file=member,
        hint="this archive was not made by `torpor image export`: do not import it",
    )
