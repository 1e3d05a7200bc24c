"""Fetching the local part of a pool image (``_poolimage.materialise``): where its chunks are,
and the packs fetched early.

:class:`Finder` finds the packs of the chunks wanted through the record's ``where``
(``_pools._located``: only the indexes of those packs are read), else, or once a pack it names
turns out gone, through the pool's catalog (every pack index).

:class:`Early` starts, as soon as the record is read, what does not need its chunk lists
(the list object of a 1 GiB image's pages file is 8 MiB, its fetch ~50-80 ms): the pool's warm
set, then, through ``where``, the indexes and packs of the small files' chunks and of the warm
set's chunks, in threads. The packs are only held (:class:`Stash`) until the chunks are
written: each chunk is checked against its SHA-256 from the lists as always, and a pack the
record names wrongly is refused where it is grouped, as without the early fetch.

``where`` is outside input, and the early fetch takes whole packs before the chunk lists say
which chunks they should hold: a record naming a pack per chunk would have it pull a pool's
worth of packs for a few chunks. So it pulls at most :func:`budget` bytes (twice the bytes of
the chunks it fetches for, or :data:`EARLY_PACKS` packs if more): a ``where`` naming more
packs than that for them, or whose packs come to more, is not used for this restore (one
line on stderr names the pool and image), and the pool's catalog says where the chunks are.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from .._errors import TorporError
from .._images._manifest import now_iso
from .._pools import _cas
from .._pools._located import Located, Stale
from .._pools._pack import MAX_PACK, PACK_TARGET, pack_key
from .._pools._pool import Pool
from .._pools._reader import FETCHERS, Catalog, Indexed
from .._pools._record import FileRecord, Record
from ._source import Prepared, Range, _is_pages, chunk_span

# Packs the early fetch may always pull (a 1 GiB image's small files and warm set: ~10).
EARLY_PACKS = 16


def budget(wanted: int) -> int:
    """The bytes of packs the early fetch may pull for chunks of ``wanted`` bytes."""
    return max(2 * wanted, EARLY_PACKS * PACK_TARGET)


class _Spent(TorporError):
    """The early fetch pulled its :func:`budget`: the packs not fetched yet are not."""


class Stash:
    """Packs fetched (or being fetched) by :class:`Early` or a pass of :func:`write`, by id;
    ``get`` waits for one being fetched (None if that failed: the caller fetches it again and
    reports what is wrong)."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        self._pending: dict[str, Future[bytes]] = {}

    def get(self, pack_id: str) -> bytes | None:
        fut = self._pending.get(pack_id)
        if fut is not None:
            try:
                return fut.result()
            except (KeyError, OSError, TorporError):
                return None
        return self._data.get(pack_id)

    def __setitem__(self, pack_id: str, data: bytes) -> None:
        self._data[pack_id] = data

    def pending(self, pack_id: str, fut: Future[bytes]) -> None:
        self._pending.setdefault(pack_id, fut)

    def done(self) -> dict[str, bytes]:
        """Every pack fetched."""
        out = dict(self._data)
        for pack_id, fut in self._pending.items():
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                out[pack_id] = fut.result()
        return out


class Early:
    """The warm set, and the indexes and packs of the small files' and warm set's chunks,
    fetched in threads from the moment the record is read (see the module docstring)."""

    def __init__(
        self,
        pool: Pool,
        rec: Record,
        found: Located | None,
        read_warm: Callable[[Pool, Record], list[Range]],
    ) -> None:
        self.stash = Stash()
        self._pool = pool
        self._rec = rec
        self._found = found
        self._ex = ThreadPoolExecutor(FETCHERS, thread_name_prefix="torpor-early")
        self._indexes: Future[None] | None = None
        self._lock = threading.Lock()
        self._limit = budget(0)
        self._pulled = 0
        #: Whether ``where`` named too many packs, or too many bytes of them (see the module
        #: docstring): then it is not used for this restore.
        self.distrusted = False
        self._warm = self._ex.submit(self._start, read_warm)

    def _start(self, read_warm: Callable[[Pool, Record], list[Range]]) -> list[Range]:
        warm = read_warm(self._pool, self._rec)
        found = self._found
        if found is None:
            return warm
        chunks: dict[tuple[str, int], int] = {}  # the small files' first: they are written first
        for f in self._rec.files:
            if not _is_pages(f.name):
                chunks.update(((f.name, i), _length(f, i)) for i in range(f.count))
        files = {f.name: f for f in self._rec.files}
        for file, offset, length in warm:
            f = files[file]
            chunks.update(
                ((file, i), _length(f, i)) for i in chunk_span(f.chunk_size, offset, length)
            )
        order: dict[str, None] = {}
        wanted = 0
        for (file, i), n in chunks.items():
            if (p := found.pack_of(file, i)) is not None:
                order[p] = None
                wanted += n
        packs = list(order)
        self._limit = budget(wanted)
        if len(packs) > self._limit // PACK_TARGET:
            self._refuse(f"names {len(packs)} packs for {wanted} bytes of chunks")
            return warm
        self._indexes = self._ex.submit(self._load, found, packs)
        for pack_id in packs:
            self.stash.pending(pack_id, self._ex.submit(self._get, pack_id))
        return warm

    def _refuse(self, why: str) -> None:
        """Stop trusting ``where`` for this restore (said once, on stderr)."""
        with self._lock:
            if self.distrusted:
                return
            self.distrusted = True
        print(
            f"{now_iso()} lazy restore: pool {self._pool.name!r}, image {self._rec.name!r}: "
            f"its record's where {why}, over the early fetch's {self._limit} bytes; "
            "not used: the pool's catalog says where its chunks are",
            file=sys.stderr,
            flush=True,
        )

    def _load(self, found: Located, packs: list[str]) -> None:
        with contextlib.suppress(Stale):  # the grouping reads them again, and falls back
            found.load(self._pool, packs)

    def _get(self, pack_id: str) -> bytes:
        if self.distrusted:
            raise _Spent(f"pack {pack_id} not fetched early")
        # Counted once it has arrived: what is in flight then (FETCHERS packs of MAX_PACK
        # bytes at most, the bound of a pack whose index is not at hand yet) is all the
        # budget can be overrun by. One over that bound fails here, and is fetched again, and
        # refused, under its index's size where it is used.
        data = self._pool.backend.get(pack_key(pack_id), limit=MAX_PACK)
        with self._lock:
            self._pulled += len(data)
            over = self._pulled > self._limit
        if over:
            self._refuse(f"names packs of over {self._pulled} bytes")
        return data

    def warm(self) -> list[Range]:
        """The pool's warm set of the record (checked)."""
        return self._warm.result()

    def settle(self) -> None:
        """Wait for the indexes being read (not the packs); :attr:`distrusted` is known then
        for the packs named, not yet for their bytes."""
        self._warm.result()
        if self._indexes is not None:
            self._indexes.result()

    def close(self) -> None:
        """Stop what has not started; wait for what runs."""
        self._ex.shutdown(wait=True, cancel_futures=True)


class Finder:
    """Where the chunks of one record are (see the module docstring); the catalog's index
    cache files are written only at ``PoolLazyImage.discard``."""

    def __init__(
        self, pool: Pool, rec: Record, lists: list[Sequence[bytes]], found: Located | None
    ) -> None:
        self._pool = pool
        self.located = found
        self.catalog: Catalog | None = None
        if found is None:
            self.catalog = pool._catalog(save_later=True)
        self.bad = pool._bad_chunk(rec, lists)
        self.early: Early | None = None
        #: Writes what was fetched to the local cache (called at the local part's discard).
        self.later: Callable[[], object] | None = None

    def group(
        self, pool: Pool, wanted: Sequence[tuple[str, int, bytes]]
    ) -> tuple[dict[str, set[bytes]], Indexed]:
        """``wanted`` chunks ``(file, index, digest)`` by pack, and the indexes of those."""
        if self.located is not None:
            if self.early is not None:
                self.early.settle()
            self._distrust(pool)
        if self.located is not None:
            try:
                return self._by_hint(pool, self.located, wanted)
            except Stale:
                self.located = None
        if self.catalog is None:
            self.catalog = pool._catalog(save_later=True)
        return pool._group([d for _, _, d in wanted], self.catalog, self.bad), self.catalog

    def _by_hint(
        self, pool: Pool, found: Located, wanted: Sequence[tuple[str, int, bytes]]
    ) -> tuple[dict[str, set[bytes]], Indexed]:
        by_pack: dict[str, set[bytes]] = defaultdict(set)
        for file, i, d in wanted:
            pack_id = found.pack_of(file, i)
            if pack_id is None:
                raise self.bad(d, "is in no pack, its record says (a zero page is the only one)")
            by_pack[pack_id].add(d)
        found.load(pool, by_pack)
        for pack_id, ds in by_pack.items():
            index = found.indexes[pack_id]
            for d in ds:
                if index.position(d) is None:  # (no entry made: iter_pack makes it)
                    raise self.bad(d, f"is not in pack {pack_id}, where its record says it is")
        return by_pack, found

    def _distrust(self, pool: Pool) -> None:
        """No ``where`` once the early fetch found it names too much: the catalog instead."""
        if self.early is not None and self.early.distrusted:
            self.located = None
            if self.catalog is None:
                self.catalog = pool._catalog(save_later=True)

    def prepared(self, rec: Record, lists: list[Sequence[bytes]], stash: Stash) -> Prepared:
        """For the keeper's page source: what was read here, and the packs fetched."""
        self._distrust(self._pool)
        return Prepared(rec, lists, self.catalog, self.located, stash.done(), self.later)


def _length(f: FileRecord, i: int) -> int:
    """The bytes of chunk ``i`` of ``f``."""
    return min(f.chunk_size, f.size - i * f.chunk_size)


def write(
    pool: Pool,
    finder: Finder,
    stash: Stash,
    fds: dict[str, int],
    files: dict[str, tuple[FileRecord, Sequence[bytes]]],
    wanted: Mapping[str, Iterable[int]],
) -> dict[str, list[tuple[int, int, bytes]]]:
    """Fetch the chunks ``wanted`` (indices per file), each verified, into place; the pages
    files' chunks written, as ``(offset, length, sha256)``."""
    places: dict[bytes, list[tuple[int, int]]] = defaultdict(list)
    written: dict[str, list[tuple[int, int, bytes]]] = {}
    chunks: list[tuple[str, int, bytes]] = []
    for name, indices in wanted.items():
        frec, digests = files[name]
        cs = frec.chunk_size
        out = written.setdefault(name, []) if _is_pages(name) else None
        for i in indices:
            d = digests[i]
            n = min(cs, frec.size - i * cs)
            if d == _cas.ZERO_PAGE and n == _cas.PAGE_SIZE:
                continue  # a hole reads as zeros
            if d not in places:
                chunks.append((name, i, d))
            places[d].append((fds[name], i * cs))
            if out is not None:
                out.append((i * cs, n, d))
    if not chunks:
        return written
    by_pack, indexes = finder.group(pool, chunks)

    # (fd, offset, chunk), verified, written in runs (:func:`_write_runs`) once all arrived
    # or, for a big file, each time :data:`_HELD` bytes are held.
    arrived: list[tuple[int, int, bytes]] = []
    held = [0]
    lock = threading.Lock()

    def sink(d: bytes, chunk: bytes) -> None:
        with lock:
            arrived.extend((fd, offset, chunk) for fd, offset in places[d])
            held[0] += len(chunk)
            if held[0] < _HELD:
                return
            batch = arrived[:]
            del arrived[:]
            held[0] = 0
        _write_runs(batch)

    try:
        pool._fetch(by_pack, indexes, sink, finder.bad, keep=stash)
        _write_runs(arrived)
    except OSError as exc:
        raise TorporError(
            f"cannot write the local part of image {next(iter(files), '')!r}: {exc.strerror}",
            hint="check the space and permissions of torpor's cache directory",
        ) from exc
    return written


_IOV_MAX = 1024  # Linux's UIO_MAXIOV: buffers one pwritev takes
_HELD = 32 << 20  # bytes of verified chunks held before they are written


def _write_runs(pieces: list[tuple[int, int, bytes]]) -> None:
    """Write ``(fd, offset, data)`` pieces, each run of ones that continue each other in one
    file with one ``pwritev`` (a warm set's ~5,000 chunks are ~20 runs: one ``pwrite`` per
    chunk was ~10 % of the local part's time from a pool)."""
    pieces.sort(key=lambda p: (p[0], p[1]))
    i = 0
    while i < len(pieces):
        fd, start, first = pieces[i]
        bufs = [first]
        end = start + len(first)
        j = i + 1
        while j < len(pieces) and len(bufs) < _IOV_MAX:
            nfd, off, data = pieces[j]
            if nfd != fd or off != end:
                break
            bufs.append(data)
            end += len(data)
            j += 1
        done = os.pwritev(fd, bufs, start)
        if done < end - start:  # short (a file system may): the rest piece by piece
            _write_rest(fd, bufs, start, done)
        i = j


def _write_rest(fd: int, bufs: list[bytes], start: int, done: int) -> None:
    """Finish a short ``pwritev`` of ``bufs`` at ``start`` that wrote ``done`` bytes."""
    view = memoryview(b"".join(bufs))[done:]
    offset = start + done
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        view, offset = view[n:], offset + n
