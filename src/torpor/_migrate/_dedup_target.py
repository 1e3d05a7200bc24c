"""The target's side of copy mode against a base (:mod:`._dedup`): finding the base the source
names among this host's images, its chunk ids (computed once per server, before the freeze),
and a file received as a plan of literal, zero and base runs.

A base is an image directory of this home's images directory whose manifest gives the id the
source named (:func:`._dedup.content_id`). It is opened and checked as any image torpor uses
(:class:`~torpor._images._image.Image`); one whose files are not exactly as when they were last
hashed (its verification stamp) is verified in full first, and one that fails is not used (the
migration goes on without a base). Its chunk ids are kept in a :class:`BaseCache` (the few
most recently used, while their image is there: an image never changes), and reused while
the image is still trusted.

What can still go wrong is caught at the end: every file received is hashed whole, base runs
included, and compared with the source's SHA-256. A base whose bytes changed without a trace
(bit rot under a stamp that still vouches for it, or a cached list of a file changed since)
then fails the migration cleanly; :meth:`Held.distrust` forgets its list and removes its
stamp, so that the next migration verifies it in full before using it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from .. import _paths
from .._errors import TorporError
from .._images._image import STAGING_MARK, Image
from .._images._layout import VERIFIED_NAME
from .._pools._cas import DIGEST_SIZE, chunk_size_for, digest, iter_chunks
from .._safe import open_regular
from ._channel import MAX_DATA, Conn
from ._dedup import (
    MAX_BASE_CHUNKS,
    OP_BASE,
    OP_LITERAL,
    OP_ZERO,
    SEGMENT_BYTES,
    BaseFile,
    Counts,
    DedupError,
    content_id,
    decode_plan,
    layout,
    segment_lengths,
    total_chunks,
)
from ._serve_sweep import is_in_transit
from ._wire import recv_bytes, send_bytes

MAX_SCAN = 1024  # entries of the images directory looked at for a base
MAX_CACHED = 4  # chunk lists a BaseCache keeps
MAX_CACHED_BYTES = 2 * MAX_BASE_CHUNKS * DIGEST_SIZE  # and their bytes: two of the largest
_COPY_BLOCK = 4 << 20  # bytes of a base run read at once
_DEPTH = 3  # of them in flight: read, waiting, being hashed and written
_ZEROS = bytes(_COPY_BLOCK)


@dataclass(frozen=True)
class _Cached:
    path: str
    manifest_id: str
    ids: bytes  # every chunk id, the files in name order


class BaseCache:
    """The chunk ids of the bases this server has used, by content id: the most recently
    used ones, at most :data:`MAX_CACHED` of them and :data:`MAX_CACHED_BYTES` in all (a
    peer naming other bases each time, or years of use, must not grow it without end), and
    only while their image is still where it was."""

    def __init__(self) -> None:
        self._lists: OrderedDict[str, _Cached] = OrderedDict()  # least recently used first

    def hold(self, ids: Sequence[str], log: Callable[[str], None]) -> Held | None:
        """The first base of ``ids`` (checked content ids) found here and usable, opened,
        with its chunk ids; None if there is none."""
        if not ids:
            return None
        for image in _images_with(set(ids)):
            cid = content_id(image.manifest)
            files = layout(image.manifest.files)
            if total_chunks(files) > MAX_BASE_CHUNKS:
                continue
            try:
                held = self._open(image, cid, files, log)
            except (TorporError, OSError) as exc:
                log(f"base image {image.path} not used: {getattr(exc, 'msg', exc)}")
                continue
            return held
        return None

    def _open(
        self, image: Image, cid: str, files: tuple[BaseFile, ...], log: Callable[[str], None]
    ) -> Held:
        started = time.monotonic()
        cached = self._lists.get(cid)
        if not image.trusted():
            image.verify()  # its stamp no longer vouches for it: every file hashed again
            cached = None
        elif cached is not None and (cached.path, cached.manifest_id) != (
            str(image.path),
            image.manifest.id,
        ):
            cached = None
        fds: list[int] = []
        try:
            with image.opened() as dir_fd:
                for f in files:
                    fds.append(open_regular(dir_fd, f.name, source=str(image.path)))
            if cached is None:
                ids = b"".join(_chunk_ids(fd, f) for fd, f in zip(fds, files, strict=True))
                cached = _Cached(str(image.path), image.manifest.id, ids)
                how = "computed"
            else:
                how = "cached"
            self._keep(cid, cached)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        took = round((time.monotonic() - started) * 1000)
        log(f"base image {image.path}: {total_chunks(files)} chunk ids {how} in {took} ms")
        return Held(self, cid, image, files, fds, cached.ids)

    def _keep(self, cid: str, cached: _Cached) -> None:
        """Keep ``cached`` as the most recently used list; drop the lists of images that
        are gone, then the least recently used ones over the bounds."""
        self._lists.pop(cid, None)
        for old, c in list(self._lists.items()):
            if not os.path.isdir(c.path):
                del self._lists[old]
        self._lists[cid] = cached
        size = sum(len(c.ids) for c in self._lists.values())
        while len(self._lists) > 1 and (len(self._lists) > MAX_CACHED or size > MAX_CACHED_BYTES):
            _, dropped = self._lists.popitem(last=False)
            size -= len(dropped.ids)

    def forget(self, cid: str) -> None:
        """Drop the list of base ``cid``."""
        self._lists.pop(cid, None)


def _images_with(ids: set[str]) -> list[Image]:
    """The images of this home's images directory whose content id is in ``ids``."""
    found = []
    root = _paths.images_dir()
    with os.scandir(root) as entries:
        for n, entry in enumerate(entries):
            if n >= MAX_SCAN:
                break
            if STAGING_MARK in entry.name or is_in_transit(entry.name):
                continue
            if not entry.is_dir(follow_symlinks=False):
                continue
            with contextlib.suppress(TorporError, OSError):
                image = Image.open(entry.path)
                if content_id(image.manifest) in ids:
                    found.append(image)
    return found


def _chunk_ids(fd: int, f: BaseFile) -> bytes:
    with os.fdopen(os.dup(fd), "rb") as stream:
        ids = b"".join(digest(c) for c in iter_chunks(stream, f.chunk))
    if len(ids) != f.count * DIGEST_SIZE:
        raise TorporError(f"base file {f.name} is not {f.size} bytes long any more")
    return ids


class Held:
    """A base held for one migration: its files open (the same inodes from the pre-flight to
    the last copy) and its chunk ids."""

    def __init__(
        self,
        cache: BaseCache,
        cid: str,
        image: Image,
        files: tuple[BaseFile, ...],
        fds: list[int],
        ids: bytes,
    ) -> None:
        self.cache, self.id, self.image, self.files = cache, cid, image, files
        self.fds, self.ids = fds, ids

    def close(self) -> None:
        """Close its files."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def offer(self, conn: Conn, ready: dict[str, object]) -> None:
        """Send ``ready`` naming this base, then its chunk ids as ``D`` frames."""
        conn.send({**ready, "base": self.id, "chunks": total_chunks(self.files)})
        view = memoryview(self.ids)
        step = MAX_DATA - MAX_DATA % DIGEST_SIZE
        for p in range(0, len(view), step):
            send_bytes(conn, view[p : p + step])  # type: ignore[arg-type]

    def describe(self, counts: Counts) -> str:
        """What an image received against this base held, for the server's log."""
        return (
            f" ({counts.sent} sent, {counts.from_base} copied from the base image "
            f"{self.image.path}, {counts.zero} zero)"
        )

    def suspect(self, counts: Counts) -> str:
        """An image received against this base did not match the source's hashes: most
        likely this base (the source hashed what it dumped). :meth:`distrust` it; what the
        error (sent to the peer too) says of it: its name and content id, never where it is
        here (nothing if nothing came from it)."""
        if not counts.from_base:
            return ""
        self.distrust()
        return (
            f" ({counts.from_base} bytes were copied from the base image "
            f"{self.image.name!r} (content id {self.id[:16]}) here, which may be damaged: it "
            "is verified in full before its next use)"
        )

    def distrust(self) -> None:
        """A file copied from this base did not match the source's: forget its list and
        remove its stamp (its next use verifies it in full first)."""
        self.cache.forget(self.id)
        with contextlib.suppress(TorporError, OSError), self.image.opened() as dir_fd:
            os.unlink(VERIFIED_NAME, dir_fd=dir_fd)


def agreed(named: object, held: Held | None, peer: str) -> Held | None:
    """The base an ``image`` message names (``named``; None: whole files), which must be the
    one offered (``held``); :class:`DedupError` otherwise."""
    if named is None:
        return None
    if held is None or named != held.id:
        raise DedupError(f"{peer} sent its image against a base that was not agreed")
    return held


def receive_file(
    conn: Conn, fd: int, name: str, size: int, base: Held | None
) -> tuple[str, Counts]:
    """Write file ``name`` (``size`` bytes), sent as plans and literal runs, to ``fd``,
    copying base runs from ``base``; its SHA-256 (hex) as written, and what it held.
    :class:`DedupError` for a plan that does not fit."""
    counts = Counts()
    files = base.files if base is not None else None
    with _Sink(fd, threaded=size > SEGMENT_BYTES) as sink:
        for start in range(0, size, SEGMENT_BYTES):
            lengths = segment_lengths(name, size, start)
            runs = decode_plan(recv_bytes(conn), lengths, chunk_size_for(name), files)
            at = start
            for op, f, offset, _, nbytes in runs:
                if op == OP_LITERAL:
                    _literal(conn, sink, at, nbytes)
                    counts.sent += nbytes
                elif op == OP_ZERO:
                    for p in range(0, nbytes, _COPY_BLOCK):
                        sink.put(memoryview(_ZEROS)[: min(_COPY_BLOCK, nbytes - p)], None)
                    counts.zero += nbytes
                elif op == OP_BASE and base is not None:
                    sink.copy(base.fds[f], offset, at, nbytes, base.files[f].name)
                    counts.from_base += nbytes
                at += nbytes
        digest_hex = sink.finish()
    os.ftruncate(fd, size)  # zero pages at the end are holes too
    return digest_hex, counts


def _literal(conn: Conn, sink: _Sink, at: int, nbytes: int) -> None:
    left = nbytes
    while left:
        data = recv_bytes(conn)
        if not data or len(data) > left:
            raise DedupError(f"{conn._who()} sent a literal run of another length than planned")
        sink.put(data, at + nbytes - left)
        left -= len(data)


class _Sink:
    """A file's bytes, in order: hashed and written (``pwrite``) by a helper thread when
    ``threaded`` (``hashlib`` lets go of the GIL), so that the next bytes are read from the
    base or the channel meanwhile; base runs are read into :data:`_DEPTH` buffers made once."""

    def __init__(self, fd: int, *, threaded: bool) -> None:
        self.fd = fd
        self.h = hashlib.sha256()
        self.pool = ThreadPoolExecutor(1, "torpor-dedup-write") if threaded else None
        self.pending: deque[Future[None]] = deque()
        self.bufs = [bytearray(_COPY_BLOCK) for _ in range(_DEPTH if threaded else 1)]
        self.used: list[Future[None] | None] = [None] * len(self.bufs)
        self.next = 0

    def __enter__(self) -> _Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _do(self, data: bytes | memoryview, at: int | None) -> None:
        self.h.update(data)
        if at is not None:
            _pwrite(self.fd, data, at)

    def put(self, data: bytes | memoryview, at: int | None) -> Future[None] | None:
        """Hash ``data`` next and write it at ``at`` (None: a hole, hashed only)."""
        if self.pool is None:
            self._do(data, at)
            return None
        job = self.pool.submit(self._do, data, at)
        self.pending.append(job)
        while len(self.pending) > _DEPTH:
            self.pending.popleft().result()
        return job

    def copy(self, src: int, offset: int, at: int, nbytes: int, name: str) -> None:
        """Bytes ``offset..+nbytes`` of base file ``src``, hashed and written at ``at``."""
        done = 0
        while done < nbytes:
            i = self.next
            self.next = (i + 1) % len(self.bufs)
            if (busy := self.used[i]) is not None:
                busy.result()  # the buffer is free again
            view = memoryview(self.bufs[i])[: min(_COPY_BLOCK, nbytes - done)]
            n = os.preadv(src, [view], offset + done)
            if not n:
                raise TorporError(f"base file {name} here is shorter than its manifest says")
            self.used[i] = self.put(view[:n], at + done)
            done += n

    def finish(self) -> str:
        """The SHA-256 (hex) of everything put, once written."""
        while self.pending:
            self.pending.popleft().result()
        return self.h.hexdigest()


def _pwrite(fd: int, data: bytes | memoryview, at: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n
