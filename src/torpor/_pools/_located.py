"""Chunks found through a record's ``where`` (:class:`~._record.Locations`), for lazy restores.

A lazy restore of a 1 GiB image needs, before the process resumes, a few thousand chunks in
~10 packs; finding them through the pool's catalog meant listing and decoding every pack index
of the pool (266 for that image alone, ~0.1 s). A record that says which pack holds each of its
chunks lets :class:`Located` read the indexes of the packs asked for only, on demand, each
once (the local cache first, else the backend, concurrently).

The hint is hostile input (checked in shape by ``Locations.from_dict``). What it may do wrong,
and what then happens:

* name a pack whose index is gone or does not decode, or one that is condemned: that is what
  a collection's repack does to a good hint, so the caller falls back to the whole catalog
  (:class:`Stale`);
* put a chunk in a pack whose index does not hold it, or in no pack: :meth:`Located.entry`
  returns None, and the caller refuses the image naming the file, chunk and pack — never a
  hole or another chunk instead. Every chunk used is then checked against its SHA-256 as
  always (a lying index is a damaged pack, as before);
* name many packs for a few chunks, to have whole packs pulled for them: only the lazy
  restore's early fetch takes packs before their indexes are checked, and it pulls at most
  its budget (``torpor._lazy._poolfetch.budget``), past which it does not use ``where``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from ._pack import MAX_INDEX, ChunkEntry, PackDamagedError, PackIndex, index_key
from ._reader import READERS, PoolReader, bounded
from ._record import Record
from ._session import Condemned


class Stale(Exception):
    """A pack the record names is gone, damaged or condemned: use the whole catalog."""


class Located:
    """The packs of one record's chunks, from its ``where``, their indexes read on demand.

    Thread-safe; used in the process that fetched the record and in the keeper forked from it
    (each call is given the pool to read with: a pool opened before a fork is not used after).
    """

    def __init__(self, rec: Record, save: Callable[[str, bytes], None]) -> None:
        assert rec.where is not None
        self.record = rec
        self.packs = frozenset(rec.where.packs)
        self._find = rec.where.finder(rec.files)
        self.indexes: dict[str, PackIndex] = {}
        self._lock = threading.Lock()
        self._save = save
        self._unsaved: list[tuple[str, bytes]] = []

    def sound(self, condemned: Condemned) -> bool:
        """Whether no pack it names is condemned (else :class:`Stale` is the answer)."""
        return not (condemned.packs & self.packs)

    def pack_of(self, file: str, i: int) -> str | None:
        """The pack chunk ``i`` of ``file`` is in, per the record (None: in none)."""
        return self._find(file, i)

    def load(self, pool: PoolReader, pack_ids: Iterable[str]) -> None:
        """Read the indexes of ``pack_ids`` not read yet (cache, else backend, in threads);
        :class:`Stale` if one is gone or does not decode."""
        with self._lock:
            todo = sorted(set(pack_ids) - self.indexes.keys())
        if not todo:
            return

        def fetch(pack_id: str) -> tuple[str, PackIndex, bytes | None]:
            blob = pool._cached("index", pack_id)
            if blob is not None:
                try:
                    return pack_id, PackIndex.decode(pack_id, blob), None
                except PackDamagedError:
                    pool._cache_drop("index", pack_id)
            try:
                blob = pool.backend.get(index_key(pack_id), limit=MAX_INDEX)
                return pack_id, PackIndex.decode(pack_id, blob), blob
            except (KeyError, PackDamagedError) as exc:
                raise Stale(f"the index of pack {pack_id} is gone or damaged ({exc})") from exc

        many = len(todo) > 1
        found = bounded(fetch, todo, workers=READERS, window=4 * READERS) if many else []
        results = list(found) if many else [fetch(todo[0])]
        with self._lock:
            for pack_id, index, blob in results:
                if pack_id not in self.indexes:
                    self.indexes[pack_id] = index
                    if blob is not None:
                        self._unsaved.append((pack_id, blob))

    def index(self, pool: PoolReader, pack_id: str) -> PackIndex:
        """The index of ``pack_id`` (read now if it was not); :class:`Stale` as :meth:`load`."""
        found = self.indexes.get(pack_id)
        if found is None:
            self.load(pool, [pack_id])
            found = self.indexes[pack_id]
        return found

    def entry(self, index: PackIndex, digest: bytes) -> ChunkEntry | None:
        """``digest``'s entry in ``index``, or None if the pack does not hold it."""
        i = index.position(digest)
        return None if i is None else index.entry(i)

    def save_cache(self) -> None:
        """Write the indexes read from the backend to the local cache (once)."""
        with self._lock:
            todo, self._unsaved = self._unsaved, []
        for pack_id, blob in todo:
            self._save(pack_id, blob)


def located(pool: PoolReader, rec: Record) -> Located | None:
    """A :class:`Located` for ``rec``, or None: it has no ``where``, or a pack it names is
    condemned (a collection is sweeping it: the whole catalog says where its chunks are now)."""
    if rec.where is None:
        return None
    found = Located(rec, lambda pack_id, blob: pool._cache_put("index", pack_id, blob))
    return found if found.sound(Condemned.load(pool.backend)) else None
