"""Export archives: one image and exactly the chunks it needs, in one self-contained file.

An archive is a tar file laid out like a pool holding one image (``torpor-pool.json``, then
``packs/``, ``index/``, ``lists/`` objects, then ``images/<name>`` last). Exporting is copying
the image into a write-only pool over :class:`ArchiveWriter`; importing is copying it out of a
read-only pool over :class:`ArchiveReader`. Chunks stay compressed and are verified on the
way in, like any copy between pools.
"""

from __future__ import annotations

import io
import tarfile
import threading
import time
from collections.abc import Iterator
from typing import BinaryIO

from .._errors import PoolError
from ._backend import check_key


class ArchiveWriter:
    """A write-only backend appending every ``put`` to a tar stream (no seeking needed)."""

    def __init__(self, fileobj: BinaryIO) -> None:
        # The tar object lives as long as the backend; close() ends it.
        self._tar = tarfile.open(fileobj=fileobj, mode="w|")  # noqa: SIM115
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes) -> None:
        """Append a member."""
        info = tarfile.TarInfo(check_key(key))
        info.size = len(data)
        info.mode = 0o600
        info.mtime = int(time.time())
        try:
            with self._lock:
                self._tar.addfile(info, io.BytesIO(data))
        except (OSError, tarfile.TarError) as exc:
            raise PoolError(f"cannot write the archive: {exc}") from exc

    def put_stream(self, key: str, stream: BinaryIO, size: int | None = None) -> None:
        """Append a member from a stream."""
        self.put(key, stream.read())

    def get(self, key: str) -> bytes:
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
            raise PoolError(f"cannot finish the archive: {exc}") from exc


class ArchiveReader:
    """A read-only backend over a seekable tar file."""

    def __init__(self, fileobj: BinaryIO, *, source: str) -> None:
        self._lock = threading.Lock()
        self._source = source
        try:
            self._tar = tarfile.open(fileobj=fileobj, mode="r:")  # noqa: SIM115
            self._members = {m.name: m for m in self._tar.getmembers() if m.isfile()}
        except (OSError, tarfile.TarError) as exc:
            raise PoolError(
                f"{source} is not a torpor image archive ({exc})",
                hint="make one with `torpor image export NAME@POOL FILE`",
            ) from exc

    def _readonly(self) -> PoolError:
        return PoolError(f"{self._source} is a read-only archive")

    def put(self, key: str, data: bytes) -> None:
        """Refused: archives are read-only here."""
        raise self._readonly()

    def put_stream(self, key: str, stream: BinaryIO, size: int | None = None) -> None:
        """Refused: archives are read-only here."""
        raise self._readonly()

    def get(self, key: str) -> bytes:
        """A member's content; :class:`KeyError` if there is none."""
        member = self._members[key]
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
