"""Writing images into a pool: push, and the commit every writer ends with.

A push cuts each file of a local image into chunks (:mod:`._cas`), checking the file against
its manifest on the way, and stores the chunks the pool lacks in new packs. Every writer
(push, copy, import) then stores the chunk lists and, last, the manifest: a short list inline
in the manifest, a long one as a patch against the list object of the newest image of the same
program when the patch is small, else in a new list object (a keyframe).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from .. import _safe
from .._errors import AlreadyExistsError, ImageCorruptedError, PoolError
from .._images._image import Image
from .._images._manifest import FileEntry, Manifest, new_id, now_iso
from .._images._store import check_name
from . import _cas, _record
from ._pack import PackIndex, PackWriter
from ._reader import Catalog, PoolImage, PoolReader, Progress, Ticker
from ._record import (
    FileRecord,
    Locations,
    Record,
    encode_list_object,
    file_problem,
    human,
    image_key,
    list_key,
    record_problem,
)
from ._session import Condemned, Heartbeat, NoHeartbeat
from ._sign import SOURCE_LABEL, Origin, local_origin

# Chunk lists up to this long live in the manifest; longer ones in list objects.
INLINE_MAX = 64
# A patch bigger than this fraction of a whole list is replaced by a new keyframe list.
KEYFRAME_RATIO = 0.25
# The patches of one manifest together take at most this fraction of MAX_RECORD (they are
# stored in it as base64); a file's patch beyond is replaced by a keyframe list.
PATCH_SHARE = 0.25
PUSH_HINT = "checkpoint a smaller process, or keep this image local"


@dataclass(frozen=True)
class _Base:
    list_id: str
    sha256: str
    digests: list[bytes]


def pack_finder(catalog: Catalog, written: Sequence[PackIndex]) -> Callable[[bytes], str | None]:
    """The pack holding a chunk once a writer's packs ``written`` are stored: one of those,
    else the one ``catalog`` (read before) names; None for the zero page (stored nowhere)."""
    new: dict[bytes, str] = {}
    for index in written:
        new.update(dict.fromkeys(index.digests(), index.pack_id))

    def pack_of(d: bytes) -> str | None:
        if d == _cas.ZERO_PAGE:
            return None
        found = new.get(d)
        return found if found is not None else catalog.where.pack_of(d)

    return pack_of


class PoolWriter(PoolReader):
    """The writing half of a pool: :meth:`push`, and the commit of every writer."""

    def push(self, image: Image, name: str, *, progress: Progress | None = None) -> PoolImage:
        """Store a local image as ``name``; only chunks the pool lacks are uploaded.

        The local files are checked against their manifest on the way (a file changed since
        the checkpoint is refused with :class:`ImageCorruptedError`).
        """
        self._check_free(name)
        local, origin = local_origin(image)
        self.policy.check(name, self.name, origin)
        sizes = [(e.name, e.size, _cas.chunk_size_for(e.name)) for e in local.files]
        self.check_storable(name, sizes, hint=PUSH_HINT)
        tick = Ticker(progress)
        with self._session("push") as heartbeat, _safe.opened_dir(image.path) as dir_fd:
            catalog = self._catalog()
            writer = PackWriter(self.backend, level=self.level)
            try:
                files = [
                    (
                        e,
                        _cas.chunk_size_for(e.name),
                        self._chunk_file(image, dir_fd, e, catalog, writer, tick),
                    )
                    for e in local.files
                ]
                written = writer.finish()
            except BaseException:
                writer.abort()
                raise
            labels = {**local.labels, SOURCE_LABEL: local.id}
            manifest = local.evolve(name=name, id=new_id(), labels=labels)
            rec = self._commit(
                heartbeat,
                catalog.condemned,
                manifest,
                files,
                writer.stored_bytes,
                origin,
                pack_of=pack_finder(catalog, written),
            )
        return self._to_image(rec)

    def _chunk_file(
        self,
        image: Image,
        dir_fd: int,
        entry: FileEntry,
        catalog: Catalog,
        writer: PackWriter,
        tick: Ticker,
    ) -> list[bytes]:
        digests: list[bytes] = []
        whole = hashlib.sha256()
        size = 0
        # Relative to the image's directory fd, O_NOFOLLOW, regular files only: a symlink
        # planted in a local image must not push a root-only file into a shared pool.
        try:
            fd = _safe.open_regular(dir_fd, entry.name, source=str(image.path))
            with os.fdopen(fd, "rb") as fh:
                for chunk in _cas.iter_chunks(fh, _cas.chunk_size_for(entry.name)):
                    whole.update(chunk)
                    size += len(chunk)
                    d = _cas.digest(chunk)
                    if d not in catalog.present:
                        writer.add(d, chunk)
                    digests.append(d)
                    tick(len(chunk))
        except OSError as exc:
            raise ImageCorruptedError(
                f"image {image.name!r} ({image.path}): cannot read {entry.name} ({exc.strerror})",
                image=image.path,
                file=entry.name,
                hint="push refused",
            ) from exc
        if size != entry.size or whole.hexdigest() != entry.sha256:
            raise ImageCorruptedError(
                f"image {image.name!r} ({image.path}) is corrupted: file {entry.name} does not "
                "match its manifest",
                image=image.path,
                file=entry.name,
                hint="push refused; checkpoint again",
            )
        return digests

    def check_storable(
        self, name: str, files: Sequence[tuple[str, int, int]], *, hint: str
    ) -> None:
        """Refuse (:class:`PoolError`) to store image ``name`` whose ``files`` (name, size,
        chunk size) a reader of this pool would refuse (:func:`~._record.file_problem`):
        called before anything is stored."""
        for file, size, chunk_size in files:
            problem = file_problem(size, chunk_size)
            if problem is not None:
                raise PoolError(
                    f"image {name!r} cannot be stored in pool {self.name!r}: its file {file} "
                    f"({human(size)}) {problem}",
                    pool=self.name,
                    hint=hint,
                )

    def _check_record(self, name: str, blob: bytes, *, hint: str) -> None:
        """Refuse (:class:`PoolError`) a stored manifest a reader would refuse for its size
        (:func:`~._record.record_problem`)."""
        problem = record_problem(blob)
        if problem is not None:
            raise PoolError(
                f"image {name!r} cannot be stored in pool {self.name!r}: {problem}",
                pool=self.name,
                hint=hint,
            )

    def _seal(self, rec: Record, stored: int) -> tuple[Record, bytes]:
        """Encode ``rec`` with ``stored_bytes`` counting the manifest itself."""
        total = stored
        for _ in range(4):
            rec = replace(rec, stored_bytes=total)
            blob = rec.encode()
            if stored + len(blob) == total:
                return rec, blob
            total = stored + len(blob)
        # The encoding is compressed: its length can swing between two values as the
        # number changes, never settling. Look for a number near that encodes to its own.
        near = stored + len(blob)
        for total in sorted(range(near - 64, near + 65), key=lambda t: abs(t - near)):
            candidate = replace(rec, stored_bytes=total)
            encoded = candidate.encode()
            if stored + len(encoded) == total:
                return candidate, encoded
        return rec, blob

    def _land(self, heartbeat: Heartbeat | NoHeartbeat, rec: Record, blob: bytes) -> None:
        """Store a manifest: the last write of every push, copy and import (one a reader
        would refuse for its size is not stored: :class:`PoolError`)."""
        self._check_record(rec.name, blob, hint="nothing was stored under this name")
        if not heartbeat.alive():
            raise PoolError(
                f"pool {self.name!r}: a gc declared this transfer dead (no heartbeat for "
                f"{self.timing.stale:.0f}s); its manifest was not stored",
                pool=self.name,
                hint="run the command again",
            )
        self._check_free(rec.name)
        self.backend.put(image_key(rec.name), blob)

    def _check_free(self, name: str) -> None:
        if self.backend.exists(image_key(check_name(name))):
            raise AlreadyExistsError(
                f"image {name!r} exists in pool {self.name!r}",
                path=f"{name}@{self.name}",
                hint=f"choose another name, or `torpor image delete {name}@{self.name}` first",
            )

    def _bases(self, cmdline: tuple[str, ...], condemned: Condemned) -> dict[str, _Base]:
        """Keyframe lists of the newest image of the same program, by file name."""
        same = [r for r in self._records() if r.manifest.cmdline == cmdline]
        if not same:
            return {}
        out: dict[str, _Base] = {}
        for f in same[-1].files:
            if f.list_id is None or f.list_sha256 is None or f.list_id in condemned.lists:
                continue
            with contextlib.suppress(KeyError, ValueError):
                out[f.name] = _Base(f.list_id, f.list_sha256, self._load_list(f))
        return out

    def _commit(
        self,
        heartbeat: Heartbeat | NoHeartbeat,
        condemned: Condemned,
        manifest: Manifest,
        files: Sequence[tuple[FileEntry, int, list[bytes]]],
        stored: int,
        origin: Origin | None,
        *,
        pack_of: Callable[[bytes], str | None] | None = None,
    ) -> Record:
        """Store the chunk lists, then the manifest, of an image whose chunks are stored;
        with ``pack_of`` (the pack holding a chunk), the manifest says where its chunks are
        (``where``, see :mod:`._record`, left out if a reader would not take it).

        Nothing is stored that a reader would refuse: the files are checked first
        (:meth:`check_storable`), and the manifest is sealed and checked before the first
        list object is stored. A refusal here leaves the packs stored so far to garbage
        collection, like any push that fails before its manifest."""
        hint = "nothing was stored under this name; the image stays where it was"
        self.check_storable(
            manifest.name, [(e.name, e.size, size) for e, size, _ in files], hint=hint
        )
        bases = self._bases(manifest.cmdline, condemned)
        recs: list[FileRecord] = []
        lists: list[tuple[str, bytes]] = []
        patch_room = PATCH_SHARE * _record.MAX_RECORD
        for entry, chunk_size, digests in files:
            common = (entry.name, entry.size, entry.sha256, chunk_size)
            if len(digests) <= INLINE_MAX:
                recs.append(FileRecord(*common, inline=_cas.encode_list(digests)))
                continue
            base = bases.get(entry.name)
            if base is not None:
                patch = _cas.make_patch(base.digests, digests)
                if len(patch) <= min(KEYFRAME_RATIO * _cas.DIGEST_SIZE * len(digests), patch_room):
                    patch_room -= len(patch)
                    recs.append(
                        FileRecord(
                            *common, list_id=base.list_id, list_sha256=base.sha256, patch=patch
                        )
                    )
                    continue
            blob, sha = encode_list_object(digests)
            list_id = uuid.uuid4().hex
            lists.append((list_id, blob))
            stored += len(blob)
            recs.append(FileRecord(*common, list_id=list_id, list_sha256=sha))
        where = None
        if pack_of is not None:
            where = Locations.build([pack_of(d) for _, _, ds in files for d in ds])
            if not Locations.within(len(where.packs)):
                where = None  # a hint: without it a lazy restore reads every index
        rec = Record(manifest.name, manifest, now_iso(), 0, tuple(recs), origin, where)
        rec, blob = self._seal(rec, stored)
        if where is not None and record_problem(blob) is not None:
            rec, blob = self._seal(replace(rec, where=None), stored)
        self._check_record(rec.name, blob, hint=hint)
        for list_id, list_blob in lists:
            self.backend.put(list_key(list_id), list_blob)
            self._cache_put("lists", list_id, list_blob)
        self._land(heartbeat, rec, blob)
        return rec
