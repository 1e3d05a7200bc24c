"""The local part of a pool image, for ``torpor restore NAME@POOL --lazy``.

What is local, and why
    In lazy mode ``criu restore`` itself reads every *non-lazy* present pagemap entry from
    ``pages-N.img`` in its image directory (``restore_priv_vma_content``), and the lazy-pages
    daemon asks the page server only for the lazy entries (private anonymous memory except the
    stack). So :func:`materialise` fetches, from the pool record (signature policy applied
    first, as a pull does), every file but the pages files, then, from the pagemaps among them,
    writes each pages file as a *sparse* local file of its full size holding only its non-lazy
    present ranges at their offsets; the lazy ranges stay holes. A pages file that no task
    pagemap names, or that another pagemap (``pagemap-shmem-*``) names, is fetched whole.
    Everything is written in a private directory ``<cache>/lazy-pool/<pid>-<random>/image/``
    (0700, files created ``O_EXCL|O_NOFOLLOW``, 0600; beside ``image/``, the claims of the
    processes using it, see ``_sweep``). The lazy pages then come from the pool on demand
    through torpor's page server (:func:`PoolLazyImage.page_source`).

Verification of a lazy pool restore
    The manifest's whole-file SHA-256 of a pages file cannot be checked on a sparse file.
    Instead: the chunk lists are the record's (after the pool's signature policy), every chunk
    written locally is checked against its SHA-256 as it arrives, every non-pages file is also
    checked whole against its SHA-256 once written, and every lazy byte the page server sends
    comes from a chunk verified the same way before a byte of it is sent (``PoolSource``). The
    page source re-reads the record in the keeper and refuses it unless it is exactly the one
    materialised. That is what "verified" means for such a restore.

    :class:`PoolLazyImage` overrides :meth:`~PoolLazyImage.trusted` and
    :meth:`~PoolLazyImage.verify` accordingly (files unchanged since written; ``full``
    re-hashes the non-pages files whole and each locally written chunk), so the keeper's usual
    verdict works unchanged. Nothing here writes a stamp or a manifest into the directory: it
    never passes as a whole image to ``Image.open`` (no manifest), and no other image's
    verification is touched. The directory goes when the restore's lazy copies end
    (:meth:`PoolLazyImage.discard`).

Warm set
    Stored in the pool as ``warm/<image name>`` (JSON ``{"image": <manifest id>, "ranges":
    [...]}``) when a copy becomes resident, read at the next :func:`materialise` as hostile:
    at most 4 MiB, exact shape, the manifest id must be this record's, every range page-aligned
    and inside a pages file of the record (``_warm.check_manifest``); anything wrong is
    ignored. Its chunks are fetched (each verified) into the local part with the non-lazy
    ones, and the copies restore those pages before they resume, from a warm image
    (``_eager``), instead of faulting them in through the page server after.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from pathlib import Path

from .. import _safe
from .._errors import ImageCorruptedError, TorporError
from .._images._image import Image
from .._pools import _cas
from .._pools._located import located
from .._pools._pool import Pool
from .._pools._reader import REFUSED_HINT
from .._pools._record import Record
from . import _poolfetch, _sweep, _trace, _warm
from ._pagemap import MAX_PAGEMAP, Pagemap, parse_pagemap
from ._source import (
    LazyPageError,
    PageSource,
    Prepared,
    Range,
    _is_pages,
    chunk_span,
    pool_source,
)
from ._state import LAZY_POOL_DIR as LAZY_POOL_DIR
from ._state import lazy_pool_dir

_TASK_PAGEMAP = re.compile(r"pagemap-([1-9][0-9]{0,9})\.img")
_ANY_PAGEMAP = re.compile(r"pagemap-.*\.img")
_WARM_PREFIX = "warm/"
_MAX_WARM = 4 << 20

_Ident = tuple[int, int, int, int, int]


def _identity(st: os.stat_result) -> _Ident:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class PoolLazyImage(Image):
    """The local part of image ``record.name`` of pool ``pool_name`` (see the module
    docstring): an :class:`Image` whose pages files are sparse."""

    def __init__(
        self,
        path: Path,
        record: Record,
        *,
        pool_name: str,
        dir_id: tuple[int, int],
        idents: dict[str, _Ident],
        written: dict[str, list[tuple[int, int, bytes]]],
        warm: list[Range],
        prepared: Prepared | None = None,
    ) -> None:
        super().__init__(path, record.manifest, signer=None, dir_id=dir_id)
        self.record = record
        # The record's chunk lists and the pool's catalog as read here: the keeper's page
        # source uses them while the record is unchanged, instead of decoding every pack
        # index again (it inherits them: it is this process, or forked from it).
        self._prepared = prepared
        self.pool_name = pool_name
        #: The pool's warm set for this record (checked), prefetched first.
        self.warm = warm
        self._idents = idents
        # Per pages file: (offset, length, sha256) of each chunk written locally.
        self._written = written
        # The keeper's pool, being opened (by the process that asked first: see holds).
        self._opening: tuple[int, Future[Pool]] | None = None

    @property
    def local_bytes(self) -> int:
        """Bytes the local part occupies on disk (allocated blocks)."""
        total = 0
        with self.opened() as fd:
            for name in self._idents:
                total += os.stat(name, dir_fd=fd, follow_symlinks=False).st_blocks * 512
        return total

    # -- the verdict (see the module docstring) -------------------------------------------

    def trusted(self) -> bool:
        """Whether every file is the one written and checked by :func:`materialise`."""
        with self.opened() as fd:
            stats = self._check_layout(fd)
        return {n: _identity(st) for n, st in stats.items()} == self._idents

    def verify(self, *, full: bool = False) -> None:
        """The layout and files unchanged since written; with ``full``, every non-pages file
        re-hashed whole and every locally written chunk of a pages file re-hashed against the
        record (the lazy chunks are verified as they are served)."""
        if not full:
            if not self.trusted():
                raise self._corrupt_any("changed since it was fetched from the pool")
            return
        with self.opened() as fd:
            self._check_layout(fd)
            for entry in self.manifest.files:
                file_fd = _safe.open_regular(fd, entry.name, source=str(self.path))
                try:
                    if entry.name in self._written:
                        for offset, length, digest in self._written[entry.name]:
                            data = os.pread(file_fd, length, offset)
                            if hashlib.sha256(data).digest() != digest:
                                raise self._corrupt(
                                    entry.name, f"chunk at {offset} does not match its SHA-256"
                                )
                    elif _sha256_fd(file_fd) != entry.sha256:
                        raise self._corrupt(entry.name, "does not match its SHA-256")
                finally:
                    os.close(file_fd)
        if not self.trusted():
            raise self._corrupt_any("changed while it was being verified")

    def _corrupt_any(self, what: str) -> ImageCorruptedError:
        return ImageCorruptedError(
            f"lazy restore of {self.name!r} from pool {self.pool_name!r}: its local part "
            f"{self.path} {what}",
            image=self.path,
            hint="restore it again",
        )

    def holds(self, ranges: Iterable[Range]) -> bool:
        """Whether every page of ``ranges`` is in the local part: written (verified) or a
        zero chunk left as a hole. What a warm image restores eagerly must be (a hole of a
        lazy page would be restored as zeros).

        The keeper asks it first, as its copy starts: its pool (for :meth:`page_source`, a
        RADOS connection is ~15-20 ms) is opened in the background from then on."""
        self._open_soon()
        assert self._prepared is not None
        lists = dict(zip((f.name for f in self.record.files), self._prepared.lists, strict=True))
        sizes = {f.name: f.chunk_size for f in self.record.files}
        local = {
            name: {offset for offset, _, _ in chunks} for name, chunks in self._written.items()
        }
        for file, offset, length in ranges:
            cs = sizes[file]
            for i in chunk_span(cs, offset, length):
                if i * cs not in local.get(file, ()) and lists[file][i] != _cas.ZERO_PAGE:
                    return False
        return True

    # -- the keeper's side ------------------------------------------------------------------

    def page_source(self, image: Image) -> PageSource:
        """A page source over this record, for one copy's page server: opens the pool in the
        calling process (the keeper: a pool opened before its fork is not used in it) and
        refuses a record that is no longer exactly the materialised one. The chunk lists and
        catalog read by :func:`materialise` are reused (``_source.Prepared``): decoding every
        pack index again cost the keeper ~0.9 s of a 1 GiB image's time-to-resume."""
        _trace.mark("source")
        pool = self._opened()
        _trace.mark("pool-open")
        try:
            src = pool_source(pool, self.record.name, prepared=self._prepared)
            _trace.mark("pool-source")
        except BaseException:
            pool.close()
            raise
        if src.record != self.record:
            src.close()
            pool.close()
            raise LazyPageError(
                f"image {self.record.name!r} in pool {self.pool_name!r} changed since its "
                "local part was fetched; no page of it is served",
                image=self.record.name,
                hint="restore it again",
            )
        return _Owning(src, pool)

    def _open_soon(self) -> None:
        """Start opening the pool in this process, in a thread (once per process)."""
        if self._opening is not None and self._opening[0] == os.getpid():
            return
        fut: Future[Pool] = Future()

        def run() -> None:
            from .._pools import open_pool

            try:
                fut.set_result(open_pool(self.pool_name))
            except BaseException as exc:  # raised where it is used
                fut.set_exception(exc)

        self._opening = (os.getpid(), fut)
        threading.Thread(target=run, name="torpor-pool-open", daemon=True).start()

    def _opened(self) -> Pool:
        """The pool opened by :meth:`_open_soon` in this process, else opened now."""
        opening, self._opening = self._opening, None
        if opening is not None and opening[0] == os.getpid():
            return opening[1].result()
        from .._pools import open_pool

        return open_pool(self.pool_name)

    def restoring(self) -> None:
        """The copy's daemon starts and CRIU restores its tree (other processes): build the
        catalog's map of every chunk meanwhile, in the background (~55 ms for 1 GiB), not at
        the first fault after the resume."""
        if self._prepared is not None and self._prepared.catalog is not None:
            self._prepared.catalog.where.build_soon()

    def save_warm(self, ranges: Sequence[Range]) -> None:
        """Store ``ranges`` (clipped) as the pool's warm set of this image."""
        if not ranges:
            return
        from .._pools import open_pool

        # Coalesced as a local warm set is: the page server records one range per page
        # asked for (~5,000 for 20 MiB), each checked and spanned on every later restore.
        merged = _warm.coalesce(_warm.clip(ranges))
        data = {"image": self.manifest.id, "ranges": [list(r) for r in merged]}
        with open_pool(self.pool_name) as pool:
            pool.backend.put(warm_key(self.record.name), json.dumps(data).encode())

    def discard(self) -> None:
        """Remove the local part (its memory pages are secrets too), with its claims; write
        the pack indexes fetched for it to the local cache (put off until now)."""
        shutil.rmtree(self.path.parent, ignore_errors=True)
        opening, self._opening = self._opening, None
        if opening is not None and opening[0] == os.getpid():  # opened, never used
            with contextlib.suppress(BaseException):
                opening[1].result().close()
        if self._prepared is not None:
            self._prepared.save_cache()


class _Owning:
    """A page source that closes its pool with it."""

    def __init__(self, source: PageSource, pool: Pool) -> None:
        self._source = source
        self._pool = pool

    def read(self, file: str, offset: int, length: int) -> bytes:
        return self._source.read(file, offset, length)

    def prefetch(self, ranges: Iterable[Range]) -> None:
        self._source.prefetch(ranges)

    def close(self) -> None:
        try:
            self._source.close()
        finally:
            self._pool.close()


def warm_key(name: str) -> str:
    """The pool key of image ``name``'s warm set."""
    return _WARM_PREFIX + name


def _sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    pos = 0
    while block := os.pread(fd, 4 << 20, pos):
        h.update(block)
        pos += len(block)
    return h.hexdigest()


def materialise(pool: Pool, name: str) -> PoolLazyImage:
    """The local part of image ``name`` of ``pool`` (see the module docstring); refused like a
    pull (:class:`~torpor.SignatureError` before anything is fetched,
    :class:`ImageCorruptedError` naming the image, file and chunk)."""
    _trace.mark("materialise")
    with pool._session("lazy"):
        rec = pool._record(name)
        pool.policy.check(rec.name, pool.name, rec.origin)
        found = located(pool, rec)
        # The warm set, and the packs of the small files and warm chunks, fetched meanwhile.
        early = _poolfetch.Early(pool, rec, found, _read_warm)
        try:
            # Its list objects' cache files are written at ``discard`` too (8 MiB for 1 GiB).
            unsaved: list[tuple[str, bytes]] = []
            lists = pool._resolve_lazily(rec, unsaved)
            _trace.mark("lists")
            finder = _poolfetch.Finder(pool, rec, lists, found)

            def save_lists() -> None:
                for list_id, blob in unsaved:
                    pool._cache_put("lists", list_id, blob)

            finder.later = save_lists
            finder.early = early
            _trace.mark("catalog")
            # The image in ``image/``; beside it, who uses it (``_sweep``: this process, then
            # the keeper and the daemons), outside the image, which holds only its files.
            top = lazy_pool_dir() / f"{os.getpid()}-{secrets.token_hex(8)}"
            os.mkdir(top, 0o700)
            try:
                _sweep.claim(top)
                path = top / "image"
                os.mkdir(path, 0o700)
                return _fill(pool, rec, lists, finder, early, path)
            except BaseException:
                shutil.rmtree(top, ignore_errors=True)
                raise
        finally:
            early.close()


def _fill(
    pool: Pool,
    rec: Record,
    lists: list[Sequence[bytes]],
    finder: _poolfetch.Finder,
    early: _poolfetch.Early,
    path: Path,
) -> PoolLazyImage:
    files = {f.name: (f, ds) for f, ds in zip(rec.files, lists, strict=True)}
    fds: dict[str, int] = {}
    dir_fd = _safe.open_dir(path)
    try:
        for f in rec.files:
            # Names were checked plain when the record was decoded; create_file checks again:
            # O_EXCL|O_NOFOLLOW, 0600, in our own fresh 0700 directory.
            fds[f.name] = _safe.create_file(dir_fd, f.name, source=f"image {rec.name!r}")
            os.ftruncate(fds[f.name], f.size)  # what is not written stays a hole
        small = [f for f in rec.files if not _is_pages(f.name)]
        stash = early.stash
        written = _poolfetch.write(
            pool, finder, stash, fds, files, {f.name: range(f.count) for f in small}
        )
        _trace.mark("small-files")
        readable = {f.name: _safe.open_regular(dir_fd, f.name, source=str(path)) for f in small}
        try:
            hashes = {name: _sha256_fd(fd) for name, fd in readable.items()}
            wanted = _local_chunks(rec, readable)
        finally:
            for fd in readable.values():
                os.close(fd)
        for f in small:
            if hashes[f.name] != f.sha256:
                raise pool._corrupted(
                    rec.name,
                    f"file {f.name} does not match its SHA-256 after assembly",
                    file=f.name,
                    hint=REFUSED_HINT,
                )
        # The non-lazy pages CRIU reads itself and the warm set's (a warm image, ``_eager``,
        # restores them before the resume; their packs were fetched early).
        warm = early.warm()
        more = _poolfetch.write(pool, finder, stash, fds, files, _with_warm(rec, wanted, warm))
        written.update(more)
        _trace.mark("local-pages")
        idents = {name: _identity(os.fstat(fd)) for name, fd in fds.items()}
    finally:
        for fd in fds.values():
            os.close(fd)
        os.close(dir_fd)
    st = os.stat(path, follow_symlinks=False)
    image = PoolLazyImage(
        path,
        rec,
        pool_name=pool.name,
        dir_id=(st.st_dev, st.st_ino),
        idents=idents,
        written=written,
        warm=warm,
        prepared=finder.prepared(rec, lists, stash),
    )
    image.check()
    _trace.mark("materialised")
    return image


def _with_warm(
    rec: Record, wanted: dict[str, Iterable[int]], warm: list[Range]
) -> dict[str, Iterable[int]]:
    """``wanted`` and the chunks of the (checked) warm ranges."""
    if not warm:
        return wanted
    sizes = {f.name: f.chunk_size for f in rec.files}
    extra: dict[str, set[int]] = defaultdict(set)
    for file, offset, length in warm:
        cs = sizes[file]
        extra[file].update(chunk_span(cs, offset, length))
    return {
        name: sorted(set(indices) | extra[name]) if name in extra else indices
        for name, indices in wanted.items()
    }


def _local_chunks(rec: Record, fds: dict[str, int]) -> dict[str, Iterable[int]]:
    """The chunk indices of each pages file that ``criu restore`` reads itself: those of the
    non-lazy present ranges of the task pagemaps naming it; every chunk of a pages file that
    no task pagemap, or some other pagemap, names (or of all, if such a pagemap does not
    decode)."""
    sizes = {f.name: f.size for f in rec.files}
    ranges: dict[str, list[tuple[int, int]]] = defaultdict(list)
    whole: set[str] = set()
    named: set[str] = set()
    for f in rec.files:
        if not _ANY_PAGEMAP.fullmatch(f.name):
            continue
        if f.size > MAX_PAGEMAP:
            raise ImageCorruptedError(
                f"image {rec.name!r}: file {f.name} has {f.size} bytes, more than {MAX_PAGEMAP}",
                image=rec.name,
                file=f.name,
                hint=REFUSED_HINT,
            )
        data = os.pread(fds[f.name], f.size, 0)
        task = _TASK_PAGEMAP.fullmatch(f.name)
        pm: Pagemap | None
        try:
            pm = parse_pagemap(data, pid=int(task.group(1)) if task else 0, image=rec.name)
        except ImageCorruptedError:
            if task:
                raise
            pm = None
        if pm is None:  # not one we read: CRIU reads what it reads from whole files
            whole.update(n for n in sizes if _is_pages(n))
            continue
        if pm.pages_file not in sizes:
            raise ImageCorruptedError(
                f"image {rec.name!r}: {f.name} names {pm.pages_file}, which it has not",
                image=rec.name,
                file=f.name,
                hint=REFUSED_HINT,
            )
        if pm.data_bytes > sizes[pm.pages_file]:
            raise ImageCorruptedError(
                f"image {rec.name!r}: {f.name} claims {pm.data_bytes} bytes of pages, "
                f"{pm.pages_file} has {sizes[pm.pages_file]}",
                image=rec.name,
                file=f.name,
                hint=REFUSED_HINT,
            )
        if not task:
            whole.add(pm.pages_file)
            continue
        named.add(pm.pages_file)
        ranges[pm.pages_file].extend(pm.ranges(lazy=False))
    out: dict[str, Iterable[int]] = {}
    for f in rec.files:
        if not _is_pages(f.name):
            continue
        if f.name in whole or f.name not in named:
            out[f.name] = range(f.count)
            continue
        cs = f.chunk_size
        indices: set[int] = set()
        for offset, length in ranges[f.name]:
            indices.update(chunk_span(cs, offset, length))
        out[f.name] = sorted(indices)
    return out


def _read_warm(pool: Pool, rec: Record) -> list[Range]:
    """The pool's warm set of ``rec``, checked (hostile: see the module docstring)."""
    try:
        # A hint: one unread (missing, over its bound, or not to be had) is no warm set.
        raw = pool.backend.get(warm_key(rec.name), limit=_MAX_WARM)
    except (KeyError, OSError, TorporError):
        return []
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json recurses
        return []
    return _warm.check_manifest(rec.manifest, data)
