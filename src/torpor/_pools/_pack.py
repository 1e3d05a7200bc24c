"""Packs: many compressed chunks in one backend object, and the index object that finds them.

Storing every 4 KiB chunk as its own object would mean ~50 000 objects per 200 MB image, which
RADOS and S3 handle badly (per-object overhead, per-request latency). Chunks are therefore
grouped, restic/git style, into *packs* of a few MiB (:data:`PACK_TARGET`).

Pack object (key ``packs/<id[:2]>/<id>``, ``id`` a random 128-bit hex)::

    b"TORPAK01" frame frame frame ...

A frame holds up to :data:`FRAME_TARGET` bytes of consecutive chunks, compressed together in
one zstd frame (4 KiB pages compress far better together than alone), or stored raw when zstd
does not shrink them. Pack ids are random, never content hashes: a pack re-uploaded with the
same bytes as a pack that garbage collection has condemned must not get the condemned key.

Index object (key ``index/<id>``), zstd-compressed::

    header   "<8sdQII"   magic b"TORIDX01", created (unix time), pack size, #frames, #chunks
    frames   "<IIIB"     offset in pack, stored length, raw length, codec (0 raw, 1 zstd)
    chunks   "<32sIII"   SHA-256, frame number, offset in the raw frame, length
    trailer  32 bytes    SHA-256 of everything above

The index is written after its pack, and an image manifest only after all its packs and
indexes, so a crash leaves at worst a pack without an index or packs no manifest references;
garbage collection removes both.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import zstandard

from ._backend import Backend
from ._cas import bounded_decompress

PACK_MAGIC = b"TORPAK01"
INDEX_MAGIC = b"TORIDX01"
FRAME_TARGET = 128 << 10
# Packs stay at or under 4 MiB (unless one frame alone is bigger): one RADOS object (the
# ceph driver stripes above 4 MiB) and one S3 PUT each.
PACK_TARGET = 4 << 20
CODEC_RAW = 0
CODEC_ZSTD = 1
# Bounds on what an index from outside may make us allocate: a real frame is ~128 KiB (one
# chunk of up to 1 MiB at most), a real index ~50 KiB.
MAX_FRAME = 64 << 20
# The packer closes a pack at this many chunks (a pack of 4 MiB holds ~1000-2000 pages; this
# is 1 GiB of pages compressed 256:1), so an index torpor writes has at most this many chunk
# entries and as many frames (a frame holds one chunk at least).
MAX_PACK_CHUNKS = 1 << 18
_HEADER = struct.Struct("<8sdQII")
_FRAME = struct.Struct("<IIIB")
_CHUNK = struct.Struct("<32sIII")
# The largest index torpor writes, decoded: header 32 + 2^18 * (frame 13 + chunk 44) +
# trailer 32 = 14,942,272 bytes (~14.3 MiB); stored (zstd, never larger than its
# ZSTD_compressBound: n + n/256 + a frame header's room) at most MAX_INDEX = 15,000,704
# bytes (~14.3 MiB). An index object larger is not torpor's, and is not read.
MAX_INDEX_RAW = _HEADER.size + MAX_PACK_CHUNKS * (_FRAME.size + _CHUNK.size) + 32
MAX_INDEX = MAX_INDEX_RAW + (MAX_INDEX_RAW >> 8) + 64
# The largest pack object read back (a bound on what a pool may make us allocate): the
# packer's packs stay under PACK_TARGET, or are one frame of at most FRAME_TARGET plus one
# 1 MiB chunk; four times the target leaves room for a later torpor's larger target. A pack
# whose index is at hand is read with its index's size as the limit (:func:`pack_limit`).
MAX_PACK = 4 * PACK_TARGET

_DIGEST = struct.Struct("<32s12x")  # the digest of one chunk entry


class PackDamagedError(Exception):
    """A pack or index object does not decode; ``digests`` are the chunks it takes down."""

    def __init__(self, msg: str, digests: Collection[bytes] = ()) -> None:
        super().__init__(msg)
        self.digests = tuple(digests)


def pack_key(pack_id: str) -> str:
    """The backend key of a pack."""
    return f"packs/{pack_id[:2]}/{pack_id}"


def index_key(pack_id: str) -> str:
    """The backend key of a pack's index."""
    return f"index/{pack_id}"


def pack_limit(index: PackIndex | None) -> int:
    """The most bytes to read of the pack of ``index`` (its size as the packer wrote it;
    :data:`MAX_PACK` when the index is not at hand, or says more)."""
    return MAX_PACK if index is None else min(index.size, MAX_PACK)


@dataclass(frozen=True)
class Frame:
    """Where a frame sits in its pack and how to decode it."""

    offset: int
    stored: int
    raw: int
    codec: int


@dataclass(frozen=True)
class ChunkEntry:
    """One chunk of a pack: its id, frame, and place inside the decoded frame."""

    digest: bytes
    frame: int
    offset: int
    length: int


class PackIndex:
    """The decoded index of one pack.

    Its chunk entries stay the index's own table (``"<32sIII"`` records back to back) until
    asked for: the catalog of a 1 GiB image spans 262,144 chunks, and one Python object each
    cost ~0.5 s to decode before the first page of a lazy restore could be served.
    :meth:`digests` and :meth:`entry` read the table directly; :attr:`chunks` builds (once)
    the objects for callers that walk them all. Immutable, like the object it decodes.
    """

    __slots__ = (
        "_by_frame",
        "_chunks",
        "_digests",
        "_positions",
        "_table",
        "created",
        "frames",
        "pack_id",
        "size"
    )  # fmt: skip

    def __init__(
        self,
        pack_id: str,
        created: float,
        size: int,
        frames: tuple[Frame, ...],
        chunks: tuple[ChunkEntry, ...] | None = None,
        *,
        table: bytes | None = None,
    ) -> None:
        if (chunks is None) == (table is None):
            raise TypeError("PackIndex takes its chunks or their table, exactly one")
        if table is not None and len(table) % _CHUNK.size:
            raise ValueError(f"chunk table of {len(table)} bytes is not whole entries")
        self.pack_id = pack_id
        self.created = created
        self.size = size
        self.frames = frames
        self._table = table
        self._chunks = chunks
        self._by_frame: dict[int, tuple[ChunkEntry, ...]] | None = None
        self._digests: list[bytes] | None = None
        self._positions: dict[bytes, int] | None = None

    @property
    def table(self) -> bytes:
        """The chunk entries as stored in the index object."""
        if self._table is None:
            assert self._chunks is not None
            self._table = b"".join(
                _CHUNK.pack(c.digest, c.frame, c.offset, c.length) for c in self._chunks
            )
        return self._table

    @property
    def count(self) -> int:
        """How many chunks the pack holds."""
        if self._chunks is not None:
            return len(self._chunks)
        return len(self.table) // _CHUNK.size

    @property
    def chunks(self) -> tuple[ChunkEntry, ...]:
        """Every chunk entry, in index order (built on first use)."""
        if self._chunks is None:
            self._chunks = tuple(ChunkEntry(*t) for t in _CHUNK.iter_unpack(self.table))
        return self._chunks

    def digests(self) -> list[bytes]:
        """The chunk ids, in index order (no entry objects made; kept: do not modify)."""
        if self._digests is None:
            if self._chunks is not None:
                self._digests = [c.digest for c in self._chunks]
            else:
                self._digests = [d for (d,) in _DIGEST.iter_unpack(self.table)]
        return self._digests

    def position(self, digest: bytes) -> int | None:
        """The index-order number of ``digest``'s entry (the last, should an index list it
        twice), or None if the pack does not hold it (the map is made on first use)."""
        positions = self._positions
        if positions is None:
            positions = self._positions = {d: i for i, d in enumerate(self.digests())}
        return positions.get(digest)

    def entry(self, i: int) -> ChunkEntry:
        """Entry ``i`` (index order)."""
        if self._chunks is not None:
            return self._chunks[i]
        return ChunkEntry(*_CHUNK.unpack_from(self.table, i * _CHUNK.size))

    def frame_chunks(self, frame: int) -> tuple[ChunkEntry, ...]:
        """The entries of frame ``frame`` (grouped once per index, on first use)."""
        by_frame = self._by_frame
        if by_frame is None:
            groups: dict[int, list[ChunkEntry]] = defaultdict(list)
            for c in self.chunks:
                groups[c.frame].append(c)
            by_frame = self._by_frame = {f: tuple(cs) for f, cs in groups.items()}
        return by_frame.get(frame, ())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PackIndex):
            return NotImplemented
        return (self.pack_id, self.created, self.size, self.frames, self.table) == (
            other.pack_id,
            other.created,
            other.size,
            other.frames,
            other.table,
        )

    def __hash__(self) -> int:
        return hash((self.pack_id, self.created, self.size))

    def __repr__(self) -> str:
        return f"PackIndex({self.pack_id!r}, {self.count} chunks, {len(self.frames)} frames)"

    def encode(self) -> bytes:
        """The index object's bytes."""
        head = _HEADER.pack(INDEX_MAGIC, self.created, self.size, len(self.frames), self.count)
        parts = [head] + [_FRAME.pack(f.offset, f.stored, f.raw, f.codec) for f in self.frames]
        body = b"".join(parts) + self.table
        return zstandard.ZstdCompressor(level=3).compress(body + hashlib.sha256(body).digest())

    @classmethod
    def decode(cls, pack_id: str, blob: bytes) -> PackIndex:
        """Parse an index object; :class:`PackDamagedError` if it is damaged."""
        try:
            data = bounded_decompress(blob, MAX_INDEX_RAW)
        except ValueError as exc:
            raise PackDamagedError(f"index of pack {pack_id} does not decompress ({exc})") from exc
        body, check = data[:-32], data[-32:]
        if len(data) < _HEADER.size + 32 or hashlib.sha256(body).digest() != check:
            raise PackDamagedError(f"index of pack {pack_id} fails its checksum")
        magic, created, size, nframes, nchunks = _HEADER.unpack_from(body, 0)
        if magic != INDEX_MAGIC:
            raise PackDamagedError(f"index of pack {pack_id} has a bad magic number")
        if len(body) != _HEADER.size + nframes * _FRAME.size + nchunks * _CHUNK.size:
            raise PackDamagedError(f"index of pack {pack_id} has a bad length")
        pos = _HEADER.size
        end = pos + nframes * _FRAME.size
        frames = tuple(Frame(*t) for t in _FRAME.iter_unpack(body[pos:end]))
        if any(f.raw > MAX_FRAME for f in frames):
            raise PackDamagedError(f"index of pack {pack_id} has a frame over {MAX_FRAME} bytes")
        return cls(pack_id, created, size, frames, table=body[end:])


def iter_pack(
    pack: bytes, index: PackIndex, wanted: Collection[bytes] | None = None
) -> Iterator[tuple[bytes, bytes]]:
    """``(digest, data)`` for the chunks of ``pack`` (only ``wanted`` ones if given).

    The data is *not* verified against the digest: callers hash it. A frame that does not
    decode raises :class:`PackDamagedError` naming the wanted chunks it holds.
    """
    by_frame: dict[int, list[ChunkEntry]] = defaultdict(list)
    if wanted is None:
        for c in index.chunks:
            by_frame[c.frame].append(c)
    else:  # found by digest: no entry made for the chunks not wanted (most of a pack, often)
        for d in wanted:
            i = index.position(d)
            if i is not None:
                c = index.entry(i)
                by_frame[c.frame].append(c)
    if by_frame and not pack.startswith(PACK_MAGIC):
        raise PackDamagedError(
            f"pack {index.pack_id} has a bad magic number",
            [c.digest for cs in by_frame.values() for c in cs],
        )
    dctx = zstandard.ZstdDecompressor()
    for frame_no in sorted(by_frame):
        entries = by_frame[frame_no]
        try:
            f = index.frames[frame_no]
            stored = pack[f.offset : f.offset + f.stored]
            if len(stored) != f.stored:
                raise ValueError("frame runs past the end of the pack")
            # decompress() trusts a size in the frame header over its limit: check it first.
            if f.codec != CODEC_RAW and zstandard.frame_content_size(stored) > f.raw:
                raise ValueError("frame claims more bytes than its index says")
            raw = stored if f.codec == CODEC_RAW else dctx.decompress(stored, f.raw)
            if len(raw) != f.raw:
                raise ValueError("frame has the wrong decoded length")
        except (IndexError, ValueError, zstandard.ZstdError) as exc:
            raise PackDamagedError(
                f"frame {frame_no} of pack {index.pack_id} does not decode ({exc})",
                [c.digest for c in entries],
            ) from exc
        for c in entries:
            yield c.digest, raw[c.offset : c.offset + c.length]


class PackWriter:
    """Accumulates new chunks into frames and packs; uploads full packs in the background.

    ``add`` chunks, then ``finish`` (every pack and index stored, or the first upload error
    raised). Chunks added twice are stored once. Not thread-safe: one writer per thread.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        level: int = 3,
        pack_target: int = PACK_TARGET,
        frame_target: int = FRAME_TARGET,
        uploaders: int = 2,
    ) -> None:
        self._backend = backend
        self._cctx = zstandard.ZstdCompressor(level=level)
        self._pack_target = pack_target
        self._frame_target = frame_target
        self._executor = ThreadPoolExecutor(uploaders, thread_name_prefix="torpor-pack")
        # Bound the packs held in memory while uploads run.
        self._slots = threading.BoundedSemaphore(uploaders + 1)
        self._futures: list[Future[tuple[PackIndex, int]]] = []
        self._seen: set[bytes] = set()
        self._frame = bytearray()
        self._frame_chunks: list[tuple[bytes, int, int]] = []
        self._pack = bytearray(PACK_MAGIC)
        self._frames: list[Frame] = []
        self._chunks: list[ChunkEntry] = []
        self.stored_bytes = 0
        self.chunk_bytes = 0

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._seen

    def add(self, digest: bytes, data: bytes | memoryview) -> None:
        """Queue a chunk for storage (a no-op if this writer already has it)."""
        if digest in self._seen:
            return
        self._seen.add(digest)
        self._frame_chunks.append((digest, len(self._frame), len(data)))
        self._frame += data
        self.chunk_bytes += len(data)
        if len(self._chunks) + len(self._frame_chunks) >= MAX_PACK_CHUNKS:
            self._close_frame()
            self._close_pack()  # its index stays within MAX_INDEX
        elif len(self._frame) >= self._frame_target:
            self._close_frame()
            if len(self._pack) >= self._pack_target - self._frame_target:
                self._close_pack()

    def _close_frame(self) -> None:
        if not self._frame_chunks:
            return
        raw = bytes(self._frame)
        packed = self._cctx.compress(raw)
        codec = CODEC_ZSTD
        if len(packed) >= len(raw):
            packed, codec = raw, CODEC_RAW
        if self._frames and len(self._pack) + len(packed) > self._pack_target:
            self._close_pack()
        frame_no = len(self._frames)
        self._frames.append(Frame(len(self._pack), len(packed), len(raw), codec))
        self._pack += packed
        self._chunks += [ChunkEntry(d, frame_no, off, n) for d, off, n in self._frame_chunks]
        self._frame = bytearray()
        self._frame_chunks = []

    def _close_pack(self) -> None:
        if not self._chunks:
            return
        index = PackIndex(
            uuid.uuid4().hex, time.time(), len(self._pack), tuple(self._frames), tuple(self._chunks)
        )
        data = bytes(self._pack)
        self._pack = bytearray(PACK_MAGIC)
        self._frames = []
        self._chunks = []
        self._slots.acquire()
        future = self._executor.submit(self._upload, index, data)
        future.add_done_callback(lambda _f: self._slots.release())
        self._futures.append(future)

    def _upload(self, index: PackIndex, data: bytes) -> tuple[PackIndex, int]:
        blob = index.encode()
        self._backend.put(pack_key(index.pack_id), data)
        self._backend.put(index_key(index.pack_id), blob)
        return index, len(data) + len(blob)

    def finish(self) -> list[PackIndex]:
        """Store what is pending and wait; the indexes of every pack written."""
        try:
            self._close_frame()
            self._close_pack()
            done = [f.result() for f in self._futures]
        finally:
            self._executor.shutdown(wait=True)
        self.stored_bytes = sum(n for _, n in done)
        return [i for i, _ in done]

    def abort(self) -> None:
        """Wait for uploads in flight and drop the rest (garbage collection reclaims it)."""
        self._executor.shutdown(wait=True, cancel_futures=True)
