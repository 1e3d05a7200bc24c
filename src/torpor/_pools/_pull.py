"""Pulling an image out of a pool: materialised under the local cache, fully verified.

The packs an image needs are fetched concurrently and each chunk is written into place as it
arrives, after its SHA-256 check (zero pages stay holes); every file is checked against its
SHA-256 before the image is committed to the cache. A cached copy of the same image (the
record's manifest exactly, not only its id) is reused once it verifies.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections import defaultdict
from pathlib import Path

from .. import _paths, _safe
from .._errors import AlreadyExistsError, ImageCorruptedError, ImageError, ImageNotFoundError
from .._images._image import Image, Staging
from .._images._manifest import FileEntry, Manifest
from . import _cas
from ._reader import REFUSED_HINT, PoolReader, Progress, Ticker
from ._record import Record, image_key


class PoolPuller(PoolReader):
    """The pulling half of a pool: :meth:`pull`."""

    def pull(self, name: str, *, progress: Progress | None = None) -> Image:
        """Materialise image ``name`` under the local cache and return it, fully verified.

        Every chunk is checked against its SHA-256 as it arrives and every file against its
        SHA-256 before the image is returned; a bad or missing chunk raises
        :class:`ImageCorruptedError` naming the image, the file and the chunk. A cached copy
        of the same image (the record's manifest exactly) is reused after it verifies. An
        image the pool's signature policy refuses raises :class:`~torpor.SignatureError`
        before anything is fetched (or a cached copy used).
        """
        tick = Ticker(progress)
        with self._session("pull"):
            rec = self._record(name)
            self.policy.check(rec.name, self.name, rec.origin)
            dest = _paths.cache_dir() / "images" / rec.manifest.id
            hit = self._cache_hit(dest, rec)
            if hit is not None:
                tick(rec.size)
                return hit
            try:
                return self._materialise(rec, dest, tick)
            except ImageCorruptedError as exc:
                if not self.backend.exists(image_key(name)):
                    raise ImageNotFoundError(
                        f"image {name!r} was deleted from pool {self.name!r} while pulling",
                        image=name,
                    ) from exc
                raise

    def _cache_hit(self, dest: Path, rec: Record) -> Image | None:
        if not dest.is_dir():
            return None
        try:
            image = Image.open(dest)
            # The whole manifest, not only the id that names the directory: an id is a
            # pool-side field anyone who writes to a pool may set, to the id of a trusted
            # image of another pool too. A copy pulled from there must never stand in for it.
            if image.manifest == rec.manifest:
                image.verify()
                return image
        except ImageError:
            pass
        stale = dest.with_name(f".{dest.name}.stale-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(OSError):
            dest.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        return None

    def _materialise(self, rec: Record, dest: Path, tick: Ticker) -> Image:
        lists = self._resolve(rec)
        catalog = self._catalog()
        bad = self._bad_chunk(rec, lists)
        places: dict[bytes, list[tuple[int, int]]] = defaultdict(list)
        zero_bytes = 0
        for fi, (f, digests) in enumerate(zip(rec.files, lists, strict=True)):
            offset = 0
            for d, n in zip(digests, _cas.chunk_lengths(f.size, f.chunk_size), strict=True):
                if d == _cas.ZERO_PAGE and n == _cas.PAGE_SIZE:
                    zero_bytes += n
                else:
                    places[d].append((fi, offset))
                offset += n
        by_pack = self._group(places, catalog, bad)
        staging = Staging(dest)
        try:
            staging.create()
        except AlreadyExistsError:
            hit = self._cache_hit(dest, rec)  # pulled meanwhile by someone else
            if hit is not None:
                tick(rec.size)
                return hit
            raise
        try:
            fds: list[int] = []
            try:
                # Names were checked plain when the record was decoded; create_file checks
                # again and creates each O_EXCL|O_NOFOLLOW, 0600, inside the staging directory.
                with _safe.opened_dir(staging.path) as staging_fd:
                    for f in rec.files:
                        fd = _safe.create_file(staging_fd, f.name, source=f"image {rec.name!r}")
                        fds.append(fd)
                        os.ftruncate(fd, f.size)  # zero pages stay holes
                tick(zero_bytes)

                def sink(d: bytes, chunk: bytes) -> None:
                    for fi, offset in places[d]:
                        os.pwrite(fds[fi], chunk, offset)
                    tick(len(chunk) * len(places[d]))

                self._fetch(by_pack, catalog, sink, bad)
            except OSError as exc:
                raise ImageError(
                    f"cannot write image {rec.name!r} to {staging.path}: {exc.strerror}",
                    image=rec.name,
                    hint="check the space and permissions of torpor's cache directory",
                ) from exc
            finally:
                for fd in fds:
                    os.close(fd)

            def check(entries: list[FileEntry]) -> Manifest:
                got = {e.name: e for e in entries}
                for f in rec.files:
                    e = got.get(f.name)
                    if e is None or e.size != f.size or e.sha256 != f.sha256:
                        raise self._corrupted(
                            rec.name,
                            f"file {f.name} does not match its SHA-256 after assembly",
                            file=f.name,
                            hint=REFUSED_HINT,
                        )
                return rec.manifest

            try:
                # Not signed here: this host did not make the image (its pool record carries
                # the maker's signature; `image copy` keeps it).
                return staging.commit(check, sign=False)
            except AlreadyExistsError:
                hit = self._cache_hit(dest, rec)
                if hit is None:
                    raise
                return hit
        finally:
            staging.discard()
