"""Content addressing: how image files are cut into chunks and how chunk lists are encoded.

Chunking
    CRIU's ``pages-*.img`` files are the process's memory, page after page, and dominate an
    image. They are cut at page granularity (4 KiB): a checkpoint that changed 1 % of the pages
    (scattered) then shares 99 % of its chunks with the previous one. Fixed 64 KiB chunks would
    each catch a changed page with probability ``1 - 0.99**16`` ≈ 15 %, i.e. cost ~15 % new
    bytes per checkpoint instead of ~1 %. CRIU writes pages page-aligned in the file, so memory
    that moves (VMAs added or removed) still lands on the same chunk boundaries. Every other
    file is small or rarely large; they are cut in 1 MiB chunks (a small file is one chunk).

Chunk ids
    A chunk is named by the SHA-256 of its content (32 raw bytes). The all-zero page is
    :data:`ZERO_PAGE`: never stored, written as a hole on restore.

Chunk lists and patches
    A file's chunk list costs 32 bytes per 4 KiB page (0.8 % of the file). Stored whole for
    every checkpoint it would cost nearly as much as the 1 % of changed pages, so a large
    file's list is stored as a *keyframe* list object plus a *patch* against it (copy runs
    from the keyframe, literal digests). Patches are computed against a keyframe, never
    against another patch, so a list is always one keyframe + one patch away.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator, Sequence
from typing import BinaryIO, overload

import zstandard

PAGE_SIZE = 4096
LARGE_CHUNK = 1 << 20
DIGEST_SIZE = 32
ZERO_PAGE_BYTES = bytes(PAGE_SIZE)
ZERO_PAGE = hashlib.sha256(ZERO_PAGE_BYTES).digest()
_READ_BLOCK = 4 << 20  # a multiple of both chunk sizes

_DIGEST = struct.Struct(f"{DIGEST_SIZE}s")
_OP_COPY = 1
_OP_LITERAL = 2


def chunk_size_for(name: str) -> int:
    """The chunk size for an image file: pages for CRIU page files, 1 MiB otherwise."""
    return PAGE_SIZE if name.startswith("pages-") and name.endswith(".img") else LARGE_CHUNK


def digest(data: bytes | memoryview) -> bytes:
    """The id of a chunk (raw SHA-256)."""
    if len(data) == PAGE_SIZE and data == ZERO_PAGE_BYTES:
        return ZERO_PAGE
    return hashlib.sha256(data).digest()


def iter_chunks(stream: BinaryIO, chunk_size: int) -> Iterator[memoryview]:
    """Consecutive chunks of ``stream`` (the last one may be short).

    The views are only valid until the next one is requested; copy what you keep.
    """
    while True:
        block = stream.read(_READ_BLOCK)
        if not block:
            return
        view = memoryview(block)
        for off in range(0, len(view), chunk_size):
            yield view[off : off + chunk_size]


def chunk_lengths(size: int, chunk_size: int) -> Iterator[int]:
    """The lengths of the chunks of a file of ``size`` bytes."""
    full, rest = divmod(size, chunk_size)
    for _ in range(full):
        yield chunk_size
    if rest:
        yield rest


def chunk_count(size: int, chunk_size: int) -> int:
    """How many chunks a file of ``size`` bytes has."""
    return -(-size // chunk_size)


def encode_list(digests: Sequence[bytes]) -> bytes:
    """A chunk list as bytes (the digests back to back)."""
    return b"".join(digests)


def decode_list(blob: bytes) -> list[bytes]:
    """The inverse of :func:`encode_list`; :class:`ValueError` if the length is wrong."""
    if len(blob) % DIGEST_SIZE:
        raise ValueError(f"chunk list of {len(blob)} bytes is not a multiple of {DIGEST_SIZE}")
    return [d for (d,) in _DIGEST.iter_unpack(blob)]  # a C loop: ~2x a slicing one


class Digests(Sequence[bytes]):
    """A chunk list kept as its bytes, each digest cut out when asked for: a lazy restore
    needs a few thousand of a 1 GiB image's 262,144 before the resume, and making them all
    (one bytes object each) cost 20-60 ms. Immutable; :class:`ValueError` if the length is
    wrong."""

    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) % DIGEST_SIZE:
            raise ValueError(f"chunk list of {len(raw)} bytes is not a multiple of {DIGEST_SIZE}")
        self._raw = raw

    def __len__(self) -> int:
        return len(self._raw) // DIGEST_SIZE

    @overload
    def __getitem__(self, i: int) -> bytes: ...

    @overload
    def __getitem__(self, i: slice) -> list[bytes]: ...

    def __getitem__(self, i: int | slice) -> bytes | list[bytes]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("chunk index out of range")
        return self._raw[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]

    def __iter__(self) -> Iterator[bytes]:
        return (d for (d,) in _DIGEST.iter_unpack(self._raw))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Digests):
            return self._raw == other._raw
        if isinstance(other, Sequence):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


def _varint(n: int, out: bytearray) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated patch")
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, pos
        shift += 7


def make_patch(base: Sequence[bytes], new: Sequence[bytes]) -> bytes:
    """Encode ``new`` as runs copied from ``base`` and literal digests.

    Greedy: keep following the current run of ``base`` while it matches, else jump to the
    first occurrence of the digest in ``base``, else emit a literal. Memory that moved by whole
    pages costs one copy op per move, a changed page one literal.
    """
    first: dict[bytes, int] = {}
    for i, d in enumerate(base):
        first.setdefault(d, i)
    out = bytearray()
    literals: list[bytes] = []

    def flush() -> None:
        if literals:
            out.append(_OP_LITERAL)
            _varint(len(literals), out)
            out.extend(b"".join(literals))
            literals.clear()

    n, nb = len(new), len(base)
    i = expect = 0
    while i < n:
        d = new[i]
        j = expect if expect < nb and base[expect] == d else first.get(d)
        if j is None:
            literals.append(d)
            i += 1
            continue
        k = 1
        while i + k < n and j + k < nb and new[i + k] == base[j + k]:
            k += 1
        flush()
        out.append(_OP_COPY)
        _varint(j, out)
        _varint(k, out)
        i += k
        expect = j + k
    flush()
    return bytes(out)


def apply_patch(base: Sequence[bytes], patch: bytes, limit: int | None = None) -> list[bytes]:
    """Rebuild a chunk list from ``base`` and a patch; :class:`ValueError` if malformed, or
    if it would be longer than ``limit`` (a few bytes of patch can copy a long base many
    times: the file's chunk count bounds what a patch from outside may build)."""
    out: list[bytes] = []
    pos = 0
    while pos < len(patch):
        if limit is not None and len(out) > limit:
            raise ValueError(f"patch builds more than {limit} chunks")
        op = patch[pos]
        pos += 1
        if op == _OP_COPY:
            start, pos = _read_varint(patch, pos)
            count, pos = _read_varint(patch, pos)
            if count == 0 or start + count > len(base):
                raise ValueError("patch copies outside its base list")
            out.extend(base[start : start + count])
        elif op == _OP_LITERAL:
            count, pos = _read_varint(patch, pos)
            end = pos + count * DIGEST_SIZE
            if end > len(patch):
                raise ValueError("truncated patch")
            out.extend(patch[p : p + DIGEST_SIZE] for p in range(pos, end, DIGEST_SIZE))
            pos = end
        else:
            raise ValueError(f"unknown patch op {op}")
    if limit is not None and len(out) > limit:
        raise ValueError(f"patch builds more than {limit} chunks")
    return out


def bounded_decompress(blob: bytes, limit: int) -> bytes:
    """zstd-decompress ``blob``, refusing (``ValueError``) more than ``limit`` bytes of output
    (a small object from outside must not make us allocate gigabytes)."""
    try:
        size = zstandard.frame_content_size(blob)
        if size > limit:
            raise ValueError(f"decompresses to {size} bytes, more than {limit}")
        if size >= 0:
            return zstandard.ZstdDecompressor().decompress(blob)
        parts: list[bytes] = []
        got = 0
        with zstandard.ZstdDecompressor().stream_reader(blob) as reader:
            while chunk := reader.read(1 << 20):
                got += len(chunk)
                if got > limit:
                    raise ValueError(f"decompresses to more than {limit} bytes")
                parts.append(chunk)
        return b"".join(parts)
    except zstandard.ZstdError as exc:
        raise ValueError(f"does not decompress ({exc})") from exc
