"""The source's side of copy mode against a base (:mod:`._dedup`): the bases it can name,
the base the target holds (its chunk ids, checked), and each file of the dump cut into plans
against it, compared with this host's own copy of the base before anything is hashed."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .._errors import TorporError
from .._images._image import Image
from .._pools._cas import (
    DIGEST_SIZE,
    PAGE_SIZE,
    ZERO_PAGE,
    ZERO_PAGE_BYTES,
    chunk_count,
    chunk_size_for,
    decode_list,
)
from .._safe import open_regular
from ._channel import MAX_DATA, ChannelError, Conn
from ._dedup import (
    MAX_BASE_CHUNKS,
    MAX_BASES,
    OP_BASE,
    OP_LITERAL,
    OP_ZERO,
    SEGMENT_BYTES,
    BaseFile,
    Counts,
    DedupError,
    content_id,
    encode_plan,
    layout,
    total_chunks,
)
from ._wire import recv_bytes, send_bytes


@dataclass(frozen=True)
class Offered:
    """A base the source names: where it is here, and its files."""

    path: str
    files: tuple[BaseFile, ...]


def candidates(paths: Iterable[str | None]) -> dict[str, Offered]:
    """The bases the source can name, by :func:`content_id`: the images at ``paths`` (the
    record's ``restored_from``, ``checkpointed_to``; anything not an image is skipped) that
    are small enough to be used and still trusted here (:meth:`~Image.trusted`: a copy
    whose files changed since they were hashed would plan runs the target's good copy does
    not hold, fail the migration and have the target distrust its copy, every time)."""
    out: dict[str, Offered] = {}
    for p in paths:
        if not p or not os.path.isabs(p) or len(out) >= MAX_BASES:
            continue
        try:
            image = Image.open(p)
            if not image.trusted():
                continue
            manifest = image.manifest
        except (TorporError, OSError):
            continue  # gone or refused: the migration simply has no base
        files = layout(manifest.files)
        if total_chunks(files) <= MAX_BASE_CHUNKS:
            out.setdefault(content_id(manifest), Offered(p, files))
    return out


@dataclass
class SourceBase:
    """The base the target holds, as the source uses it: its files, their chunk ids, an
    index from a chunk id to its first (file, chunk), and this host's own copy of its files
    (``local``, :meth:`open_local`) if it still has them."""

    id: str
    files: tuple[BaseFile, ...]
    lists: list[list[bytes]]
    index: dict[bytes, tuple[int, int]] = field(default_factory=dict)
    by_name: dict[str, int] = field(default_factory=dict)
    local: list[int] = field(default_factory=list)  # fds, by file (none: not here)
    _ahead: tuple[int, int, bytes] = (-1, 0, b"")  # file, offset, bytes read ahead
    _mine: bytearray = field(default_factory=bytearray)  # the segment's bytes of the base

    def __post_init__(self) -> None:
        for f, ids in enumerate(self.lists):
            self.by_name[self.files[f].name] = f
            for j, d in enumerate(ids):
                if d != ZERO_PAGE:
                    self.index.setdefault(d, (f, j))

    def open_local(self, path: str) -> None:
        """Open this host's copy of the base (the image at ``path``, opened and checked as
        any image): a chunk equal to its own there is then known without hashing it (the
        target's copy has the same content: the same :func:`content_id`, verified there).
        Nothing if it is gone, refused or no longer trusted (its files changed since they
        were hashed, :func:`candidates`): the chunks are then hashed."""
        try:
            image = Image.open(path)
            if content_id(image.manifest) != self.id or not image.trusted():
                return
            with image.opened() as dir_fd:
                for f in self.files:
                    self.local.append(open_regular(dir_fd, f.name, source=path))
        except (TorporError, OSError):
            self.close()

    def close(self) -> None:
        """Close this host's copy of the base."""
        for fd in self.local:
            os.close(fd)
        self.local = []

    def fits(self, f: int, j: int, n: int) -> bool:
        """Whether base file ``f``'s chunks from ``j`` on are ``n`` bytes long, as a run of
        the target's must be (``n`` of them, the last one perhaps short)."""
        bf = self.files[f]
        return (
            n > 0
            and min(bf.size, j * bf.chunk + n) - j * bf.chunk == n
            and (n % bf.chunk == 0 or j * bf.chunk + n == bf.size)
        )

    def same(self, f: int, j: int, data: bytes | bytearray) -> bool:
        """Whether chunk ``j`` of base file ``f`` here holds ``data`` (read ahead by a
        segment: a run that goes on is compared from memory)."""
        if not self.local or j >= self.files[f].count or not self.fits(f, j, len(data)):
            return False
        offset = j * self.files[f].chunk
        a_f, a_off, ahead = self._ahead
        if a_f != f or not a_off <= offset <= a_off + len(ahead) - len(data):
            ahead = os.pread(self.local[f], SEGMENT_BYTES, offset)
            a_off = offset
            self._ahead = (f, offset, ahead)
        return ahead[offset - a_off : offset - a_off + len(data)] == data

    def read(self, f: int | None, offset: int, n: int) -> bytearray:
        """Up to ``n`` bytes of base file ``f`` here from ``offset`` (none without a copy),
        in a buffer reused from one call to the next (a fresh one per segment would cost a
        page fault per page)."""
        if f is None or not self.local:
            return bytearray()
        if len(self._mine) != n:
            self._mine = bytearray(n)
        return _read_into(self.local[f], self._mine, offset)


def read_lists(
    conn: Conn, reply: dict[str, Any], offered: dict[str, tuple[BaseFile, ...]]
) -> SourceBase | None:
    """The base the target's ``ready`` names, with its chunk ids (the ``D`` frames after it);
    None if it holds none. :class:`DedupError` if it names a base not offered or sends a list
    of another length than the base's manifest gives."""
    wanted = reply.get("base")
    if wanted is None:
        return None
    if not isinstance(wanted, str) or wanted not in offered:
        raise DedupError(f"{conn._who()} named a base image that was not offered: {wanted!r}")
    files = offered[wanted]
    expected = total_chunks(files)
    if reply.get("chunks") != expected:
        raise DedupError(
            f"{conn._who()} announced {reply.get('chunks')!r} chunk ids for its base image, "
            f"whose manifest gives {expected}"
        )
    blob = bytearray()
    left = expected * DIGEST_SIZE
    while left:
        frame = recv_bytes(conn)
        if not frame or len(frame) > left:
            raise DedupError(f"{conn._who()} sent a base chunk list longer than announced")
        blob += frame
        left -= len(frame)
    ids = decode_list(bytes(blob))
    lists, at = [], 0
    for f in files:
        lists.append(ids[at : at + f.count])
        at += f.count
    return SourceBase(wanted, files, lists)


def plan(
    seg: bytes | bytearray, name: str, first: int, base: SourceBase
) -> tuple[list[list[int]], Counts]:
    """The runs of the segment ``seg`` of file ``name`` (its chunks from ``first`` on):
    ``[op, base file, base chunk, count]`` each, and what they hold. A chunk is a base run
    if it is what this host's copy of the base holds at the same place of the file of the
    same name or where the previous chunk's run goes on (compared, not hashed: most of a
    process's memory is where it was; a whole segment at once if it is all there), or else
    if its SHA-256 is the target's there or anywhere (the index); always with the same
    length there. (Bytes, not memoryviews: their comparison is a ``memcmp``.)"""
    size = chunk_size_for(name)
    here = base.by_name.get(name)
    mine = base.read(here, first * size, len(seg))  # the same place, here
    counts = Counts()
    if here is not None and mine == seg and base.fits(here, first, len(seg)):
        counts.from_base = len(seg)
        return [[OP_BASE, here, first, chunk_count(len(seg), size)]], counts
    pages = size == PAGE_SIZE
    sha256 = hashlib.sha256
    runs: list[list[int]] = []
    last: list[int] = [0, 0, 0, 0]
    for k, off in enumerate(range(0, len(seg), size)):
        data = seg[off : off + size]
        n = len(data)
        if pages and n == PAGE_SIZE and data == ZERO_PAGE_BYTES:
            op, f, j = OP_ZERO, 0, 0
            counts.zero += n
        else:
            hit: tuple[int, int] | None = None
            if (
                here is not None
                and mine[off : off + size] == data
                and base.fits(here, first + k, n)
            ):
                hit = here, first + k
            elif last[0] == OP_BASE and base.same(last[1], last[2] + last[3], data):
                hit = last[1], last[2] + last[3]
            else:
                hit = _find(sha256(data).digest(), n, first + k, size, last, here, base)
            if hit is None:
                op, f, j = OP_LITERAL, 0, 0
                counts.sent += n
            else:
                op, (f, j) = OP_BASE, hit
                counts.from_base += n
        if last[0] == op and (op != OP_BASE or (last[1] == f and last[2] + last[3] == j)):
            last[3] += 1
        else:
            last = [op, f, j, 1]
            runs.append(last)
    return runs, counts


def _find(
    d: bytes, n: int, i: int, size: int, last: list[int], here: int | None, base: SourceBase
) -> tuple[int, int] | None:
    """Where the base holds the chunk ``d`` (``n`` bytes, chunk ``i`` of a file cut in
    ``size``): where the ``last`` run goes on, else at the same place of the file of the same
    name (``here``), else anywhere of the same chunk size and length; None if nowhere."""
    lists, files = base.lists, base.files
    if last[0] == OP_BASE:  # memory that moved, moved in runs
        f, j = last[1], last[2] + last[3]
        if j < files[f].count and lists[f][j] == d:
            return f, j
    if here is not None and i < files[here].count and lists[here][i] == d:
        return here, i
    hit = base.index.get(d)
    if hit is None or files[hit[0]].chunk != size or files[hit[0]].length(hit[1]) != n:
        return None
    return hit


def send_segment(conn: Conn, view: memoryview, runs: Sequence[Sequence[int]], size: int) -> None:
    """Send a segment's plan, then its literal runs' bytes (each run on frames of its own)."""
    send_bytes(conn, encode_plan(runs))
    at = 0
    for op, _, _, count in runs:
        end = min(len(view), at + count * size)
        if op == OP_LITERAL:
            for p in range(at, end, MAX_DATA):
                send_bytes(conn, view[p : min(end, p + MAX_DATA)])  # type: ignore[arg-type]
        at = end


def send_file(
    conn: Conn,
    fd: int,
    name: str,
    size: int,
    base: SourceBase,
    *,
    progress: Callable[[int], None] | None = None,
) -> tuple[str, Counts]:
    """Send ``size`` bytes of ``fd`` (the dump's file ``name``) against ``base``, segment by
    segment; their SHA-256 (hex) and what was sent, copied or zero. The file's SHA-256 is
    computed by a helper thread while this one cuts, hashes and sends the chunks (``hashlib``
    lets go of the GIL): inside the freeze, on the machine's other core."""
    h = hashlib.sha256()
    chunk = chunk_size_for(name)
    counts = Counts()
    buf = bytearray(min(size, SEGMENT_BYTES))
    # One segment or less: hashed here (a thread's start costs more than that, under load).
    helper = ThreadPoolExecutor(1, "torpor-dedup-hash") if size > SEGMENT_BYTES else None
    try:
        for start in range(0, size, SEGMENT_BYTES):
            want = min(SEGMENT_BYTES, size - start)
            if len(buf) != want:
                buf = bytearray(want)
            seg = _read_into(fd, buf, start)
            if len(seg) < want:
                raise ChannelError(
                    f"an image file shrank while it was sent ({want - len(seg)} bytes short)"
                )
            hashed = helper.submit(h.update, seg) if helper is not None else None
            if hashed is None:
                h.update(seg)
            try:
                runs, got = plan(seg, name, start // chunk, base)
                send_segment(conn, memoryview(seg), runs, chunk)
            finally:
                if hashed is not None:
                    hashed.result()  # before the buffer is read into again
            counts.add(got)
            if progress is not None:
                progress(want)
    finally:
        if helper is not None:
            helper.shutdown()
    return h.hexdigest(), counts


def _read_into(fd: int, buf: bytearray, offset: int) -> bytearray:
    """``buf`` filled from ``fd`` at ``offset`` (a copy of what was read, if the file ends
    first)."""
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [view[got:]], offset + got)
        if not n:
            return buf[:got]
        got += n
    return buf
