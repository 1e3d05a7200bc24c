"""Copy mode against a *base*: only the chunks the target lacks cross (issue 9).

A process restored from an image (``restored_from``) or last checkpointed to one
(``checkpointed_to``) shares most of its memory with it. When the target holds that image too,
most of the new dump's pages are already there.

The exchange (docs/migration.md, "Chunks the target has"):

1. Before anything is frozen, the source names its candidate bases in the ``preflight``
   message (``bases``: at most :data:`MAX_BASES` :func:`content_id` values, read from the bases'
   manifests; the source sends nothing of a base's data).
2. The target answers ``ready`` with ``base`` (the id of one it holds: an image of its images
   directory whose manifest gives that id, verified as any image torpor uses) and ``chunks``
   (how many), followed by that base's chunk ids as ``D`` frames: the files in name order,
   each cut as the pools cut it (:mod:`torpor._pools._cas`: 4 KiB pages for ``pages-*.img``,
   1 MiB otherwise; SHA-256). The source checks the count against the base's own manifest.
3. After the dump, each file is sent in *segments* of :data:`SEGMENT_BYTES`: one ``D`` frame
   holding the segment's *plan* (runs of chunks: literal, the zero page, or base file F from
   chunk S), then the literal runs' bytes as ``D`` frames, each run on frames of its own.
4. The target writes base runs by copying from its base (``pread``), zero pages as holes,
   literals as given, and hashes every file whole: the source's SHA-256 (``hashes``) must
   match, so a base chunk that is not what its id says is caught and the migration fails,
   the original resumed (a damaged base is then verified in full before its next use).

Without a base the wire is as before and nothing is hashed per chunk inside the freeze.

This module holds what both sides share: the ids, the layout, the plans' encoding, and the
checks of what a peer sends (:func:`parse_ids`, :func:`decode_plan`; the target's list is
checked by :func:`._dedup_source.read_lists`): counts, ids, file indexes and chunk ranges,
each refused with one line. The source's side is :mod:`._dedup_source`, the target's
:mod:`._dedup_target`.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .._images._manifest import FileEntry, Manifest
from ._channel import ChannelError

# The pools' chunking (``_pools._cas``) is imported where it is used: the pools' package loads
# every backend (~40 ms), which a copy-mode migration without a base (its source's start,
# before the freeze) should not pay for. ``PAGE_SIZE`` is the pools' page, as ``_cas`` says.
PAGE_SIZE = 4096

MAX_BASES = 2  # candidate bases a source names: the image it came from, the one it went to
# Chunks in one base (8 GiB of pages): its ids (32 bytes each) and the source's index of them
# must fit in memory comfortably; a larger base is not used.
MAX_BASE_CHUNKS = 1 << 21
SEGMENT_BYTES = 16 << 20  # of a file, per plan: a multiple of both chunk sizes
OP_LITERAL, OP_ZERO, OP_BASE = 1, 2, 3
_RUN = struct.Struct("<BHII")  # op, base file index, its first chunk, chunk count
_ID_LEN = 64  # hex digits of a content id
_HEX = frozenset("0123456789abcdef")


class DedupError(ChannelError):
    """A peer's base or chunk data is malformed or points outside what it may."""


def content_id(manifest: Manifest) -> str:
    """An image's identity for a base: the SHA-256 of its files' names, sizes and SHA-256
    (sorted), so copies of one image on two hosts agree whatever their manifests' other
    fields, and no other content can claim it."""
    files = sorted([f.name, f.size, f.sha256] for f in manifest.files)
    return hashlib.sha256(json.dumps(files, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class BaseFile:
    """One file of a base as both sides cut it: ``chunk`` bytes a chunk, ``count`` chunks."""

    name: str
    size: int
    chunk: int
    count: int

    def length(self, index: int) -> int:
        """The length of chunk ``index`` (the last one may be short)."""
        return min(self.chunk, self.size - index * self.chunk)


def layout(files: Iterable[FileEntry]) -> tuple[BaseFile, ...]:
    """A base's files in the order their chunk ids go on the wire (by name)."""
    from .._pools._cas import chunk_count, chunk_size_for

    out = []
    for f in sorted(files, key=lambda e: e.name):
        size = chunk_size_for(f.name)
        out.append(BaseFile(f.name, f.size, size, chunk_count(f.size, size)))
    return tuple(out)


def total_chunks(files: Sequence[BaseFile]) -> int:
    """How many chunk ids a base's list holds."""
    return sum(f.count for f in files)


@dataclass
class Counts:
    """Bytes of one image: sent as they are, copied from the base there, zero pages."""

    sent: int = 0
    from_base: int = 0
    zero: int = 0

    def add(self, other: Counts) -> None:
        self.sent += other.sent
        self.from_base += other.from_base
        self.zero += other.zero


def encode_plan(runs: Sequence[Sequence[int]]) -> bytes:
    """A segment's plan as its ``D`` frame."""
    return b"".join(_RUN.pack(*r) for r in runs)


# -- the peer's data, checked -------------------------------------------------------------------


def parse_ids(value: object) -> list[str]:
    """The ``bases`` of a ``preflight`` message: at most :data:`MAX_BASES` content ids (64
    lowercase hex digits); :class:`DedupError` otherwise (absent: none)."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_BASES:
        raise DedupError(f"the pre-flight's bases are not a list of at most {MAX_BASES} ids")
    for v in value:
        if not (isinstance(v, str) and len(v) == _ID_LEN and set(v) <= _HEX):
            raise DedupError(f"the pre-flight names a base that is not a content id: {v!r}"[:200])
    return list(dict.fromkeys(value))


def segment_lengths(name: str, size: int, start: int) -> list[int]:
    """The chunk lengths of the segment of file ``name`` (``size`` bytes) at ``start``."""
    from .._pools._cas import chunk_size_for

    chunk = chunk_size_for(name)
    end = min(size, start + SEGMENT_BYTES)
    return [min(chunk, end - p) for p in range(start, end, chunk)]


def decode_plan(
    blob: bytes, lengths: Sequence[int], chunk: int, files: Sequence[BaseFile] | None
) -> list[tuple[int, int, int, int, int]]:
    """A segment's plan from the peer, checked against the segment's chunk ``lengths`` (cut
    in ``chunk`` bytes) and the base's ``files`` (None: no base): ``(op, base file, byte offset
    there, chunk count, byte length)`` for each run, covering the segment exactly, base runs
    inside their base file with the same chunk size and lengths, zero runs of whole pages.
    :class:`DedupError` naming the first problem otherwise."""
    if not blob or len(blob) % _RUN.size or len(blob) // _RUN.size > len(lengths):
        raise DedupError(f"a chunk plan of {len(blob)} bytes does not fit its segment")
    out = []
    at = 0
    for op, f, start, count in _RUN.iter_unpack(blob):
        if count == 0 or at + count > len(lengths):
            raise DedupError("a chunk plan's runs do not cover its segment exactly")
        nbytes = sum(lengths[at : at + count])
        if op in (OP_LITERAL, OP_ZERO):
            if f or start:
                raise DedupError(f"a chunk plan's run of op {op} names a base chunk")
            if op == OP_ZERO and (chunk != PAGE_SIZE or nbytes != count * PAGE_SIZE):
                raise DedupError("a chunk plan marks a chunk that is not a whole page as zero")
            out.append((op, 0, 0, count, nbytes))
        elif op == OP_BASE:
            if files is None:
                raise DedupError("a chunk plan copies from a base, but no base was agreed")
            if f >= len(files):
                raise DedupError(f"a chunk plan copies from base file {f} of {len(files)}")
            bf = files[f]
            offset = start * bf.chunk
            if bf.chunk != chunk or start + count > bf.count or offset + nbytes > bf.size:
                raise DedupError(
                    f"a chunk plan copies chunks {start}..{start + count} of base file "
                    f"{bf.name}, outside its {bf.count} chunks of {bf.chunk} bytes"
                )
            if min(bf.size, offset + count * chunk) - offset != nbytes:
                raise DedupError(f"a chunk plan copies base chunks of other lengths ({bf.name})")
            out.append((op, f, offset, count, nbytes))
        else:
            raise DedupError(f"a chunk plan holds an unknown op {op}")
        at += count
    if at != len(lengths):
        raise DedupError("a chunk plan's runs do not cover its segment exactly")
    return out


def plan_bytes(sizes: dict[str, int]) -> int:
    """The most plan bytes an image of files of ``sizes`` (by name) may hold."""
    from .._pools._cas import chunk_count, chunk_size_for

    return sum(chunk_count(s, chunk_size_for(n)) for n, s in sizes.items()) * _RUN.size
