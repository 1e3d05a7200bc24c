"""A pool: images stored content-addressed and deduplicated in a backend.

Layout of a pool in its backend (every key under the contract of :mod:`._backend`)::

    torpor-pool.json           format marker
    images/<name>              one pool manifest per image (:mod:`._record`), written last
    lists/<id>                 chunk lists shared by manifests (keyframes)
    packs/<xx>/<id>            packs of compressed chunks (:mod:`._pack`)
    index/<id>                 one index per pack
    sessions/<id>              running pushes, pulls and copies (:mod:`._gc`)
    gc/condemned, gc/lock-*    garbage collection state (:mod:`._gc`)

A push cuts every file into chunks (:mod:`._cas`), stores the chunks the pool lacks in new
packs, then the chunk lists, then the manifest. A pull fetches the packs it needs
concurrently and writes each chunk into place as it arrives, after checking its SHA-256; the
image's files are then checked against their SHA-256 before the image is returned. A copy in
the same pool writes one new manifest; a copy to another pool moves only the chunks the
target lacks. Index and list objects never change once written, so they are cached under
``<torpor home>/cache``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, TypeVar

from .. import _paths, _safe
from .._errors import (
    AlreadyExistsError,
    ImageCorruptedError,
    ImageError,
    ImageNotFoundError,
    PoolError,
    TorporError,
    UsageError,
)
from .._images._image import Image, Staging
from .._images._manifest import FileEntry, Manifest, new_id, now_iso
from .._images._store import check_name
from . import _cas, _config
from ._archive import ArchiveReader, ArchiveWriter
from ._backend import Backend
from ._gc import Condemned, GcStats, Heartbeat, NoHeartbeat, Timing, collect, session
from ._pack import ChunkEntry, PackDamagedError, PackIndex, PackWriter, iter_pack, pack_key
from ._record import (
    IMAGES_PREFIX,
    FileRecord,
    Record,
    decode_list_object,
    encode_list_object,
    image_key,
    is_id,
    list_key,
)
from ._registry import open_backend
from ._sign import SOURCE_LABEL, Origin, Policy, local_origin

META_KEY = "torpor-pool.json"
POOL_FORMAT = 1
# Chunk lists up to this long live in the manifest; longer ones in list objects.
INLINE_MAX = 64
# A patch bigger than this fraction of a whole list is replaced by a new keyframe list.
KEYFRAME_RATIO = 0.25
_FETCHERS = 4
_READERS = 8
_OWNED_PREFIXES = ("images/", "lists/", "packs/", "index/", "sessions/", "gc/", META_KEY)
# True wherever it is raised (pull, restore NAME@POOL, copy, export, import): the image is
# refused before it is used, and only torpor's own cache or pool objects were written.
_REFUSED_HINT = "the image was refused before any use; use another image"

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


@dataclass(frozen=True)
class PoolStats:
    """What a pool holds: images, packs (stored bytes) and the chunks in them (raw bytes)."""

    images: int
    packs: int
    pack_bytes: int
    chunks: int
    chunk_bytes: int


@dataclass(frozen=True)
class _Base:
    list_id: str
    sha256: str
    digests: list[bytes]


class _Catalog:
    """Where each chunk of the pool is, as a session sees it.

    ``present`` are the chunks a writer may rely on (in packs nobody condemned); ``where``
    finds any copy, preferring uncondemned and newer packs.
    """

    def __init__(self, indexes: dict[str, PackIndex], condemned: Condemned) -> None:
        self.indexes = indexes
        self.condemned = condemned
        self.where: dict[bytes, tuple[str, ChunkEntry]] = {}
        order = sorted(indexes, key=lambda p: (p not in condemned.packs, indexes[p].created))
        for pack_id in order:
            for c in indexes[pack_id].chunks:
                self.where[c.digest] = (pack_id, c)
        self.present = {d for d, (p, _) in self.where.items() if p not in condemned.packs}
        self.present.add(_cas.ZERO_PAGE)


class _Ticker:
    """A thread-safe wrapper of a progress callback."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        if self._progress is not None and n:
            with self._lock:
                self._progress(n)


def _bounded(
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


def _is_image_name(name: str) -> bool:
    try:
        check_name(name)
    except UsageError:
        return False
    return True


def _cache_kind_dir(kind: str) -> int:
    """An fd of ``<cache>/<kind>`` (made 0700 if missing; a symlink there is refused)."""
    parent = _paths.cache_dir()
    with _safe.opened_dir(parent) as parent_fd:
        with contextlib.suppress(FileExistsError):
            os.mkdir(kind, 0o700, dir_fd=parent_fd)
        return _safe.open_dir(kind, dir_fd=parent_fd)


def _private_write(kind: str, name: str, data: bytes) -> None:
    """Write the cache file ``<cache>/<kind>/<name>`` (0600, created ``O_EXCL|O_NOFOLLOW``
    under a temporary name, then renamed) atomically; a failure only costs a later re-fetch."""
    tmp = f".{name}.{uuid.uuid4().hex[:8]}"
    try:
        dir_fd = _cache_kind_dir(kind)
    except (OSError, TorporError):
        return
    try:
        fd = _safe.create_file(dir_fd, tmp, source=f"cache {kind}")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except (OSError, TorporError):
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def _private_read(kind: str, name: str) -> bytes | None:
    """A cache file's bytes (a regular file, opened ``O_NOFOLLOW``), or None."""
    try:
        with _safe.opened_dir(_paths.cache_dir() / kind) as dir_fd:
            fd = _safe.open_regular(dir_fd, name, source=f"cache {kind}")
            with os.fdopen(fd, "rb") as fh:
                return fh.read()
    except (OSError, TorporError):
        return None


class Pool:
    """Images stored content-addressed and deduplicated in a :class:`Backend`.

    Get one with :func:`open_pool`. A pool object may be used from several threads; the
    backend is closed with :meth:`close` (or by leaving a ``with`` block).
    """

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

    # -- plumbing -------------------------------------------------------------------------

    def _check_meta(self) -> None:
        try:
            data = json.loads(self.backend.get(META_KEY))
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
        return _private_read(kind, key)

    def _cache_put(self, kind: str, key: str, data: bytes) -> None:
        if self._cache and is_id(key):
            _private_write(kind, key, data)

    def _cache_drop(self, kind: str, key: str) -> None:
        if self._cache and is_id(key):
            with contextlib.suppress(OSError):
                (_paths.cache_dir() / kind / key).unlink()

    def _load_indexes(self, *, strict: bool = False) -> dict[str, PackIndex]:
        """Every pack index. A damaged one is skipped, or raises :class:`PoolError` if
        ``strict`` (garbage collection must not guess)."""
        # A key of another form is not an index torpor wrote (nor a safe cache file name).
        ids = [i for k in self.backend.list("index/") if is_id(i := k[len("index/") :])]

        def one(pack_id: str) -> PackIndex | None:
            blob = self._cached("index", pack_id)
            if blob is not None:
                try:
                    return PackIndex.decode(pack_id, blob)
                except PackDamagedError:
                    self._cache_drop("index", pack_id)
            try:
                blob = self.backend.get(f"index/{pack_id}")
            except KeyError:
                return None  # deleted by a collection since the listing
            try:
                index = PackIndex.decode(pack_id, blob)
            except PackDamagedError as exc:
                if strict:
                    raise PoolError(
                        f"pool {self.name!r}: {exc}",
                        pool=self.name,
                        hint="images using that pack cannot be restored; gc refuses to guess",
                    ) from exc
                return None
            self._cache_put("index", pack_id, blob)
            return index

        out: dict[str, PackIndex] = {}
        for index in _bounded(one, ids, workers=_READERS, window=4 * _READERS):
            if index is not None:
                out[index.pack_id] = index
        return out

    def _catalog(self) -> _Catalog:
        # The condemned set first: a pack condemned after we read the indexes is one our
        # session's existence protects (the collector waits for us).
        condemned = Condemned.load(self.backend)
        return _Catalog(self._load_indexes(), condemned)

    def _record(self, name: str) -> Record:
        check_name(name)
        try:
            blob = self.backend.get(image_key(name))
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
            if _is_image_name(n := k[len(IMAGES_PREFIX) :])
        ]

        def one(name: str) -> Record | None:
            try:
                return self._record(name)
            except ImageNotFoundError:
                return None  # deleted since the listing

        found = _bounded(one, names, workers=_READERS, window=4 * _READERS)
        return sorted((r for r in found if r is not None), key=lambda r: r.manifest.created)

    def _load_list(self, list_id: str, sha256: str) -> list[bytes]:
        """A list object, verified; :class:`KeyError` if missing, :class:`ValueError` if bad."""
        blob = self._cached("lists", list_id)
        if blob is not None:
            try:
                return decode_list_object(blob, sha256)
            except ValueError:
                self._cache_drop("lists", list_id)
        blob = self.backend.get(list_key(list_id))
        digests = decode_list_object(blob, sha256)
        self._cache_put("lists", list_id, blob)
        return digests

    def _resolve(
        self, rec: Record, memo: dict[str, list[bytes]] | None = None
    ) -> list[list[bytes]]:
        """The chunk list of every file of ``rec``."""
        memo = {} if memo is None else memo
        out: list[list[bytes]] = []
        for f in rec.files:
            try:
                if f.inline is not None:
                    digests = _cas.decode_list(f.inline)
                else:
                    assert f.list_id is not None and f.list_sha256 is not None
                    if f.list_id not in memo:
                        memo[f.list_id] = self._load_list(f.list_id, f.list_sha256)
                    base = memo[f.list_id]
                    digests = _cas.apply_patch(base, f.patch, f.count) if f.patch else base
                if len(digests) != f.count:
                    raise ValueError(f"it has {len(digests)} chunks, the file needs {f.count}")
            except KeyError as exc:
                raise self._corrupted(
                    rec.name,
                    f"the chunk list of {f.name} (list object {f.list_id}) is missing",
                    file=f.name,
                    hint=_REFUSED_HINT,
                ) from exc
            except ValueError as exc:
                raise self._corrupted(
                    rec.name,
                    f"the chunk list of {f.name} is damaged ({exc})",
                    file=f.name,
                    hint=_REFUSED_HINT,
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

    def _fetch(
        self,
        by_pack: dict[str, set[bytes]],
        catalog: _Catalog,
        sink: Callable[[bytes, bytes], None],
        bad: Callable[[bytes, str], TorporError],
    ) -> None:
        """Fetch packs concurrently; hand each wanted chunk, verified, to ``sink`` (in a
        worker thread). ``bad(digest, what)`` builds the error for a chunk that fails."""

        def one(pack_id: str) -> None:
            wanted = by_pack[pack_id]
            try:
                data = self.backend.get(pack_key(pack_id))
            except KeyError as exc:
                raise bad(next(iter(wanted)), f"is in pack {pack_id}, which is missing") from exc
            try:
                for d, chunk in iter_pack(data, catalog.indexes[pack_id], wanted):
                    if hashlib.sha256(chunk).digest() != d:
                        raise bad(d, f"in pack {pack_id} does not match its SHA-256")
                    sink(d, chunk)
            except PackDamagedError as exc:
                raise bad(exc.digests[0] if exc.digests else next(iter(wanted)), str(exc)) from exc

        for _ in _bounded(one, sorted(by_pack), workers=_FETCHERS, window=_FETCHERS):
            pass

    def _group(
        self,
        wanted: Iterable[bytes],
        catalog: _Catalog,
        bad: Callable[[bytes, str], TorporError],
    ) -> dict[str, set[bytes]]:
        by_pack: dict[str, set[bytes]] = defaultdict(set)
        for d in wanted:
            loc = catalog.where.get(d)
            if loc is None:
                raise bad(d, "is in no pack of the pool")
            by_pack[loc[0]].add(d)
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
                        hint=_REFUSED_HINT,
                    )
            return self._corrupted(rec.name, f"chunk {d.hex()[:16]}… {what}")

        return bad

    def _seal(self, rec: Record, stored: int) -> tuple[Record, bytes]:
        """Encode ``rec`` with ``stored_bytes`` counting the manifest itself."""
        total = stored
        for _ in range(4):
            rec = replace(rec, stored_bytes=total)
            blob = rec.encode()
            if stored + len(blob) == total:
                break
            total = stored + len(blob)
        return rec, blob

    def _land(self, heartbeat: Heartbeat | NoHeartbeat, rec: Record, blob: bytes) -> None:
        """Store a manifest: the last write of every push, copy and import."""
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
                out[f.name] = _Base(
                    f.list_id, f.list_sha256, self._load_list(f.list_id, f.list_sha256)
                )
        return out

    def _commit(
        self,
        heartbeat: Heartbeat | NoHeartbeat,
        condemned: Condemned,
        manifest: Manifest,
        files: Sequence[tuple[FileEntry, int, list[bytes]]],
        stored: int,
        origin: Origin | None,
    ) -> Record:
        """Store the chunk lists, then the manifest, of an image whose chunks are stored."""
        bases = self._bases(manifest.cmdline, condemned)
        recs: list[FileRecord] = []
        for entry, chunk_size, digests in files:
            common = (entry.name, entry.size, entry.sha256, chunk_size)
            if len(digests) <= INLINE_MAX:
                recs.append(FileRecord(*common, inline=_cas.encode_list(digests)))
                continue
            base = bases.get(entry.name)
            if base is not None:
                patch = _cas.make_patch(base.digests, digests)
                if len(patch) <= KEYFRAME_RATIO * _cas.DIGEST_SIZE * len(digests):
                    recs.append(
                        FileRecord(
                            *common, list_id=base.list_id, list_sha256=base.sha256, patch=patch
                        )
                    )
                    continue
            blob, sha = encode_list_object(digests)
            list_id = uuid.uuid4().hex
            self.backend.put(list_key(list_id), blob)
            self._cache_put("lists", list_id, blob)
            stored += len(blob)
            recs.append(FileRecord(*common, list_id=list_id, list_sha256=sha))
        rec = Record(manifest.name, manifest, now_iso(), 0, tuple(recs), origin)
        rec, blob = self._seal(rec, stored)
        self._land(heartbeat, rec, blob)
        return rec

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

    def _repack(
        self, indexes: dict[str, PackIndex], pack_ids: Sequence[str], live: dict[str, set[bytes]]
    ) -> set[str]:
        """Copy the ``live`` chunks of ``pack_ids`` into new packs; the packs copied whole.

        A pack that is missing or holds a damaged live chunk is left alone.
        """
        writer = PackWriter(self.backend, level=self.level)
        lock = threading.Lock()

        def one(pack_id: str) -> str | None:
            try:
                data = self.backend.get(pack_key(pack_id))
                chunks = list(iter_pack(data, indexes[pack_id], live[pack_id]))
            except (KeyError, PackDamagedError):
                return None
            if any(hashlib.sha256(c).digest() != d for d, c in chunks):
                return None
            with lock:
                for d, c in chunks:
                    writer.add(d, c)
            return pack_id

        try:
            done = {p for p in _bounded(one, pack_ids, workers=_FETCHERS, window=_FETCHERS) if p}
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        return done

    # -- images ---------------------------------------------------------------------------

    def push(self, image: Image, name: str, *, progress: Progress | None = None) -> PoolImage:
        """Store a local image as ``name``; only chunks the pool lacks are uploaded.

        The local files are checked against their manifest on the way (a file changed since
        the checkpoint is refused with :class:`ImageCorruptedError`).
        """
        self._check_free(name)
        local, origin = local_origin(image)
        self.policy.check(name, self.name, origin)
        tick = _Ticker(progress)
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
                writer.finish()
            except BaseException:
                writer.abort()
                raise
            labels = {**local.labels, SOURCE_LABEL: local.id}
            manifest = local.evolve(name=name, id=new_id(), labels=labels)
            rec = self._commit(
                heartbeat, catalog.condemned, manifest, files, writer.stored_bytes, origin
            )
        return self._to_image(rec)

    def _chunk_file(
        self,
        image: Image,
        dir_fd: int,
        entry: FileEntry,
        catalog: _Catalog,
        writer: PackWriter,
        tick: _Ticker,
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

    def pull(self, name: str, *, progress: Progress | None = None) -> Image:
        """Materialise image ``name`` under the local cache and return it, fully verified.

        Every chunk is checked against its SHA-256 as it arrives and every file against its
        SHA-256 before the image is returned; a bad or missing chunk raises
        :class:`ImageCorruptedError` naming the image, the file and the chunk. A cached copy
        of the same image (same id) is reused after it verifies. An image the pool's
        signature policy refuses raises :class:`~torpor.SignatureError` before anything is
        fetched (or a cached copy used).
        """
        tick = _Ticker(progress)
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
            if image.manifest.id == rec.manifest.id:
                image.verify()
                return image
        except ImageError:
            pass
        stale = dest.with_name(f".{dest.name}.stale-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(OSError):
            dest.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        return None

    def _materialise(self, rec: Record, dest: Path, tick: _Ticker) -> Image:
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
                            hint=_REFUSED_HINT,
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
                    _Ticker(progress)(rec.size)
                    return self._to_image(new)
        return self._transfer(rec, target, dst, _Ticker(progress))

    def _transfer(self, rec: Record, target: Pool, dst: str, tick: _Ticker) -> PoolImage:
        """Copy ``rec`` into ``target`` as ``dst``, moving the chunks ``target`` lacks."""
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
                writer.finish()
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
                    self._export(name, fh, progress)
            except BaseException:
                with contextlib.suppress(OSError):
                    path.unlink()
                raise
        else:
            self._export(name, file, progress)

    def _export(self, name: str, fh: BinaryIO, progress: Progress | None) -> None:
        self._record(name)
        writer = ArchiveWriter(fh)
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
                if _is_image_name(k[len(IMAGES_PREFIX) :])
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
