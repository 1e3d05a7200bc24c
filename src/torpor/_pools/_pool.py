"""A pool: images stored content-addressed and deduplicated in a backend.

Layout of a pool in its backend (every key under the contract of :mod:`._backend`)::

    torpor-pool.json           format marker
    images/<name>              one pool manifest per image (:mod:`._record`), written last
    lists/<id>                 chunk lists shared by manifests (keyframes)
    packs/<xx>/<id>            packs of compressed chunks (:mod:`._pack`)
    index/<id>                 one index per pack
    sessions/<id>              running pushes, pulls and copies (:mod:`._session`)
    gc/condemned, gc/lock-*    garbage collection state (:mod:`._gc`)
    supervision/<name>         the supervision spec of a process checkpointed here (failover)
    leases/<name>              the lease fencing that process's one live copy (ceph, s3)
    warm/<name>                the pages a lazy restore of image <name> touched first

A push cuts every file into chunks (:mod:`._cas`), stores the chunks the pool lacks in new
packs, then the chunk lists, then the manifest. A pull fetches the packs it needs
concurrently and writes each chunk into place as it arrives, after checking its SHA-256; the
image's files are then checked against their SHA-256 before the image is returned. A copy in
the same pool writes one new manifest; a copy to another pool moves only the chunks the
target lacks. Index and list objects never change once written, so they are cached under
``<torpor home>/cache``.

The code: :mod:`._reader` opens a pool and reads it (manifests, chunk lists, indexes, chunks),
:mod:`._write` pushes and commits, :mod:`._pull` materialises; :class:`Pool` here adds copies,
export and import, pruning, collection and statistics.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from .._errors import AlreadyExistsError, ImageError, ImageNotFoundError, PoolError, UsageError
from .._images._manifest import FileEntry, new_id, now_iso
from .._images._store import check_name
from . import _cas, _config
from ._archive import ArchiveReader, ArchiveWriter, export_problem, write_failure
from ._gc import GcStats, collect
from ._pack import PackWriter
from ._pull import PoolPuller
from ._reader import META_KEY, Progress, Ticker, is_image_name
from ._reader import PoolImage as PoolImage
from ._record import IMAGES_PREFIX, Record, human, image_key
from ._registry import open_backend
from ._session import Condemned, NoHeartbeat
from ._sign import Policy
from ._write import PoolWriter, pack_finder

_OWNED_PREFIXES = (
    "images/",
    "lists/",
    "packs/",
    "index/",
    "sessions/",
    "gc/",
    "supervision/",
    "leases/",
    "warm/",
    META_KEY,
)


@dataclass(frozen=True)
class PoolStats:
    """What a pool holds: images, packs (stored bytes) and the chunks in them (raw bytes)."""

    images: int
    packs: int
    pack_bytes: int
    chunks: int
    chunk_bytes: int


class Pool(PoolWriter, PoolPuller):
    """Images stored content-addressed and deduplicated in a :class:`Backend`.

    Get one with :func:`open_pool`. A pool object may be used from several threads; the
    backend is closed with :meth:`close` (or by leaving a ``with`` block).
    """

    def __repr__(self) -> str:
        return f"<Pool {self.name!r}>"

    def __enter__(self) -> Pool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the backend's connections."""
        self.backend.close()

    # -- images ---------------------------------------------------------------------------

    def image(self, name: str) -> PoolImage:
        """The image called ``name``; :class:`ImageNotFoundError` if there is none."""
        return self._to_image(self._record(name))

    def list_images(self) -> list[PoolImage]:
        """Every image in the pool, oldest checkpoint first."""
        return [self._to_image(r) for r in self._records()]

    def delete_image(self, name: str) -> None:
        """Remove image ``name`` (its chunks go at the next :meth:`gc`); works on an image
        whose manifest is damaged too."""
        if not self.backend.exists(image_key(check_name(name))):
            raise ImageNotFoundError(
                f"no image {name!r} in pool {self.name!r}",
                image=name,
                hint=f"`torpor images --pool {self.name}` lists them",
            )
        self.backend.delete(image_key(name))
        self.backend.delete(f"warm/{name}")  # its warm set (lazy restores), if it had one

    def copy_image(
        self,
        src: str,
        dst: str,
        *,
        to_pool: Pool | None = None,
        progress: Progress | None = None,
    ) -> PoolImage:
        """Copy image ``src`` to ``dst`` in this pool or in ``to_pool``.

        In the same pool this writes one new manifest (O(1)); to another pool only the chunks
        it lacks move, verified on the way. The image keeps its signature; the signature
        policies of both pools are checked on the manifest before anything is fetched.
        """
        target = to_pool or self
        target._check_free(dst)
        rec = self._record(src)
        self.policy.check(rec.name, self.name, rec.origin)
        if target is not self:
            target.policy.check(rec.name, target.name, rec.origin)
        if target is self:
            with self._session("copy") as heartbeat:
                condemned = Condemned.load(self.backend)
                if not condemned.packs and not (rec.list_ids & condemned.lists):
                    manifest = rec.manifest.evolve(name=dst, id=new_id())
                    new, blob = self._seal(
                        replace(rec, name=dst, manifest=manifest, pushed=now_iso()), 0
                    )
                    self._land(heartbeat, new, blob)
                    Ticker(progress)(rec.size)
                    return self._to_image(new)
        return self._transfer(rec, target, dst, Ticker(progress))

    def _transfer(self, rec: Record, target: Pool, dst: str, tick: Ticker) -> PoolImage:
        """Copy ``rec`` into ``target`` as ``dst``, moving the chunks ``target`` lacks
        (refused before anything is stored if ``target``'s readers would refuse it)."""
        target.check_storable(
            dst,
            [(f.name, f.size, f.chunk_size) for f in rec.files],
            hint=f"it stays as it is in {self.name!r}",
        )
        lists = self._resolve(rec)
        bad = self._bad_chunk(rec, lists)
        reading = self._session("read") if target is not self else NoHeartbeat()
        with target._session("copy") as heartbeat, reading:
            target_catalog = target._catalog()
            catalog = self._catalog() if target is not self else target_catalog
            need: dict[bytes, int] = defaultdict(int)
            done = 0
            for f, digests in zip(rec.files, lists, strict=True):
                for d, n in zip(digests, _cas.chunk_lengths(f.size, f.chunk_size), strict=True):
                    if d in target_catalog.present:
                        done += n
                    else:
                        need[d] += n
            tick(done)
            by_pack = self._group(need, catalog, bad)
            writer = PackWriter(target.backend, level=target.level)
            lock = threading.Lock()

            def sink(d: bytes, chunk: bytes) -> None:
                with lock:
                    writer.add(d, chunk)
                tick(need[d])

            try:
                self._fetch(by_pack, catalog, sink, bad)
                written = writer.finish()
            except BaseException:
                writer.abort()
                raise
            files = [
                (FileEntry(f.name, f.size, f.sha256), f.chunk_size, digests)
                for f, digests in zip(rec.files, lists, strict=True)
            ]
            manifest = rec.manifest.evolve(name=dst, id=new_id())
            new = target._commit(
                heartbeat,
                target_catalog.condemned,
                manifest,
                files,
                writer.stored_bytes,
                rec.origin,
                pack_of=pack_finder(target_catalog, written),
            )
        return target._to_image(new)

    def prune(self, keep: int, *, prefix: str | None = None) -> list[PoolImage]:
        """Delete all but the ``keep`` newest images of each program (same command line),
        among the images whose name starts with ``prefix`` (all if ``None``).

        Returns the deleted images; their chunks go at the next :meth:`gc`.
        """
        if keep < 0:
            raise UsageError(f"--keep must be 0 or more, not {keep}")
        groups: dict[tuple[str, ...], list[Record]] = defaultdict(list)
        for rec in self._records():
            if prefix is None or rec.name.startswith(prefix):
                groups[rec.manifest.cmdline].append(rec)
        deleted: list[PoolImage] = []
        for recs in groups.values():
            recs.sort(key=lambda r: r.manifest.created, reverse=True)
            for rec in recs[keep:]:
                self.backend.delete(image_key(rec.name))
                deleted.append(self._to_image(rec))
        return sorted(deleted, key=lambda i: i.created)

    def gc(self, *, repack: float = 0.5, wait: float = 600.0) -> GcStats:
        """Delete the packs and lists no image needs, safely next to running transfers.

        Packs whose live chunks are under ``repack`` of their bytes are rewritten first
        (``0`` disables repacking). ``wait`` bounds the wait for running transfers.
        See :mod:`torpor._pools._gc` for the protocol.
        """
        if not 0.0 <= repack <= 1.0:
            raise UsageError(f"repack threshold must be between 0 and 1, not {repack}")
        return collect(self, repack=repack, wait=wait)

    def export_image(
        self,
        name: str,
        file: str | os.PathLike[str] | BinaryIO,
        *,
        progress: Progress | None = None,
    ) -> None:
        """Write image ``name`` with every chunk it needs into one archive file.

        ``file`` is a path (created 0600; never overwritten) or a binary file object.
        """
        if isinstance(file, str | os.PathLike):
            path = Path(file)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError as exc:
                raise AlreadyExistsError(
                    f"{path} exists already", path=str(path), hint="choose another file name"
                ) from exc
            except OSError as exc:
                raise ImageError(f"cannot create {path}: {exc.strerror}", image=name) from exc
            try:
                with os.fdopen(fd, "wb") as fh:
                    self._export(name, fh, progress, path=path)
            except BaseException as exc:
                with contextlib.suppress(OSError):
                    path.unlink()
                if isinstance(exc, OSError):  # the buffered file's last write, at its close
                    raise write_failure(exc, path) from exc
                raise
        else:
            self._export(name, file, progress)

    def _export(
        self, name: str, fh: BinaryIO, progress: Progress | None, *, path: Path | None = None
    ) -> None:
        rec = self._record(name)
        for f in rec.files:
            problem = export_problem(f.size, f.chunk_size)
            if problem is not None:
                raise PoolError(
                    f"image {name!r} in pool {self.name!r} cannot be exported: its file "
                    f"{f.name} ({human(f.size)}) {problem}",
                    pool=self.name,
                    hint=f"it stays in {self.name!r}; copy it to another pool instead",
                )
        writer = ArchiveWriter(fh, path=path)
        try:
            archive = Pool("archive", writer, level=self.level, sessions=False, cache=False)
            self.copy_image(name, name, to_pool=archive, progress=progress)
        except BaseException:
            # End the tar stream anyway: an archive without its manifest (written last)
            # is refused by import, never mistaken for a whole image.
            with contextlib.suppress(PoolError):
                writer.close()
            raise
        writer.close()

    def import_image(
        self,
        file: str | os.PathLike[str] | BinaryIO,
        name: str | None = None,
        *,
        progress: Progress | None = None,
    ) -> PoolImage:
        """Store the image of an archive made by :meth:`export_image` (as ``name`` if given).

        Every chunk is verified; chunks the pool has already are not stored again.
        """
        if isinstance(file, str | os.PathLike):
            try:
                with open(file, "rb") as fh:
                    return self._import(fh, str(file), name, progress)
            except OSError as exc:
                raise ImageNotFoundError(
                    f"cannot read archive {file}: {exc.strerror}", image=str(file)
                ) from exc
        return self._import(file, getattr(file, "name", "archive"), name, progress)

    def _import(
        self, fh: BinaryIO, source: str, name: str | None, progress: Progress | None
    ) -> PoolImage:
        reader = ArchiveReader(fh, source=source)
        if not reader.exists(META_KEY):
            raise PoolError(
                f"{source} is not a torpor image archive",
                hint="make one with `torpor image export NAME@POOL FILE`",
            )
        archive = Pool("archive", reader, sessions=False, cache=False)
        names = [k[len(IMAGES_PREFIX) :] for k in reader.list(IMAGES_PREFIX)]
        if len(names) != 1:
            raise PoolError(f"{source} holds {len(names)} images, expected exactly one")
        return archive.copy_image(names[0], name or names[0], to_pool=self, progress=progress)

    def stats(self) -> PoolStats:
        """What the pool holds (reads every index; no chunk data)."""
        indexes = self._load_indexes()
        return PoolStats(
            images=sum(
                1
                for k in self.backend.list(IMAGES_PREFIX)
                if is_image_name(k[len(IMAGES_PREFIX) :])
            ),
            packs=len(indexes),
            pack_bytes=sum(i.size for i in indexes.values()),
            chunks=sum(len(i.chunks) for i in indexes.values()),
            chunk_bytes=sum(c.length for i in indexes.values() for c in i.chunks),
        )

    def destroy(self) -> int:
        """Delete every object torpor keeps in the backend; return how many."""
        n = 0
        for prefix in _OWNED_PREFIXES:
            for key in list(self.backend.list(prefix)):
                self.backend.delete(key)
                n += 1
        return n


def open_pool(name: str) -> Pool:
    """Open the configured pool ``name`` (``default`` always exists).

    Raises :class:`~torpor.NotFoundError` for an unknown pool and :class:`~torpor.PoolError`
    when its backend cannot be reached or its driver is not installed.
    """
    cfg = _config.load(name)
    backend = open_backend(cfg.spec, cfg.name, cfg.config)
    effective = cfg.effective()
    try:
        return Pool(
            cfg.name,
            backend,
            level=int(effective["compression.level"]),
            policy=Policy.from_config(effective),
        )
    except BaseException:
        backend.close()
        raise
