"""Page sources: the verified bytes of an image's ``pages-*.img`` files, for the page server.

:class:`PageSource` is the contract (``read`` verified bytes, ``prefetch`` in the background,
``close``); two sources implement it:

Local (:func:`local_source`)
    An image directory on this host. Its manifest holds one SHA-256 per *file*, which cannot
    verify a range of a file on its own, so the file is verified whole before any of it is
    served: either the image is :meth:`~torpor._images._image.Image.trusted` (its stamp says
    every file is exactly as when torpor last hashed it: same inode, size, mtime and ctime;
    any write changes the ctime, which no user can set back), or each pages file is hashed in
    full against the manifest when the source is made (the cost a full restore pays anyway).
    The files are then held open, and each read checks, after reading, that the file's
    inode, size, mtime and ctime are still the ones verified: a write to the file after the
    check fails the read instead of serving what was written.

Pool (:func:`pool_source`)
    An image in a pool, nothing local. A pages file is cut into 4 KiB chunks, each named by its
    SHA-256 and stored in packs of a few MiB (:mod:`torpor._pools._pack`). A read fetches the
    packs of the chunks it covers (one backend ``get`` per pack, kept in a small cache since
    neighbouring pages share packs), decodes only the frames it needs, and checks every chunk
    against its SHA-256 before a byte of it is used; verified chunks are kept in a bounded
    cache. A chunk that is in no pack, in a missing pack, in a frame that does not decode, or
    that does not match its SHA-256 raises :class:`LazyPageError` naming the image, the file
    and the chunk (index and hash). The source holds a pool session (like a pull) for as long
    as it is open, so garbage collection never removes a pack it still needs. The process that
materialised a pool image hands the source what it already resolved (:class:`Prepared`: the
record's chunk lists; where its chunks are, the packs its ``where`` names with the indexes read
so far, or else the catalog of every pack index; the packs it fetched); it is used only for the
very same record, only if none of its packs is condemned once the source's session is
registered, and a pack missing from it (swept between the two sessions) makes the source read
the catalog again. Through ``where`` (``_pools._located``), a pack's index is read at the
first fault in it, and a pack that does not hold the chunk ``where`` puts in it is a
:class:`LazyPageError` naming the file, chunk and pack.

``prefetch(ranges)`` walks the given ``(file, offset, length)`` ranges in order in one
background thread (the warm set first): for a pool it fills the chunk cache, locally it asks
the kernel to read ahead. A prefetch error is kept to be raised by the read that needs the
chunk, never raised from the background.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .._errors import ImageCorruptedError, PoolError, TorporError
from .._images._image import Image
from .._pools import _cas
from .._pools._located import Located, Stale
from .._pools._pack import (
    ChunkEntry,
    PackDamagedError,
    PackIndex,
    iter_pack,
    pack_key,
    pack_limit,
)
from .._pools._pool import Pool
from .._pools._reader import Catalog
from .._pools._record import FileRecord, Record
from .._pools._session import Condemned

# Bounds on the pool source's memory: verified chunks, and raw packs (one backend object each,
# at most ~4 MiB) kept because the next pages are usually in the same pack.
CHUNK_CACHE_BYTES = 256 << 20
PACK_CACHE_BYTES = 32 << 20
_HASH_BLOCK = 4 << 20

Range = tuple[str, int, int]
"""``(file, offset, length)`` of an image file."""


class LazyPageError(ImageCorruptedError):
    """A page of a lazily restored image could not be served verified: ``image``, ``file`` and
    ``chunk`` (``"<index> (sha256 <hash>)"`` for a pool chunk, None for a whole local file)
    name what failed. The page server never sends a byte of it."""

    def __init__(
        self,
        msg: str,
        *,
        image: str | Path | None = None,
        file: str | None = None,
        chunk: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(msg, image=image, file=file, hint=hint)
        self.chunk = chunk


_HINT = "the restored process must not run on it: stop it and restore from a good image"


class PageSource(Protocol):
    """Where the page server gets the bytes of an image's pages files."""

    def read(self, file: str, offset: int, length: int) -> bytes:
        """``length`` verified bytes of ``file`` from ``offset``; :class:`LazyPageError` if
        they cannot be read or verified (or the range is not inside the file)."""
        ...

    def prefetch(self, ranges: Iterable[Range]) -> None:
        """Start fetching ``ranges`` in the background, in order (best effort)."""
        ...

    def close(self) -> None:
        """Stop prefetching and release files, caches and sessions."""
        ...


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _Prefetcher:
    """One background thread walking ranges in order; later calls queue behind earlier ones."""

    def __init__(self, fetch: _FetchFn) -> None:
        self._fetch = fetch
        self._lock = threading.Lock()
        self._queue: list[Range] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, ranges: Iterable[Range]) -> None:
        with self._lock:
            self._queue.extend(ranges)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="torpor-prefetch", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if not self._queue:
                    self._thread = None
                    return
                item = self._queue.pop(0)
            try:
                self._fetch(*item)
            except TorporError:
                continue  # the read that needs it raises it (the contract: best effort)

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout=30)


class _FetchFn(Protocol):
    def __call__(self, file: str, offset: int, length: int, /) -> None: ...


class LocalSource:
    """The pages files of a local image (see the module docstring for how they are verified)."""

    def __init__(self, image: Image) -> None:
        self.image = image
        self._fds: dict[str, tuple[int, tuple[int, int, int, int, int]]] = {}
        self._prefetcher = _Prefetcher(self._advise)
        entries = {e.name: e for e in image.manifest.files if _is_pages(e.name)}
        try:
            for name in sorted(entries):
                f = image.open_file(name)
                fd = os.dup(f.fileno())
                f.close()
                self._fds[name] = (fd, _identity(os.fstat(fd)))
            if not image.trusted() or not self._same_as_stamped():
                for name, entry in sorted(entries.items()):
                    self._hash_whole(name, entry.sha256, entry.size)
        except BaseException:
            self.close()
            raise

    def _same_as_stamped(self) -> bool:
        # trusted() judged the files by name; make sure the fds opened are those files.
        with self.image.opened() as dir_fd:
            for name, (_, ident) in self._fds.items():
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if _identity(st) != ident:
                    return False
        return True

    def _hash_whole(self, name: str, sha256: str, size: int) -> None:
        fd, ident = self._fds[name]
        h = hashlib.sha256()
        pos = 0
        while True:
            block = os.pread(fd, _HASH_BLOCK, pos)
            if not block:
                break
            h.update(block)
            pos += len(block)
        if pos != size or h.hexdigest() != sha256 or _identity(os.fstat(fd)) != ident:
            raise LazyPageError(
                f"image {self.image.name!r} ({self.image.path}): file {name} does not match "
                "its SHA-256; no page of it is served",
                image=self.image.path,
                file=name,
                hint=_HINT,
            )

    def read(self, file: str, offset: int, length: int) -> bytes:
        """See :meth:`PageSource.read`."""
        held = self._fds.get(file)
        if held is None:
            raise self._bad(file, f"is not a pages file of the image ({file!r})")
        fd, ident = held
        if offset < 0 or length <= 0 or offset + length > ident[2]:
            raise self._bad(file, f"has no bytes {offset}..{offset + length}")
        try:
            data = os.pread(fd, length, offset)
            after = _identity(os.fstat(fd))
        except OSError as exc:
            raise self._bad(file, f"cannot be read ({exc.strerror})") from exc
        if after != ident:
            raise self._bad(file, "changed after it was verified")
        if len(data) != length:
            raise self._bad(file, f"is short: {len(data)} of {length} bytes at {offset}")
        return data

    def _bad(self, file: str, what: str) -> LazyPageError:
        return LazyPageError(
            f"image {self.image.name!r} ({self.image.path}): file {file} {what}",
            image=self.image.path,
            file=file,
            hint=_HINT,
        )

    def _advise(self, file: str, offset: int, length: int) -> None:
        held = self._fds.get(file)
        if held is not None:
            os.posix_fadvise(held[0], offset, length, os.POSIX_FADV_WILLNEED)

    def prefetch(self, ranges: Iterable[Range]) -> None:
        """See :meth:`PageSource.prefetch`: kernel read-ahead of the ranges."""
        self._prefetcher.add(ranges)

    def close(self) -> None:
        """See :meth:`PageSource.close`."""
        self._prefetcher.stop()
        for fd, _ in self._fds.values():
            os.close(fd)
        self._fds.clear()


def chunk_span(chunk_size: int, offset: int, length: int) -> range:
    """The indices of the chunks of ``chunk_size`` bytes that bytes ``offset`` to
    ``offset + length`` (``length`` > 0) of a file fall in."""
    return range(offset // chunk_size, (offset + length - 1) // chunk_size + 1)


def _is_pages(name: str) -> bool:
    return name.startswith("pages-") and name.endswith(".img")


def local_source(image: Image) -> LocalSource:
    """A :class:`PageSource` over the local image ``image``; its pages files are verified
    whole first unless the image is trusted by its stamp (:class:`LazyPageError` if not)."""
    return LocalSource(image)


class _LRU:
    """A byte-bounded least-recently-used map (thread-safe)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._size = 0
        self._items: OrderedDict[object, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: object) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: object, value: bytes) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= len(old)
            self._items[key] = value
            self._size += len(value)
            while self._size > self._limit and len(self._items) > 1:
                _, dropped = self._items.popitem(last=False)
                self._size -= len(dropped)


class PoolSource:
    """The pages files of an image in a pool, fetched chunk by chunk on demand (see the module
    docstring)."""

    def __init__(
        self,
        pool: Pool,
        name: str,
        *,
        chunk_cache: int = CHUNK_CACHE_BYTES,
        pack_cache: int = PACK_CACHE_BYTES,
        prepared: Prepared | None = None,
    ) -> None:
        self.pool = pool
        self.name = name
        self._session = pool._session("lazy")
        self._session.__enter__()
        try:
            rec: Record = pool._record(name)
            pool.policy.check(rec.name, pool.name, rec.origin)
            self._located: Located | None = None
            self._catalog: Catalog | None
            if prepared is not None and prepared.record == rec:
                lists = prepared.lists
                self._catalog, self._located = _still_sound(pool, prepared)
            else:
                lists = pool._resolve(rec)
                self._catalog = pool._catalog()
        except BaseException:
            self._session.__exit__(None, None, None)
            raise
        # The catalog read before our session began, while it is the one used.
        self._prepared = prepared.catalog if prepared is not None else None
        self.record = rec
        self._files: dict[str, tuple[FileRecord, Sequence[bytes]]] = {
            f.name: (f, digests)
            for f, digests in zip(rec.files, lists, strict=True)
            if _is_pages(f.name)
        }
        self._chunks = _LRU(chunk_cache)
        self._packs = _LRU(pack_cache)
        for pack_id, data in (prepared.packs if prepared is not None else {}).items():
            self._packs.put(pack_id, data)  # fetched by the process that materialised it
        self._pack_locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._locks_lock = threading.Lock()
        self._catalog_lock = threading.Lock()  # one thread reads the catalog again at a time
        self._failed: dict[bytes, str] = {}
        self._frames: dict[str, dict[int, PackIndex]] = {}
        self._prefetcher = _Prefetcher(self._warm)
        self.fetches = 0  # backend gets of packs (for tests and timing)

    def read(self, file: str, offset: int, length: int) -> bytes:
        """See :meth:`PageSource.read`."""
        held = self._files.get(file)
        if held is None:
            raise self._bad(file, None, None, f"is not a pages file of the image ({file!r})")
        frec, digests = held
        if offset < 0 or length <= 0 or offset + length > frec.size:
            raise self._bad(file, None, None, f"has no bytes {offset}..{offset + length}")
        cs = frec.chunk_size
        span = chunk_span(cs, offset, length)
        data = b"".join(self._chunk(file, frec, digests, i) for i in span)
        start = offset - span.start * cs
        return data[start : start + length]

    def _chunk(self, file: str, frec: FileRecord, digests: Sequence[bytes], i: int) -> bytes:
        d = digests[i]
        n = min(frec.chunk_size, frec.size - i * frec.chunk_size)
        if d == _cas.ZERO_PAGE and n == _cas.PAGE_SIZE:
            return _cas.ZERO_PAGE_BYTES
        data = self._chunks.get(d)
        if data is None:
            self._load(d, file, i)
            data = self._chunks.get(d)
            if data is None:  # evicted at once by a concurrent prefetch: fetch it again
                self._load(d, file, i)
                data = self._chunks.get(d)
        if data is None or len(data) != n:
            raise self._bad(file, i, d, f"has {0 if data is None else len(data)} bytes, not {n}")
        return data

    def _load(self, d: bytes, file: str, i: int) -> None:
        """Fetch, decode and verify the frame holding chunk ``d`` (and keep its neighbours).

        The one boundary of a chunk's fetch: any pool or transport failure under it (an
        index over its bound, a Ceph or S3 error on any object) is the chunk's bad page,
        never an exception that kills the page server's thread without a record."""
        try:
            self._fetch(d, file, i)
        except LazyPageError:
            raise
        except (OSError, TorporError) as exc:
            raise self._bad(file, i, d, f"cannot be fetched: {exc}") from exc

    def _fetch(self, d: bytes, file: str, i: int) -> None:
        """:meth:`_load`, unguarded."""
        found = self._located
        if found is not None:
            try:
                if self._load_located(found, d, file, i):
                    return
            except Stale:
                pass
            # A pack the record names is gone (a collection repacked it): every index, read
            # before the record's places go (a thread that then sees no places finds it).
            with self._catalog_lock:
                if self._located is found:
                    self._catalog = self._read_catalog(d, file, i)
                    self._located = None
        catalog = self._catalog
        if catalog is None:  # (only if reading it failed in another thread: try again)
            with self._catalog_lock:
                catalog = self._catalog
                if catalog is None:
                    catalog = self._catalog = self._read_catalog(d, file, i)
        if self._load_from(catalog, d, file, i, last=catalog is not self._prepared):
            # A catalog read before our session began (prepared) named a pack a collection
            # swept meanwhile: one read under our session says where the chunk is now.
            with self._catalog_lock:
                current = self._catalog
                if current is catalog or current is None:
                    current = self._catalog = self._read_catalog(d, file, i)
            self._load_from(current, d, file, i, last=True)

    def _read_catalog(self, d: bytes, file: str, i: int) -> Catalog:
        """The pool's catalog, read now (under :attr:`_catalog_lock`, which nothing else waits
        on: it takes 0.1-0.9 s); a failure is the chunk's, which cannot be fetched."""
        try:
            return self.pool._catalog()
        except (OSError, TorporError) as exc:
            raise self._bad(file, i, d, f"cannot be found: the pool's indexes: {exc}") from exc

    def _load_located(self, found: Located, d: bytes, file: str, i: int) -> bool:
        """:meth:`_load` through the record's ``where``; False if its pack is missing."""
        pack_id = found.pack_of(file, i)
        if pack_id is None:
            raise self._bad(file, i, d, "is in no pack, its record says")
        index = found.index(self.pool, pack_id)
        entry = found.entry(index, d)
        if entry is None:
            raise self._bad(file, i, d, f"is not in pack {pack_id}, where its record says it is")
        return not self._load_entry(pack_id, index, entry, d, file, i, last=False)

    def _load_from(self, catalog: Catalog, d: bytes, file: str, i: int, *, last: bool) -> bool:
        """:meth:`_load` from ``catalog``; True if its pack is missing and not ``last`` (else
        that is raised)."""
        loc = catalog.where.get(d)
        if loc is None:
            raise self._bad(file, i, d, "is in no pack of the pool")
        pack_id, entry = loc
        return self._load_entry(pack_id, catalog.indexes[pack_id], entry, d, file, i, last=last)

    def _load_entry(
        self,
        pack_id: str,
        index: PackIndex,
        entry: ChunkEntry,
        d: bytes,
        file: str,
        i: int,
        *,
        last: bool,
    ) -> bool:
        with self._locks_lock:
            lock = self._pack_locks[pack_id]
        with lock:
            if self._chunks.get(d) is not None:
                return False  # fetched meanwhile by the other thread
            if d in self._failed:
                raise self._bad(file, i, d, self._failed[d])
            data = self._packs.get(pack_id)
            if data is None:
                try:
                    data = self.pool.backend.get(pack_key(pack_id), limit=pack_limit(index))
                except KeyError as exc:
                    if not last:
                        return True
                    raise self._bad(file, i, d, f"is in pack {pack_id}, which is missing") from exc
                except PoolError as exc:  # the page's, to the daemon: the fix is the pool's
                    what = f"is in pack {pack_id}, which cannot be read: {exc.msg}"
                    hint = f"{_HINT}; {exc.hint}" if exc.hint else None
                    raise self._bad(file, i, d, what, hint=hint) from exc
                self.fetches += 1
                self._packs.put(pack_id, data)
            self._decode_frame(data, index, entry.frame, d, file, i)
        return False

    def _decode_frame(
        self, data: bytes, index: PackIndex, frame: int, d: bytes, file: str, i: int
    ) -> None:
        sub = self._frame_index(index, frame)
        # Every chunk of the frame is kept (each checked against its hash, found only by it):
        # a frame holds chunks pushed together, of this image but after a repack, and a set
        # of the image's 262,144 chunks (1 GiB) to filter them cost 20-60 ms at the first
        # fault after the resume.
        try:
            for digest, chunk in iter_pack(data, sub):
                if hashlib.sha256(chunk).digest() != digest:
                    self._failed[digest] = f"in pack {index.pack_id} does not match its SHA-256"
                    continue
                self._chunks.put(digest, chunk)
        except PackDamagedError as exc:
            for digest in exc.digests:
                self._failed[digest] = f"is in pack {index.pack_id}, which is damaged ({exc})"
        if d in self._failed:
            raise self._bad(file, i, d, self._failed[d])

    def _frame_index(self, index: PackIndex, frame: int) -> PackIndex:
        """``index`` cut down to the chunks of one frame: decoding a frame then costs its ~32
        chunks, not a walk of the pack's ~1000 (per frame, per fault)."""
        by_frame = self._frames.setdefault(index.pack_id, {})
        sub = by_frame.get(frame)
        if sub is None:
            sub = by_frame[frame] = PackIndex(
                index.pack_id, index.created, index.size, index.frames, index.frame_chunks(frame)
            )
        return sub

    def _bad(
        self, file: str, i: int | None, d: bytes | None, what: str, *, hint: str | None = None
    ) -> LazyPageError:
        chunk = None if i is None or d is None else f"{i} (sha256 {d.hex()})"
        where = f"file {file}" if chunk is None else f"file {file}, chunk {chunk}"
        return LazyPageError(
            f"image {self.name!r} in pool {self.pool.name!r}: {where} {what}",
            image=self.name,
            file=file,
            chunk=chunk,
            hint=hint or _HINT,
        )

    def _warm(self, file: str, offset: int, length: int) -> None:
        self.read(file, offset, length)

    def prefetch(self, ranges: Iterable[Range]) -> None:
        """See :meth:`PageSource.prefetch`: fills the chunk cache, in order."""
        self._prefetcher.add(ranges)

    def close(self) -> None:
        """See :meth:`PageSource.close`; ends the pool session (not the pool)."""
        self._prefetcher.stop()
        self._session.__exit__(None, None, None)


@dataclass(frozen=True)
class Prepared:
    """What a reader of the pool already resolved for a record (its chunk lists; where its
    chunks are: the packs its ``where`` names, or the pool's catalog; the packs fetched),
    handed to the :class:`PoolSource` of the process that serves its pages: building the
    catalog (every pack index decoded) costs ~0.1-0.9 s for a 1 GiB image. Used only while
    the pool's record is still exactly ``record``."""

    record: Record
    lists: Sequence[Sequence[bytes]]
    catalog: Catalog | None
    located: Located | None = None
    packs: dict[str, bytes] = field(default_factory=dict)
    later: Callable[[], object] | None = None  # writes the list objects fetched to the cache

    def save_cache(self) -> None:
        """Write the pack indexes (and list objects) fetched for it to the local cache."""
        if self.later is not None:
            self.later()
        if self.catalog is not None:
            self.catalog.save_cache()
        if self.located is not None:
            self.located.save_cache()


def _still_sound(pool: Pool, prepared: Prepared) -> tuple[Catalog | None, Located | None]:
    """The prepared way of finding chunks if no pack of it is condemned now (our session is
    registered: packs not condemned now stay until it ends), else a fresh catalog, as any new
    session would see it."""
    condemned = Condemned.load(pool.backend)
    if prepared.located is not None:
        if prepared.located.sound(condemned):
            return None, prepared.located
        return pool._catalog(), None
    assert prepared.catalog is not None
    if condemned.packs & prepared.catalog.indexes.keys():
        return pool._catalog(), None
    return prepared.catalog, None


def pool_source(pool: Pool, name: str, *, prepared: Prepared | None = None) -> PoolSource:
    """A :class:`PageSource` over image ``name`` of ``pool``, fetching page chunks on demand;
    refused like a pull (:class:`~torpor.SignatureError`, :class:`ImageCorruptedError`) before
    anything is served. With ``prepared`` (for the same record), its lists and catalog are
    used instead of being read again."""
    return PoolSource(pool, name, prepared=prepared)
