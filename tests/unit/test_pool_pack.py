"""The pack and index formats, the pack writer, and the in-memory backend's conformance."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator

import pytest
import zstandard
from conformance.backend_suite import BackendConformance

from torpor._errors import PoolError
from torpor._pools import MemoryBackend
from torpor._pools._pack import (
    CODEC_RAW,
    CODEC_ZSTD,
    PACK_MAGIC,
    PACK_TARGET,
    PackDamagedError,
    PackIndex,
    PackWriter,
    index_key,
    iter_pack,
    pack_key,
)


class TestMemoryBackend(BackendConformance):
    """The test double keeps the same contract as the real drivers."""

    @pytest.fixture
    def backend(self) -> Iterator[MemoryBackend]:
        b = MemoryBackend()
        yield b
        b.close()

    # Objects live in this process's memory only: there is nobody else to hide them from.
    test_objects_are_private = None


def _chunks(n: int, size: int, seed: int, *, text: bool = False) -> dict[bytes, bytes]:
    rng = random.Random(seed)
    out = {}
    for i in range(n):
        data = (f"object {i} " * size)[:size].encode() if text else rng.randbytes(size)
        out[hashlib.sha256(data).digest()] = data
    return out


def _write(backend: MemoryBackend, chunks: dict[bytes, bytes]) -> list[PackIndex]:
    writer = PackWriter(backend)
    for d, data in chunks.items():
        writer.add(d, data)
        writer.add(d, data)  # twice: stored once
    return writer.finish()


def test_round_trip_through_packs_and_indexes() -> None:
    backend = MemoryBackend()
    chunks = _chunks(3000, 4096, 1)  # 12 MiB: several packs
    indexes = _write(backend, chunks)
    assert len(indexes) >= 3
    seen: dict[bytes, bytes] = {}
    for idx in indexes:
        assert PackIndex.decode(idx.pack_id, backend.get(index_key(idx.pack_id))) == idx
        pack = backend.get(pack_key(idx.pack_id))
        assert pack.startswith(PACK_MAGIC)
        assert len(pack) == idx.size <= PACK_TARGET
        seen.update(iter_pack(pack, idx))
    assert seen == chunks


def test_random_frames_are_stored_raw_and_text_compressed() -> None:
    backend = MemoryBackend()
    (raw_idx,) = _write(backend, _chunks(40, 4096, 2))
    (text_idx,) = _write(backend, _chunks(40, 4096, 3, text=True))
    assert {f.codec for f in raw_idx.frames} == {CODEC_RAW}
    assert {f.codec for f in text_idx.frames} == {CODEC_ZSTD}
    assert text_idx.size < 40 * 4096 / 10


def test_big_chunks_keep_packs_near_the_target() -> None:
    backend = MemoryBackend()
    indexes = _write(backend, _chunks(12, 1 << 20, 4))
    # a 1 MiB chunk cannot split, so a pack may hold one frame more than the target at most
    assert all(i.size <= PACK_TARGET + (1 << 20) + 64 for i in indexes)
    assert sum(len(i.chunks) for i in indexes) == 12


def test_wanted_subset_only() -> None:
    backend = MemoryBackend()
    chunks = _chunks(100, 4096, 5)
    (idx,) = _write(backend, chunks)
    wanted = set(list(chunks)[10:13])
    got = dict(iter_pack(backend.get(pack_key(idx.pack_id)), idx, wanted))
    assert set(got) == wanted


def test_a_damaged_index_is_detected() -> None:
    backend = MemoryBackend()
    (idx,) = _write(backend, _chunks(10, 4096, 6))
    blob = bytearray(zstandard.ZstdDecompressor().decompress(backend.get(index_key(idx.pack_id))))
    blob[60] ^= 1
    with pytest.raises(PackDamagedError, match="checksum"):
        PackIndex.decode(idx.pack_id, zstandard.ZstdCompressor().compress(bytes(blob)))
    with pytest.raises(PackDamagedError, match="decompress"):
        PackIndex.decode(idx.pack_id, b"not zstd")


def test_a_damaged_frame_names_its_chunks() -> None:
    backend = MemoryBackend()
    chunks = _chunks(100, 4096, 7, text=True)
    (idx,) = _write(backend, chunks)
    pack = bytearray(backend.get(pack_key(idx.pack_id)))
    frame = idx.frames[0]
    pack[frame.offset + frame.stored // 2] ^= 0xFF
    with pytest.raises(PackDamagedError) as info:
        list(iter_pack(bytes(pack), idx))
    in_frame = {c.digest for c in idx.chunks if c.frame == 0}
    assert set(info.value.digests) == in_frame


def test_bad_magic_is_detected() -> None:
    backend = MemoryBackend()
    (idx,) = _write(backend, _chunks(3, 4096, 8))
    with pytest.raises(PackDamagedError, match="magic"):
        list(iter_pack(b"XXXXXXXX" + backend.get(pack_key(idx.pack_id))[8:], idx))


def test_upload_errors_surface_from_finish() -> None:
    class Failing(MemoryBackend):
        def put(self, key: str, data: bytes) -> None:
            if key.startswith("index/"):
                raise PoolError("disk full")
            super().put(key, data)

    backend = Failing()
    writer = PackWriter(backend)
    for d, data in _chunks(10, 4096, 9).items():
        writer.add(d, data)
    with pytest.raises(PoolError, match="disk full"):
        writer.finish()
    # the pack landed, its index did not: an orphan for gc, never visible to readers
    assert list(backend.list("packs/")) and not list(backend.list("index/"))
