"""The base of every pool: opening it, and reading what it holds.

:class:`PoolReader` is what each operation of :class:`~._pool.Pool` stands on, and all that
garbage collection (:mod:`._gc`) needs of a pool: the format marker, sessions, the pack
indexes and chunk lists (kept in the local cache, :mod:`._cache`), the manifests, and chunks
fetched from packs concurrently, each checked against its SHA-256.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Protocol, TypeVar, cast

from .._errors import ImageCorruptedError, ImageNotFoundError, PoolError, TorporError, UsageError
from .._images._manifest import now_iso
from .._images._store import check_name
from . import _cas
from ._backend import Backend, PoolObjectTooLargeError
from ._cache import drop_cached, read_cached, write_cached
from ._catalog import Catalog as Catalog
from ._catalog import Where as Where
from ._pack import (
    MAX_INDEX,
    PackDamagedError,
    PackIndex,
    index_key,
    iter_pack,
    pack_key,
    pack_limit,
)
from ._record import (
    IMAGES_PREFIX,
    MAX_RECORD,
    FileRecord,
    Record,
    decode_list_object,
    decode_list_object_lazily,
    image_key,
    is_id,
    list_key,
    list_limit,
)
from ._session import Condemned, Heartbeat, NoHeartbeat, Timing, session
from ._sign import Policy

META_KEY = "torpor-pool.json"
# The format marker is a few dozen bytes of JSON.
MAX_META = 64 << 10
POOL_FORMAT = 1
FETCHERS = 4
READERS = 8
# The most bytes a listing keeps of every image manifest of a pool together (a manifest
# holds a few KiB: this is tens of thousands of images).
MAX_RECORDS_TOTAL = 256 << 20
# True wherever it is raised (pull, restore NAME@POOL, copy, export, import): the image is
# refused before it is used, and only torpor's own cache or pool objects were written.
REFUSED_HINT = "the image was refused before any use; use another image"

Progress = Callable[[int], None]
"""Called with the number of bytes done since the previous call (from any thread)."""

_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass(frozen=True)
class PoolImage:
    """An image in a pool.

    ``created`` is when the image was checkpointed, ``size`` the sum of its files,
    ``stored_bytes`` what storing it added to the pool (new chunks, lists, manifest),
    ``cmdline`` the checkpointed process's command line, and ``signer`` the key id that signed
    its manifest (None if unsigned; see ``docs/security.md``).
    """

    name: str
    id: str
    created: str
    size: int
    stored_bytes: int
    pool: str
    cmdline: tuple[str, ...] = ()
    signer: str | None = None


class Indexed(Protocol):
    """What fetching chunks needs of a catalog: the index of each pack named."""

    @property
    def indexes(self) -> Mapping[str, PackIndex]: ...


class Keep(Protocol):
    """Where :meth:`PoolReader._fetch` keeps the packs it fetched, and finds some already."""

    def get(self, pack_id: str, /) -> bytes | None: ...

    def __setitem__(self, pack_id: str, data: bytes, /) -> None: ...


class Ticker:
    """A thread-safe wrapper of a progress callback."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        if self._progress is not None and n:
            with self._lock:
                self._progress(n)


def bounded(
    fn: Callable[[_T], _R], items: Iterable[_T], *, workers: int, window: int
) -> Iterator[_R]:
    """``fn`` over ``items`` in threads, at most ``window`` in flight, results as they finish.

    The first exception cancels what has not started and is raised after the rest finish.
    """
    todo = iter(items)
    with ThreadPoolExecutor(workers, thread_name_prefix="torpor-fetch") as ex:
        running: set[Future[_R]] = set()
        try:
            for item in todo:
                running.add(ex.submit(fn, item))
                if len(running) >= window:
                    done, running = wait(running, return_when=FIRST_COMPLETED)
                    for f in done:
                        yield f.result()
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for f in done:
                    yield f.result()
        finally:
            for f in running:
                f.cancel()


def is_image_name(name: str) -> bool:
    """Whether ``name`` is an image name (a key of another form under ``images/`` was not
    written by torpor)."""
    try:
        check_name(name)
    except UsageError:
        return False
    return True


class PoolReader:
    """The state of a pool and the reading of it; :class:`~._pool.Pool` builds on it."""

    def __init__(
        self,
        name: str,
        backend: Backend,
        *,
        level: int = 3,
        timing: Timing | None = None,
        sessions: bool = True,
        cache: bool = True,
        policy: Policy | None = None,
    ) -> None:
        self.name = name
        self.backend = backend
        self.level = level
        self.timing = timing or Timing()
        self.policy = policy or Policy()
        self._sessions = sessions
        self._cache = cache
        self._check_meta()

    # -- plumbing -------------------------------------------------------------------------

    def _check_meta(self) -> None:
        try:
            data = json.loads(self.backend.get(META_KEY, limit=MAX_META))
        except KeyError:
            meta = {"format": POOL_FORMAT, "created": now_iso()}
            self.backend.put(META_KEY, json.dumps(meta).encode())
            return
        except (ValueError, RecursionError) as exc:
            raise PoolError(f"pool {self.name!r}: {META_KEY} is malformed", pool=self.name) from exc
        fmt = data.get("format", 0) if isinstance(data, dict) else 0
        if not isinstance(fmt, int) or fmt > POOL_FORMAT:
            raise PoolError(
                f"pool {self.name!r} has format {fmt!r}, newer than this torpor ({POOL_FORMAT})",
                pool=self.name,
                hint="upgrade torpor",
            )

    def _session(self, kind: str) -> Heartbeat | NoHeartbeat:
        return session(self.backend, kind, self.timing) if self._sessions else NoHeartbeat()

    # Cache file names are ids checked by is_id (never a path); the checks here only make
    # sure no caller can forget.
    def _cached(self, kind: str, key: str) -> bytes | None:
        if not self._cache or not is_id(key):
            return None
        return read_cached(kind, key)

    def _cache_put(self, kind: str, key: str, data: bytes) -> None:
        if self._cache and is_id(key):
            write_cached(kind, key, data)

    def _cache_drop(self, kind: str, key: str) -> None:
        if self._cache and is_id(key):
            drop_cached(kind, key)

    # -- indexes, manifests, chunk lists --------------------------------------------------

    def _load_indexes(
        self, *, strict: bool = False, unsaved: list[tuple[str, bytes]] | None = None
    ) -> dict[str, PackIndex]:
        """Every pack index. A damaged one is skipped, or raises :class:`PoolError` if
        ``strict`` (garbage collection must not guess). The ones fetched from the backend
        are written to the local cache, or appended to ``unsaved`` if given."""
        # A key of another form is not an index torpor wrote (nor a safe cache file name).
        ids = [i for k in self.backend.list("index/") if is_id(i := k[len("index/") :])]

        # Threads fetch every index (the cache, else the backend) and this thread decodes
        # each as it arrives, keeping a blob only when the cache is to have it: at most the
        # fetch window's blobs (of MAX_INDEX bytes each) are held at once, never every one
        # (32 hostile 256 MiB index objects were 8 GiB). The cache writes wait for the end:
        # decoding or writing while the fetches run made a 1 GiB image's 266 indexes take
        # ~0.23 s on 2 cores (the threads fight over the GIL with the backend's own), against
        # ~0.14 s with the writes after.
        def get(pack_id: str) -> bytes | None:
            try:
                return self.backend.get(index_key(pack_id), limit=MAX_INDEX)
            except KeyError:
                return None  # deleted by a collection since the listing
            except PoolObjectTooLargeError:
                if strict:
                    raise  # garbage collection must not guess (the error names the fix)
                return None  # larger than torpor writes: skipped, as a damaged one is

        def fetch(pack_id: str) -> tuple[str, bytes | None, bool]:
            blob = self._cached("index", pack_id)
            if blob is not None:
                return pack_id, blob, True
            return pack_id, get(pack_id), False

        out: dict[str, PackIndex] = {}
        new: list[tuple[str, bytes]] = []
        keep = bool(self._cache)  # a blob is kept for the cache only
        for pack_id, blob, cached in bounded(fetch, ids, workers=READERS, window=4 * READERS):
            if blob is not None and cached:
                try:
                    out[pack_id] = PackIndex.decode(pack_id, blob)
                    continue
                except PackDamagedError:
                    self._cache_drop("index", pack_id)
                blob = get(pack_id)
            if blob is None:
                continue
            try:
                out[pack_id] = PackIndex.decode(pack_id, blob)
            except PackDamagedError as exc:
                if strict:
                    raise PoolError(
                        f"pool {self.name!r}: {exc}",
                        pool=self.name,
                        hint="images using that pack cannot be restored; gc refuses to guess",
                    ) from exc
                continue
            if keep:
                new.append((pack_id, blob))
        if unsaved is not None:
            unsaved.extend(new)
        else:
            for pack_id, blob in new:
                self._cache_put("index", pack_id, blob)
        return out

    def _catalog(self, *, save_later: bool = False) -> Catalog:
        """The catalog of every pack index. With ``save_later``, the indexes fetched are
        written to the local cache only at :meth:`Catalog.save_cache` (a lazy restore does
        it once its copies run: writing 266 cache files cost ~35 ms before the resume)."""
        # The condemned set first: a pack condemned after we read the indexes is one our
        # session's existence protects (the collector waits for us).
        condemned = Condemned.load(self.backend)
        if not save_later:
            return Catalog(self._load_indexes(), condemned)
        unsaved: list[tuple[str, bytes]] = []
        indexes = self._load_indexes(unsaved=unsaved)

        def save() -> None:
            for pack_id, blob in unsaved:
                self._cache_put("index", pack_id, blob)

        return Catalog(indexes, condemned, save)

    def _record(self, name: str) -> Record:
        check_name(name)
        try:
            blob = self.backend.get(image_key(name), limit=MAX_RECORD)
        except KeyError as exc:
            raise ImageNotFoundError(
                f"no image {name!r} in pool {self.name!r}",
                image=name,
                hint=f"`torpor images --pool {self.name}` lists them",
            ) from exc
        return Record.decode(name, blob, pool=self.name)

    def _records(self) -> list[Record]:
        # A key whose name is not an image name was not written by torpor (a shared pool
        # can hold anything): it is not an image, and must not stop the listing.
        names = [
            n
            for k in self.backend.list(IMAGES_PREFIX)
            if is_image_name(n := k[len(IMAGES_PREFIX) :])
        ]

        def one(name: str) -> Record | None:
            try:
                return self._record(name)
            except ImageNotFoundError:
                return None  # deleted since the listing

        # Each record is read MAX_RECORD bytes at most, and all are kept: their total is
        # bounded too (counted as it arrives; the fetch window's records at most beyond it).
        found: list[Record] = []
        total = 0
        for rec in bounded(one, names, workers=READERS, window=4 * READERS):
            if rec is None:
                continue
            total += rec.held
            if total > MAX_RECORDS_TOTAL:
                raise PoolError(
                    f"pool {self.name!r}: its image manifests hold over {MAX_RECORDS_TOTAL} "
                    "bytes, more than torpor reads for a listing; not read",
                    pool=self.name,
                    hint="it is damaged or not torpor's: `torpor images --pool POOL` names "
                    "its images; delete the ones not yours (`torpor image delete NAME@POOL`)",
                )
            found.append(rec)
        return sorted(found, key=lambda r: r.manifest.created)

    def _load_list(self, f: FileRecord) -> list[bytes]:
        """The list object of ``f``, verified; :class:`KeyError` if missing,
        :class:`ValueError` if bad."""
        return cast(list[bytes], self._load_list_as(f, lazily=False, unsaved=None))

    def _load_list_as(
        self, f: FileRecord, *, lazily: bool, unsaved: list[tuple[str, bytes]] | None
    ) -> Sequence[bytes]:
        """:meth:`_load_list`; ``lazily``: as :class:`~._cas.Digests`; with ``unsaved``, a
        blob fetched from the backend is appended there instead of written to the cache. It
        is read :func:`~._record.list_limit` bytes at most."""
        assert f.list_id is not None and f.list_sha256 is not None
        list_id, sha256 = f.list_id, f.list_sha256
        decode = decode_list_object_lazily if lazily else decode_list_object
        blob = self._cached("lists", list_id)
        if blob is not None:
            try:
                return decode(blob, sha256)
            except ValueError:
                self._cache_drop("lists", list_id)
        blob = self.backend.get(list_key(list_id), limit=list_limit(f))
        digests = decode(blob, sha256)
        if unsaved is not None:
            unsaved.append((list_id, blob))
        else:
            self._cache_put("lists", list_id, blob)
        return digests

    def _resolve(
        self, rec: Record, memo: dict[str, list[bytes]] | None = None
    ) -> list[list[bytes]]:
        """The chunk list of every file of ``rec``."""
        found = self._resolve_as(rec, cast(dict[str, Sequence[bytes]], memo), lazily=False)
        return cast(list[list[bytes]], found)

    def _resolve_lazily(
        self, rec: Record, unsaved: list[tuple[str, bytes]]
    ) -> list[Sequence[bytes]]:
        """:meth:`_resolve`, each list object's digests cut out only when used (see
        :class:`~._cas.Digests`); the list objects fetched appended to ``unsaved`` (for the
        local cache, later) instead of written to the cache."""
        return self._resolve_as(rec, None, lazily=True, unsaved=unsaved)

    def _resolve_as(
        self,
        rec: Record,
        memo: dict[str, Sequence[bytes]] | None,
        *,
        lazily: bool,
        unsaved: list[tuple[str, bytes]] | None = None,
    ) -> list[Sequence[bytes]]:
        memo = {} if memo is None else memo
        out: list[Sequence[bytes]] = []
        for f in rec.files:
            try:
                digests: Sequence[bytes]
                if f.inline is not None:
                    digests = _cas.decode_list(f.inline)
                else:
                    assert f.list_id is not None
                    if f.list_id not in memo:
                        memo[f.list_id] = self._load_list_as(f, lazily=lazily, unsaved=unsaved)
                    base = memo[f.list_id]
                    digests = _cas.apply_patch(base, f.patch, f.count) if f.patch else base
                if len(digests) != f.count:
                    raise ValueError(f"it has {len(digests)} chunks, the file needs {f.count}")
            except KeyError as exc:
                raise self._corrupted(
                    rec.name,
                    f"the chunk list of {f.name} (list object {f.list_id}) is missing",
                    file=f.name,
                    hint=REFUSED_HINT,
                ) from exc
            except ValueError as exc:
                raise self._corrupted(
                    rec.name,
                    f"the chunk list of {f.name} is damaged ({exc})",
                    file=f.name,
                    hint=REFUSED_HINT,
                ) from exc
            out.append(digests)
        return out

    def _references(self, records: Sequence[Record]) -> tuple[set[bytes], set[str]]:
        """Every chunk and list object the manifests need (the zero page excluded)."""
        chunks: set[bytes] = set()
        lists: set[str] = set()
        memo: dict[str, list[bytes]] = {}
        for rec in records:
            lists |= rec.list_ids
            for digests in self._resolve(rec, memo):
                chunks.update(digests)
        chunks.discard(_cas.ZERO_PAGE)
        return chunks, lists

    def _corrupted(
        self, image: str, what: str, *, file: str | None = None, hint: str | None = None
    ) -> ImageCorruptedError:
        """The error for a damaged image in this pool (one wording for every check)."""
        return ImageCorruptedError(
            f"image {image!r} in pool {self.name!r} is corrupted: {what}",
            image=image,
            file=file,
            hint=hint,
        )

    def _to_image(self, rec: Record) -> PoolImage:
        return PoolImage(
            name=rec.name,
            id=rec.manifest.id,
            created=rec.manifest.created,
            size=rec.size,
            stored_bytes=rec.stored_bytes,
            pool=self.name,
            cmdline=rec.manifest.cmdline,
            signer=rec.origin.key if rec.origin is not None else None,
        )

    # -- chunks (for pulls and copies) ----------------------------------------------------

    def _fetch(
        self,
        by_pack: dict[str, set[bytes]],
        catalog: Indexed,
        sink: Callable[[bytes, bytes], None],
        bad: Callable[[bytes, str], TorporError],
        *,
        keep: Keep | None = None,
    ) -> None:
        """Fetch packs concurrently; hand each wanted chunk, verified, to ``sink`` (in a
        worker thread). ``bad(digest, what)`` builds the error for a chunk that fails. With
        ``keep``, the packs fetched are kept there, and the ones already there not fetched."""

        def one(pack_id: str) -> None:
            wanted = by_pack[pack_id]
            data = keep.get(pack_id) if keep is not None else None
            try:
                if data is None:
                    limit = pack_limit(catalog.indexes[pack_id])
                    data = self.backend.get(pack_key(pack_id), limit=limit)
                    if keep is not None:
                        keep[pack_id] = data
            except KeyError as exc:
                raise bad(next(iter(wanted)), f"is in pack {pack_id}, which is missing") from exc
            try:
                for d, chunk in iter_pack(data, catalog.indexes[pack_id], wanted):
                    if hashlib.sha256(chunk).digest() != d:
                        raise bad(d, f"in pack {pack_id} does not match its SHA-256")
                    sink(d, chunk)
            except PackDamagedError as exc:
                raise bad(exc.digests[0] if exc.digests else next(iter(wanted)), str(exc)) from exc

        for _ in bounded(one, sorted(by_pack), workers=FETCHERS, window=FETCHERS):
            pass

    def _group(
        self,
        wanted: Iterable[bytes],
        catalog: Catalog,
        bad: Callable[[bytes, str], TorporError],
    ) -> dict[str, set[bytes]]:
        wanted = list(wanted)
        found = catalog.where.locate(wanted)
        by_pack: dict[str, set[bytes]] = defaultdict(set)
        for d in wanted:
            pack_id = found.get(d)
            if pack_id is None:
                raise bad(d, "is in no pack of the pool")
            by_pack[pack_id].add(d)
        return by_pack

    def _bad_chunk(
        self, rec: Record, lists: Sequence[Sequence[bytes]]
    ) -> Callable[[bytes, str], TorporError]:
        """A builder of errors naming the image, the first file and chunk using a digest."""

        def bad(d: bytes, what: str) -> TorporError:
            for f, digests in zip(rec.files, lists, strict=True):
                with contextlib.suppress(ValueError):
                    i = list(digests).index(d)
                    return self._corrupted(
                        rec.name,
                        f"file {f.name}, chunk {i} (sha256 {d.hex()[:16]}…) {what}",
                        file=f.name,
                        hint=REFUSED_HINT,
                    )
            return self._corrupted(rec.name, f"chunk {d.hex()[:16]}… {what}")

        return bad
