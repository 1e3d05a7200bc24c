"""Where each chunk of a pool is: :class:`Where` (digest to pack) and the :class:`Catalog`
a session builds on it (the pack indexes, the condemned set, the chunks a writer may use).
Split out of :mod:`._reader`, which builds catalogs from what the backend holds.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterable, KeysView, Sequence

from . import _cas
from ._pack import ChunkEntry, PackIndex
from ._session import Condemned


class Where:
    """Which pack holds each chunk: ``get(digest)`` is ``(pack id, entry)`` or None.

    One dict from digest to a position in the concatenated chunk tables of ``packs`` (in
    order: a later pack's copy of a chunk wins), made with C-level loops, no object per chunk,
    and only on first use: ~55 ms for the 262,144 chunks of a 1 GiB image (a dict of entry
    objects took ~0.3 s). :meth:`locate` finds a few thousand chunks without it (~25 ms), which
    is all a lazy restore needs before the process resumes.
    """

    def __init__(self, packs: Sequence[PackIndex]) -> None:
        self._packs = list(packs)
        self._starts: list[int] = []
        base = 0
        for index in self._packs:
            self._starts.append(base)
            base += index.count
        self._built: dict[bytes, int] | None = None
        self._lock = threading.Lock()

    @property
    def _pos(self) -> dict[bytes, int]:
        built = self._built
        if built is None:
            with self._lock:
                if self._built is None:
                    pos: dict[bytes, int] = {}
                    for index, base in zip(self._packs, self._starts, strict=True):
                        pos.update(
                            zip(index.digests(), range(base, base + index.count), strict=True)
                        )
                    self._built = pos
                built = self._built
        return built

    def build_soon(self) -> None:
        """Build the map in a background thread now (a later lookup waits for it)."""
        if self._built is None:
            threading.Thread(target=lambda: self._pos, name="torpor-where", daemon=True).start()

    def get(self, digest: bytes) -> tuple[str, ChunkEntry] | None:
        """Where ``digest`` is, or None."""
        pos = self._pos.get(digest)
        if pos is None:
            return None
        i = bisect.bisect_right(self._starts, pos) - 1
        index = self._packs[i]
        return index.pack_id, index.entry(pos - self._starts[i])

    def pack_of(self, digest: bytes) -> str | None:
        """The id of the pack holding ``digest``, or None."""
        pos = self._pos.get(digest)
        if pos is None:
            return None
        return self._packs[bisect.bisect_right(self._starts, pos) - 1].pack_id

    def locate(self, digests: Iterable[bytes]) -> dict[bytes, str]:
        """The pack of each of ``digests`` that is in one (the same one :meth:`pack_of`
        names), without building the whole map if it is not built yet."""
        wanted = set(digests)
        if self._built is not None or not wanted:
            found = ((d, self.pack_of(d)) for d in wanted)
            return {d: p for d, p in found if p is not None}
        out: dict[bytes, str] = {}
        for index in reversed(self._packs):  # the last pack holding a chunk wins
            hits = wanted.intersection(index.digests())
            if hits:
                out.update(dict.fromkeys(hits, index.pack_id))
                wanted -= hits
                if not wanted:
                    break
        return out

    def __contains__(self, digest: object) -> bool:
        return digest in self._pos

    def __len__(self) -> int:
        return len(self._pos)

    def digests(self) -> KeysView[bytes]:
        """Every chunk id found."""
        return self._pos.keys()


class Catalog:
    """Where each chunk of the pool is, as a session sees it.

    ``present`` are the chunks a writer may rely on (in packs nobody condemned; made on first
    use: a restore never asks); ``where`` finds any copy, preferring uncondemned and newer
    packs. ``unsaved`` are the index objects fetched from the backend but not yet written to
    the local cache (see :meth:`PoolReader._catalog`); :meth:`save_cache` writes them.
    """

    def __init__(
        self,
        indexes: dict[str, PackIndex],
        condemned: Condemned,
        unsaved: Callable[[], None] | None = None,
    ) -> None:
        self.indexes = indexes
        self.condemned = condemned
        order = sorted(indexes, key=lambda p: (p not in condemned.packs, indexes[p].created))
        self.where = Where([indexes[p] for p in order])
        self._present: set[bytes] | None = None
        self._unsaved = unsaved

    def save_cache(self) -> None:
        """Write the indexes fetched for this catalog to the local cache (once)."""
        save, self._unsaved = self._unsaved, None
        if save is not None:
            save()

    @property
    def present(self) -> set[bytes]:
        """The chunks in packs nobody condemned, and the zero page."""
        if self._present is None:
            if self.condemned.packs & self.indexes.keys():
                kept = [i for p, i in self.indexes.items() if p not in self.condemned.packs]
                present = {d for i in kept for d in i.digests()}
            else:
                present = set(self.where.digests())
            present.add(_cas.ZERO_PAGE)
            self._present = present
        return self._present
